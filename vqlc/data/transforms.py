"""Per-image transforms (uint8 in, uint8 out) and the batch-level conversion to [-1, 1].

Images stay uint8 through the pipeline (4x less memory in prefetch buffers and between worker
processes); ``normalize_batch`` turns a batch into float32 at the very end.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from vqlc import extras

with extras.needed("train"):
    import grain

from vqlc.eval.images import to_float


MAX_ASPECT_RATIO = 32  # longer / shorter side kept by resize_shorter_side (see there)


def resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
    """Resizes uint8 [H, W, 3] so that min(H, W) == size (PIL bicubic, keeps the aspect ratio).

    Pillow's resize filters with a kernel widened by the scale factor when shrinking, i.e. it is
    antialiased (like torchvision's ``Resize`` on PIL images). The longer side is rounded.
    Images smaller than ``size`` are scaled up (a 5x3 image works). A sliver longer than
    ``MAX_ASPECT_RATIO`` times its shorter side is first centre-cropped to that ratio: scaling a
    1 x 100,000 image to a shorter side of 256 would otherwise allocate ~20 GB.
    """
    height, width = image.shape[:2]
    if max(height, width) > MAX_ASPECT_RATIO * min(height, width):
        keep = MAX_ASPECT_RATIO * min(height, width)
        if height > width:
            image = image[(height - keep) // 2:(height - keep) // 2 + keep]
        else:
            image = image[:, (width - keep) // 2:(width - keep) // 2 + keep]
        image = np.ascontiguousarray(image)
        height, width = image.shape[:2]
    if min(height, width) == size:
        return image
    if height <= width:
        new_height, new_width = size, max(size, int(round(width * size / height)))
    else:
        new_height, new_width = max(size, int(round(height * size / width))), size
    resized = Image.fromarray(image).resize((new_width, new_height), Image.Resampling.BICUBIC)
    return np.asarray(resized)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Central size x size crop (the extra pixel of an odd margin goes to the bottom/right)."""
    height, width = image.shape[:2]
    if height < size or width < size:
        raise ValueError(f"Image {image.shape} is smaller than the crop size {size}.")
    top = (height - size) // 2
    left = (width - size) // 2
    return np.ascontiguousarray(image[top:top + size, left:left + size])


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Uniformly placed size x size crop, positions drawn from ``rng``."""
    height, width = image.shape[:2]
    if height < size or width < size:
        raise ValueError(f"Image {image.shape} is smaller than the crop size {size}.")
    top = int(rng.integers(0, height - size + 1))
    left = int(rng.integers(0, width - size + 1))
    return np.ascontiguousarray(image[top:top + size, left:left + size])


def seeded_train_crop(image: np.ndarray, image_size: int, resize_shorter: int, seed: int,
                      index: int) -> np.ndarray:
    """The training crop (``TrainTransform``) with its position drawn from ``(seed, index)``
    only: the same crop of an image on every run, process count and batch size, which is what
    resumable dataset writers (features, encoded tokens) need."""
    rng = np.random.default_rng([int(seed), int(index)])
    return TrainTransform(image_size, resize_shorter).random_map({"image": image}, rng)["image"]


def five_crop(image: np.ndarray, size: int) -> list[np.ndarray]:
    """Top-left, top-right, bottom-left, bottom-right and central size x size crops
    (torchvision's ``FiveCrop`` order)."""
    height, width = image.shape[:2]
    if height < size or width < size:
        raise ValueError(f"Image {image.shape} is smaller than the crop size {size}.")
    corners = [(0, 0), (0, width - size), (height - size, 0), (height - size, width - size)]
    crops = [np.ascontiguousarray(image[t:t + size, l:l + size]) for t, l in corners]
    return crops + [center_crop(image, size)]


def ten_crop(image: np.ndarray, size: int, crop_size: int) -> list[np.ndarray]:
    """LlamaGen's ten-crop augmentation: the shorter side resized to ``crop_size`` and the
    central ``crop_size`` square kept (its ``center_crop_arr``), then torchvision's
    ``TenCrop(size)``: the five crops of that square, then the five crops of its mirror image."""
    square = center_crop(resize_shorter_side(image, crop_size), crop_size)
    return five_crop(square, size) + five_crop(np.ascontiguousarray(square[:, ::-1]), size)


class TrainTransform(grain.transforms.RandomMap):
    """Resize the shorter side to ``resize_shorter`` (0 = no resize), then a random square crop.

    No horizontal flip: the released VQGAN-LC training does not flip. Deterministic given the
    ``rng`` that grain derives from the pipeline seed and the record's position.
    """

    def __init__(self, image_size: int, resize_shorter: int, keep_label: bool = False):
        if resize_shorter and resize_shorter < image_size:
            raise ValueError(f"resize_shorter {resize_shorter} < image_size {image_size}.")
        self.image_size = image_size
        self.resize_shorter = resize_shorter
        self.keep_label = keep_label

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        image = element["image"]
        if self.resize_shorter:
            image = resize_shorter_side(image, self.resize_shorter)
        out = {"image": random_crop(image, self.image_size, rng)}
        if self.keep_label:
            out["label"] = np.int32(element["label"])
        return out


class EvalTransform(grain.transforms.Map):
    """Resize the shorter side to ``resize_shorter`` (0 = no resize), then the central crop."""

    def __init__(self, image_size: int, resize_shorter: int):
        if resize_shorter and resize_shorter < image_size:
            raise ValueError(f"resize_shorter {resize_shorter} < image_size {image_size}.")
        self.image_size = image_size
        self.resize_shorter = resize_shorter

    def map(self, element: dict) -> dict:
        image = element["image"]
        if self.resize_shorter:
            image = resize_shorter_side(image, self.resize_shorter)
        return {"image": center_crop(image, self.image_size)}


class NormalizeBatch(grain.transforms.Map):
    """Converts a batch's uint8 'image' to float32 [-1, 1]; zeroes padded entries ('mask' False)."""

    def map(self, batch: dict) -> dict:
        out = dict(batch)
        out["image"] = to_float(batch["image"])
        if "mask" in batch:
            out["image"][~batch["mask"]] = 0.0
        return out
