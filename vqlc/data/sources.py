"""Random-access image sources: bundled demo photos, image folders and tfds datasets.

Every source has ``len()`` and ``__getitem__(i) -> {'image': uint8 [H, W, 3], 'label': int}``, so
grain can index it directly (shuffle, shard and read in any order, from worker processes).

Bad data. A record that cannot be decoded (truncated or corrupt file, a text file named .jpg, an
unsupported mode) never raises out of a source:

* ``source[i]`` (training, feature extraction) returns the next record ``i + 1, i + 2, ...``
  (wrapping) that decodes. The replacement depends only on ``i``, so the data order stays the
  same for any number of processes and workers, and batches stay full.
* ``source.try_read(i)`` (evaluation) returns None instead, and the evaluation pipeline makes
  the row a padded one (mask False), so it is left out of the metrics.

Each unreadable record is named in a warning once per process (worker processes log to their
stderr) and listed in ``source.bad_files``. ``ImageFolder`` also opens every file's header when
it is built (about 0.1 ms per file, threaded), so files that are not images at all (zero bytes,
random bytes, text) are dropped before any index is assigned, counted and named in the log.
Too much bad data is an error (``BadDataError``) rather than a silently skewed dataset: at
construction when the header check finds more than ``max_bad_fraction`` of the files unreadable,
and at decode time as soon as one process has itself seen more than that fraction (a lower bound
on the true count, since each process sees only the records it reads).
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import importlib.resources
import logging
import os
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vqlc import extras
from vqlc.data import transforms

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")

# Colour photographs shipped inside the scikit-image wheel (skimage/data/), so the demo needs no
# download. The motorcycle stereo pair shows the same scene, so both halves stay in 'train'.
DEMO_TRAIN_PHOTOS = (
    "astronaut.png",          # portrait, 512x512
    "coffee.png",             # still life, 400x600
    "hubble_deep_field.jpg",  # galaxies on black, 872x1000
    "ihc.png",                # stained tissue micrograph, 512x512
    "motorcycle_left.png",    # object with fine detail, 500x741
    "motorcycle_right.png",
    "retina.jpg",             # fundus photograph, 1411x1411
)
DEMO_EVAL_PHOTOS = (
    "chelsea.png",  # cat (fur, face), 300x451
    "rocket.jpg",   # outdoor scene (sky, trees, structure), 427x640
)
DEMO_TRAIN_LENGTH = 10_000  # virtual records per epoch; each is one photo, random-cropped later

DEFAULT_MAX_BAD_FRACTION = 0.01  # config: data.max_bad_fraction
SCAN_THREADS = 16  # header checks are I/O bound (PIL releases the GIL while reading)

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------

def _composite_on_white(image: Image.Image) -> Image.Image:
    """Flattens an image with alpha onto a white background.

    White (not "drop alpha") because fully transparent pixels often hold arbitrary RGB values
    (black or garbage); web graphics and logos are meant to be seen on a light page.
    """
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def pil_to_rgb_uint8(image: Image.Image) -> np.ndarray:
    """Converts any PIL image to a uint8 RGB array [H, W, 3].

    EXIF orientation is applied first. Grayscale and bilevel images are replicated to three
    channels, palette and CMYK/YCbCr/LAB images are converted by PIL, 16-bit and 32-bit integer
    images are scaled from [0, 65535] to [0, 255] (rounded), float images are assumed to lie in
    [0, 1] when their maximum is <= 1 and in [0, 255] otherwise. Images with transparency
    (RGBA, LA, PA, palette with a transparent index) are composited on white. Multi-frame files
    (GIF, TIFF) give their first frame.
    """
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        array = np.asarray(image).astype(np.float64)
        if mode == "I" and array.max(initial=0) <= 255:
            pass  # an 8-bit image stored as int32 (e.g. some TIFFs): keep its values
        else:
            array = array / 257.0  # 65535 -> 255, 257 * k -> k
        gray = np.clip(np.rint(array), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode == "F":
        array = np.asarray(image, dtype=np.float64)
        if array.max(initial=0) <= 1.0:
            array = array * 255.0
        gray = np.clip(np.rint(array), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB") and "transparency" in image.info)
    if has_alpha:
        return np.asarray(_composite_on_white(image), dtype=np.uint8)
    if mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def load_image(path: str) -> np.ndarray:
    """Decodes an image file to uint8 RGB [H, W, 3] (see ``pil_to_rgb_uint8``)."""
    with Image.open(path) as image:
        image.seek(0)
        return pil_to_rgb_uint8(image)


def ensure_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Makes an already decoded array uint8 RGB [H, W, 3] (gray: replicate; alpha: on white)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.dtype != np.uint8:
        if image.dtype == np.uint16:
            image = np.rint(image / 257.0)
        image = np.clip(image, 0, 255).astype(np.uint8)
    channels = image.shape[-1]
    if channels == 1:
        return np.repeat(image, 3, axis=-1)
    if channels == 2:
        return np.asarray(_composite_on_white(Image.fromarray(image, "LA")))
    if channels == 4:
        return np.asarray(_composite_on_white(Image.fromarray(image, "RGBA")))
    if channels != 3:
        raise ValueError(f"Unsupported image shape {image.shape}.")
    return image


# ----------------------------------------------------------------------------------------------
# Unreadable records
# ----------------------------------------------------------------------------------------------

class BadDataError(ValueError):
    """More of a dataset is unreadable than ``max_bad_fraction`` allows (or all of it)."""


def describe_error(error: BaseException) -> str:
    """A short reason for a failed decode, without the (already known) file path."""
    if isinstance(error, UnidentifiedImageError):
        return "not an image file, or a format PIL cannot read"
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def too_many_bad_message(where: str, num_bad: int, total: int, max_bad_fraction: float,
                         examples: Sequence[tuple[str, str]], hint: str = "") -> str:
    names = "; ".join(f"{name} ({reason})" for name, reason in examples[:5])
    more = f"; and {num_bad - 5} more" if num_bad > 5 else ""
    return (f"{where}: {num_bad:,} of {total:,} records ({100.0 * num_bad / max(total, 1):.2f}%)"
            f" are unreadable, more than data.max_bad_fraction={max_bad_fraction} allows: "
            f"{names}{more}. Fix or remove these files, or raise data.max_bad_fraction.{hint}")


class _SafeReads:
    """``__getitem__`` / ``try_read`` on top of a subclass's ``_read(index)``, which may raise.

    Subclasses call ``_init_safe_reads`` in their constructor and may override ``describe``.
    The per-process bookkeeping (``bad_files``, the known failures) travels to grain's worker
    processes as a copy; each process then counts and logs what it reads itself.
    """

    def _init_safe_reads(self, max_bad_fraction: float, known_bad: Sequence = ()):
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}.")
        self.max_bad_fraction = float(max_bad_fraction)
        self.bad_files = list(known_bad)  # (name, reason): found at construction, then decoding
        self._num_known_bad = len(self.bad_files)  # not part of len(self)
        self._decode_failures = {}  # index -> reason, in this process

    def _read(self, index: int) -> dict:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """How the log names record ``index``."""
        return f"record {index}"

    def try_read(self, index: int) -> Optional[dict]:
        """Record ``index``, or None when it cannot be decoded (logged once per process)."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        if index in self._decode_failures:
            return None
        try:
            return self._read(index)
        except Exception as error:  # decoders raise OSError, ValueError, SyntaxError, ...
            reason = describe_error(error)
        self._record_failure(index, reason)
        return None

    def _record_failure(self, index: int, reason: str) -> None:
        if index in self._decode_failures:  # another thread got there first
            return
        self._decode_failures[index] = reason
        name = self.describe(index)
        self.bad_files.append((name, reason))
        logger.warning("Unreadable image %s (%s) in %r [pid %d]: skipped (replaced by the next "
                       "readable record in training, masked out in evaluation).",
                       name, reason, self, os.getpid())
        num_bad = self._num_known_bad + len(self._decode_failures)
        total = len(self) + self._num_known_bad
        if num_bad > self.max_bad_fraction * total:
            raise BadDataError(too_many_bad_message(
                f"{self!r} (found while decoding, in process {os.getpid()})", num_bad, total,
                self.max_bad_fraction, self.bad_files))

    def __getitem__(self, index: int) -> dict:
        """Record ``index``, or when it cannot be decoded the next one (wrapping) that can."""
        index = int(index)
        count = len(self)
        if not 0 <= index < count:
            raise IndexError(f"index {index} out of range for {count} records")
        for step in range(count):
            record = self.try_read((index + step) % count)
            if record is not None:
                return record
        raise BadDataError(f"No record of {self!r} can be decoded.")


