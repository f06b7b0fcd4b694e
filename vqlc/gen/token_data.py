"""Training batches of token maps (GPT) or latents (diffusion, flow) for the generators: from an
encode workdir, or encoded from image batches as training draws them (data.tokens='on_the_fly',
the release's way).

Each image of the dataset appears once per epoch, as one of its augmented copies (the image or
its mirror image for encode.augment='flip', one of ten crops for 'ten_crop') chosen at random
per epoch and image: what a pixel pipeline's random flip gives, without encoding again. The
order and the choice are functions of the seed and the record's position only, so batches are
the same for any number of processes and a restored iterator continues exactly.

On the fly, each step's images are the tokenizer's training crops (vqlc.data.pipeline, random
crop, no flip) of the encode config's dataset, encoded by the tokenizer as they arrive: every
epoch sees new crops, at the cost of an encoder pass per step. The iterator's state is the
image pipeline's, so a resumed run draws the same crops.
"""
from __future__ import annotations

import numpy as np

from vqlc import extras
from vqlc.data import encoded, pipeline

with extras.needed("train"):
    import grain


FIELDS = {"codes": "token ids", "latents": "latents"}


class ImageCopies:
    """Random access over the images of an encode workdir: ``copy(i, j)`` -> copy j of image
    i as {field: codes int32 [h, w] or latents float32 [h, w, dim], 'label': int32}, read on
    demand."""

    def __init__(self, workdir: str, expect_tokenizer=None, field: str = "codes"):
        self.rows = encoded.EncodedDataset(workdir, expect_tokenizer)
        self.field = field
        if field not in self.rows.manifest["arrays"]:
            raise ValueError(f"{workdir} holds no {FIELDS[field]} (encode.what="
                             f"{self.rows.manifest.get('what')!r}): encode with "
                             f"--config.encode.what={field} (or both).")
        self.copies = int(self.rows.manifest["copies"])
        if len(self.rows) % self.copies:
            raise ValueError(f"{workdir}: {len(self.rows)} rows is not a whole number of "
                             f"images of {self.copies} copies.")
        self._check_layout()

    def _check_layout(self) -> None:
        """Rows must be image-major (every copy of an image next to each other), as the encode
        task writes them; anything else would pair copies of different images."""
        indices = self.rows.column("indices").reshape(-1, self.copies)
        aug = self.rows.column("aug").reshape(-1, self.copies)
        if not (indices == indices[:, :1]).all() or not (aug == np.arange(self.copies)).all():
            raise ValueError(f"{self.rows.workdir}: rows are not grouped by image with copies "
                             f"0..{self.copies - 1} in order; re-encode it.")

    def __len__(self) -> int:
        return len(self.rows) // self.copies

    def copy(self, image: int, which: int) -> dict:
        row = self.rows[image * self.copies + which]
        return {self.field: row[self.field], "label": row["label"]}


def check_labels(images: ImageCopies, num_classes: int) -> None:
    """Refuses a dataset whose labels do not fit network.num_classes (0: unconditional, any
    labels)."""
    labels = images.rows.column("labels")
    if num_classes and labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{images.rows.workdir}: labels span [{labels.min()}, {labels.max()}] "
                         f"but network.num_classes={num_classes}; set it to at least "
                         f"{labels.max() + 1}.")


class _RandomCopy(grain.transforms.RandomMap):
    def __init__(self, images: ImageCopies):
        self.images = images

    def random_map(self, image: int, rng: np.random.Generator) -> dict:
        return self.images.copy(int(image), int(rng.integers(self.images.copies)))


def make_token_iterator(images: ImageCopies, *, batch_size: int, seed: int,
                        shard_index: int = 0, shard_count: int = 1):
    """Infinite iterator of {images.field: [batch_size, ...], 'label': int32 [batch_size]}
    for this process (``batch_size`` per process), with get_state() / set_state()."""
    if len(images) == 0:
        raise ValueError(f"{images.rows.workdir} holds no images.")
    shuffle_seed, copy_seed = np.random.SeedSequence(seed).generate_state(2)
    ds = grain.MapDataset.range(len(images))
    ds = ds.shuffle(seed=int(shuffle_seed))  # a new permutation each epoch past len(images)
    ds = ds.repeat(None)
    ds = ds.random_map(_RandomCopy(images), seed=int(copy_seed))
    ds = ds[shard_index::shard_count]
    ds = ds.batch(batch_size, drop_remainder=True)
    return iter(ds.to_iter_dataset())


ON_THE_FLY = "on_the_fly"


class _EncodeBatch(grain.transforms.Map):
    """{'image': uint8 batch, 'label'} -> {'codes': int32 [B, h, w] or 'latents': float32
    [B, h, w, dim], 'label': int32 [B]}."""

    def __init__(self, tokenizer, num_classes: int, field: str):
        self.tokenizer = tokenizer
        self.num_classes = num_classes
        self.field = field

    def map(self, batch: dict) -> dict:
        labels = np.asarray(batch["label"], np.int32)
        if self.num_classes == 0:  # unconditional: every image gets the start token
            labels = np.zeros_like(labels)
        elif labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"The training data has labels in [{labels.min()}, "
                             f"{labels.max()}] but network.num_classes={self.num_classes}; set "
                             f"it to at least {labels.max() + 1}.")
        if self.field == "latents":
            return {"latents": self.tokenizer.encode_latents(batch["image"]).astype(np.float32),
                    "label": labels}
        return {"codes": self.tokenizer.encode(batch["image"]).astype(np.int32),
                "label": labels}


def make_encoding_iterator(tokenizer, data, *, num_classes: int, batch_size: int, seed: int,
                           shard_index: int = 0, shard_count: int = 1, field: str = "codes"):
    """Infinite iterator of {field: [batch_size, ...], 'label': int32 [batch_size]} encoded
    (codes or latents) from the training crops of `data` (a data config at the tokenizer's
    image size), ``batch_size`` per process, with get_state() / set_state()."""
    ds = pipeline.labelled_train_dataset(data, batch_size=batch_size, seed=seed,
                                         shard_index=shard_index, shard_count=shard_count)
    return iter(ds.map(_EncodeBatch(tokenizer, num_classes, field)))