# ----------------------------------------------------------------------------------------------
# Demo photos
# ----------------------------------------------------------------------------------------------

def _demo_photo(name: str) -> np.ndarray:
    """Reads one photo from the scikit-image wheel's own data directory (no pooch download)."""
    with extras.needed("demo", "the demo's photographs"):
        path = importlib.resources.files("skimage") / "data" / name
    with importlib.resources.as_file(path) as file:
        if not os.path.exists(file):
            raise FileNotFoundError(
                f"{file} is missing: the demo needs the photos that ship inside scikit-image.")
        return load_image(str(file))


def _grid_starts(length: int, size: int, stride: int) -> list[int]:
    """Crop origins along one axis, with the leftover margin split evenly at both ends."""
    if length < size:
        return []
    count = (length - size) // stride + 1
    margin = (length - size - (count - 1) * stride) // 2
    return [margin + k * stride for k in range(count)]


class DemoPhotos(_SafeReads):
    """Real photographs bundled with scikit-image, for runs that need no dataset.

    ``split='train'``: a virtual dataset of ``DEMO_TRAIN_LENGTH`` records per epoch; record ``i``
    is training photo ``i % 7`` resized so its shorter side is ``photo_size``; the training
    transform then takes a random crop of it (so no resize there).

    ``split='eval'``: a fixed grid of ``crop_size`` crops (stride ``crop_size // 2``) of the
    held-out photos (``DEMO_EVAL_PHOTOS``, never seen in training), each resized to a shorter
    side of ``photo_size`` and of ``2 * photo_size``. Records are already ``crop_size`` square.
    With the defaults (160, 64) that is 300 crops, i.e. 19,200 tokens at downsampling 8.

    ``holdout > 0`` (a fraction of each photo's width) turns the demo into a classification
    task over the seven training photos (label = photo) with a test set they never show: the
    ``train`` split keeps only the left ``1 - holdout`` of each resized photo, and ``eval`` is
    a grid of crops (stride ``crop_size // 4``) of the right-hand strip of the same photos at
    ``photo_size``, labelled by photo. No training crop overlaps an eval crop.
    """

    def __init__(self, split: str, *, photo_size: int = 160, crop_size: int = 64,
                 holdout: float = 0.0):
        if split not in ("train", "eval"):
            raise ValueError(f"DemoPhotos split must be 'train' or 'eval', got {split!r}.")
        if photo_size < crop_size:
            raise ValueError(f"photo_size {photo_size} is smaller than crop_size {crop_size}.")
        if not 0.0 <= holdout < 1.0:
            raise ValueError(f"data.demo_holdout={holdout} must be in [0, 1).")
        self.split = split
        self.photo_size = photo_size
        self.crop_size = crop_size
        self.holdout = holdout
        self._init_safe_reads(1.0)  # decoded once, here: nothing can fail later
        names = DEMO_TRAIN_PHOTOS if split == "train" or holdout else DEMO_EVAL_PHOTOS
        self.photo_names = names
        if holdout:
            self._init_holdout(names)
        elif split == "train":
            self._photos = [transforms.resize_shorter_side(_demo_photo(n), photo_size)
                            for n in names]
            for photo in self._photos:
                photo.flags.writeable = False  # records share these arrays: no in-place edits
            self._crops = None
        else:
            self._photos = []
            self._crops = []  # (scaled photo index, label, top, left)
            stride = max(crop_size // 2, 1)
            for label, name in enumerate(names):
                photo = _demo_photo(name)
                for scale in (photo_size, 2 * photo_size):
                    scaled = transforms.resize_shorter_side(photo, scale)
                    self._photos.append(scaled)
                    height, width = scaled.shape[:2]
                    for top in _grid_starts(height, crop_size, stride):
                        for left in _grid_starts(width, crop_size, stride):
                            self._crops.append((len(self._photos) - 1, label, top, left))

    def _init_holdout(self, names) -> None:
        """Left part of each training photo for 'train'; crops of its right strip for 'eval'."""
        size, parts, self._crops = self.crop_size, [], None if self.split == "train" else []
        for label, name in enumerate(names):
            photo = transforms.resize_shorter_side(_demo_photo(name), self.photo_size)
            height, width = photo.shape[:2]
            cut = width - int(round(width * self.holdout))
            if cut < size or width - cut < size:
                raise ValueError(f"data.demo_holdout={self.holdout}: {name} at {width} px wide "
                                 f"leaves {cut} px to train on and {width - cut} px held out; "
                                 f"both must be at least the {size} px crop.")
            if self.split == "train":
                parts.append(np.ascontiguousarray(photo[:, :cut]))
                parts[-1].flags.writeable = False
                continue
            parts.append(photo[:, cut:])
            stride = max(size // 4, 1)
            for top in _grid_starts(height, size, stride):
                for left in _grid_starts(width - cut, size, stride):
                    self._crops.append((label, label, top, left))
        self._photos = parts

    def __len__(self) -> int:
        return DEMO_TRAIN_LENGTH if self.split == "train" else len(self._crops)

    def _read(self, index: int) -> dict:
        if self.split == "train":
            label = index % len(self._photos)
            return {"image": self._photos[label], "label": label}
        photo, label, top, left = self._crops[index]
        size = self.crop_size
        image = self._photos[photo][top:top + size, left:left + size]
        return {"image": np.ascontiguousarray(image), "label": label}

    def __repr__(self) -> str:
        holdout = f", holdout={self.holdout}" if self.holdout else ""
        return (f"DemoPhotos(split={self.split!r}, photo_size={self.photo_size}, "
                f"crop_size={self.crop_size}{holdout}, len={len(self)})")


# ----------------------------------------------------------------------------------------------
# Image folders
# ----------------------------------------------------------------------------------------------

# Header checks already done in this process: (root, digest of the sorted file list) -> {relpath:
# reason} of the unreadable files. Several sources are built over the same folder in one run
# (training, evaluation, rFID), so a folder is checked once while its file list is unchanged.
_SCAN_CACHE: dict[tuple[str, str], dict[str, str]] = {}


def check_image_header(path: str) -> Optional[str]:
    """None when PIL can open ``path`` as an image (header only, no decode), else the reason.

    Catches zero-byte files, non-images (text, random bytes, unknown formats), corrupt headers
    and decompression bombs; not truncated pixel data, which only a full decode finds.
    """
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as image:
            width, height = image.size
    except Exception as error:  # PIL raises many types for bad headers
        return describe_error(error)
    return None if width >= 1 and height >= 1 else f"empty image {width}x{height}"


def check_image_headers(paths: Sequence[str], threads: int = SCAN_THREADS) -> list:
    """``check_image_header`` of each path (threaded: it is file-system latency, not CPU)."""
    if len(paths) < 64 or threads <= 1:
        return [check_image_header(p) for p in paths]
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(check_image_header, paths, chunksize=256))


class ImageFolder(_SafeReads):
    """All image files under ``root`` (recursive), in sorted relative-path order.

    Labels: files are grouped by their top-level entry under ``root`` (root-level files form the
    group ``''``, which sorts first); the label is the group's index. So a flat folder gives label
    0 everywhere, and ``root/<class>/.../x.jpg`` gives the index of ``<class>`` in sorted order
    (shifted by one when some files also sit directly in ``root``). Hidden files and folders
    (name starting with '.') are skipped, and so are files without an image extension (README,
    .txt, ...). Decoding: see ``pil_to_rgb_uint8``.

    ``check_images``: open every file's header first (``check_image_header``) and drop the files
    PIL cannot open; they are named in the log and in ``bad_files``, and more than
    ``max_bad_fraction`` of them raises ``BadDataError`` here, before any batch. Classes are
    taken from all files found, unreadable ones included, so a bad file never shifts labels.
    Every process of a multi-process run scans the whole folder (the index must be the same
    everywhere); the measured cost is ~0.1 ms per file on a local disk, i.e. about two minutes
    for ImageNet's 1.28M training images (more on network file systems: set
    ``check_images=False`` to skip it, and let decode-time handling catch bad files). The result
    is kept for the life of the process while the folder's file list is unchanged, so building
    the same folder again (evaluation, rFID) costs only the directory walk.
    """

    def __init__(self, root: str, extensions: Sequence[str] = IMAGE_EXTENSIONS, *,
                 check_images: bool = True,
                 max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION):
        root = os.path.expanduser(str(root))
        if not os.path.isdir(root):
            raise FileNotFoundError(f"Image folder {root!r} does not exist or is not a folder.")
        extensions = tuple(e.lower() for e in extensions)
        relpaths = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for filename in filenames:
                if not filename.startswith(".") and filename.lower().endswith(extensions):
                    relpaths.append(os.path.relpath(os.path.join(dirpath, filename), root))
        if not relpaths:
            raise FileNotFoundError(
                f"No images found under {root!r} (searched recursively for files ending in "
                f"{', '.join(extensions)}, case-insensitive).")
        relpaths.sort()
        groups = [p.split(os.sep)[0] if os.sep in p else "" for p in relpaths]
        self.classes = sorted(set(groups))
        class_index = {name: i for i, name in enumerate(self.classes)}
        self.root = root
        self.check_images = bool(check_images)

        bad = []
        if check_images:
            key = (root, hashlib.sha256("\0".join(relpaths).encode()).hexdigest())
            if key not in _SCAN_CACHE:
                reasons = check_image_headers([os.path.join(root, p) for p in relpaths])
                _SCAN_CACHE[key] = {p: r for p, r in zip(relpaths, reasons) if r is not None}
            unreadable = _SCAN_CACHE[key]
            bad = [(p, unreadable[p]) for p in relpaths if p in unreadable]
            keep = [i for i, p in enumerate(relpaths) if p not in unreadable]
            relpaths = [relpaths[i] for i in keep]
            groups = [groups[i] for i in keep]
        self.paths = [os.path.join(root, p) for p in relpaths]
        self.labels = [class_index[g] for g in groups]
        self._init_safe_reads(max_bad_fraction, bad)
        self._log_scan(bad)
        total = len(self.paths) + len(bad)
        if not self.paths:
            raise BadDataError(f"Image folder {root!r}: none of its {total:,} image files can be "
                               f"opened: " + "; ".join(f"{p} ({r})" for p, r in bad[:5]))
        if len(bad) > self.max_bad_fraction * total:
            raise BadDataError(too_many_bad_message(
                f"Image folder {root!r}", len(bad), total, self.max_bad_fraction, bad,
                " (Found by opening each file's header when the folder was scanned.)"))

    def _log_scan(self, bad: list) -> None:
        if not bad:
            logger.info("ImageFolder %s: %s images%s.", self.root, f"{len(self.paths):,}",
                        "" if self.check_images else " (headers not checked)")
            return
        shown = 10
        names = ", ".join(f"{p} ({r})" for p, r in bad[:shown])
        logger.warning("ImageFolder %s: %s images, %s unreadable skipped: %s%s", self.root,
                       f"{len(self.paths):,}", f"{len(bad):,}", names,
                       f", and {len(bad) - shown:,} more (below)" if len(bad) > shown else "")
        for path, reason in bad[shown:]:
            logger.warning("ImageFolder %s: unreadable, skipped: %s (%s)", self.root, path,
                           reason)

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self, index: int) -> str:
        return os.path.relpath(self.paths[index], self.root)

    def _read(self, index: int) -> dict:
        return {"image": load_image(self.paths[index]), "label": self.labels[index]}

    def __repr__(self) -> str:
        return f"ImageFolder(root={self.root!r}, len={len(self)}, classes={len(self.classes)})"


def try_read(source, index: int) -> Optional[dict]:
    """``source.try_read(index)`` for the sources here; for any other random-access source,
    ``source[index]`` with a decode error turned into None (and a warning)."""
    if hasattr(source, "try_read"):
        return source.try_read(index)
    try:
        return source[index]
    except Exception as error:  # a foreign source: same contract, no bookkeeping
        logger.warning("Unreadable record %d of %r (%s): masked out.", index, source,
                       describe_error(error))
        return None


# ----------------------------------------------------------------------------------------------
# TFDS
# ----------------------------------------------------------------------------------------------

class TfdsImages(_SafeReads):
    """Random access to a prepared tfds dataset (array_record files), like ``tfds.data_source``.

    Reading needs no TensorFlow. The 'image' feature is decoded by tfds (PIL) and normalised to
    uint8 RGB; 'label' is used when the dataset has it, else 0. Nothing is downloaded: an
    unprepared dataset raises FileNotFoundError saying how to build it. A record whose image fails
    to decode is handled as described in the module docstring.
    """

    def __init__(self, name: str, split: str, data_dir: str | None = None, *,
                 max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION):
        with extras.needed("tfds", f"the tfds dataset {name!r}"):
            import tensorflow_datasets as tfds  # heavy import, only for this source

        self.name = name
        self.split = split
        self.data_dir = data_dir or None
        where = self.data_dir or "the default data_dir (~/tensorflow_datasets, $TFDS_DATA_DIR)"
        data_dir_flag = f" --data_dir={self.data_dir}" if self.data_dir else ""
        build_hint = (
            f"Build it first with `tfds build {name} --file_format=array_record{data_dir_flag}`. "
            f"Datasets with manual downloads (e.g. imagenet2012: ILSVRC2012_img_train.tar and "
            f"ILSVRC2012_img_val.tar) need the archives in <data_dir>/downloads/manual/ before "
            f"building; see https://www.tensorflow.org/datasets/catalog/"
            f"{name.split('/')[0].split(':')[0]}.")
        try:
            builder = tfds.builder(name, data_dir=self.data_dir)
            prepared = builder.is_prepared()
        except Exception as error:  # unknown name and no files: DatasetNotFoundError
            raise FileNotFoundError(
                f"tfds dataset {name!r} is not registered and not found in {where}. {build_hint} "
                f"({type(error).__name__}: {str(error).splitlines()[0]})") from error
        if not prepared:
            raise FileNotFoundError(
                f"tfds dataset {name!r} is not prepared in {where}. {build_hint}")
        try:
            # download=False semantics: as_data_source only reads what is on disk.
            self._source = builder.as_data_source(split=split)
        except NotImplementedError as error:  # prepared as tfrecord: no random access
            raise ValueError(
                f"tfds dataset {name!r} in {where} was prepared in a format without random "
                f"access; rebuild it with `tfds build {name} --file_format=array_record"
                f"{data_dir_flag}` (into another data_dir or after deleting the old files). "
                f"({error})") from error
        self._has_label = "label" in builder.info.features.keys()
        self._init_safe_reads(max_bad_fraction)

    def __len__(self) -> int:
        return len(self._source)

    def describe(self, index: int) -> str:
        return f"{self.name}/{self.split}[{index}]"

    def _read(self, index: int) -> dict:
        record = self._source[index]
        label = int(record["label"]) if self._has_label else 0
        return {"image": ensure_rgb_uint8(record["image"]), "label": label}

    def __repr__(self) -> str:
        return f"TfdsImages(name={self.name!r}, split={self.split!r}, len={len(self)})"
