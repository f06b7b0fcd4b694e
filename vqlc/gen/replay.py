"""`replay`: a generator that returns the tokenizer's codes (or latents) of real images.

For each class it keeps a bank of the first ``generator.replay.per_class`` images of that
class in the data (the tokenizer's own data config unless ``generator.replay.data.kind`` is
set), cropped as in training (``crop='random'``, seeded per image) or centrally, and encoded
once at load. ``sample`` draws, for each sample, one bank entry of its class from the sample's
own key. Decoded, its samples are the tokenizer's reconstructions of real images: the toy
generator of the tests and a sanity baseline (its generation FID is a reconstruction FID).
With ``per_class=1`` and class-balanced sampling the samples are exactly the bank's
reconstructions, each repeated ``sample.per_class`` times (``reference_images``), so FID
against those images' statistics is 0 up to float error.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vqlc import parallel
from vqlc.data import pipeline, transforms
from vqlc.gen.generator import Generator

CROPS = ("random", "center")


def check_config(config) -> None:
    r = config.generator.replay
    if r.space not in ("codes", "latents"):
        raise ValueError(f"generator.replay.space={r.space!r}; valid: codes, latents.")
    if r.crop not in CROPS:
        raise ValueError(f"generator.replay.crop={r.crop!r}; valid: {', '.join(CROPS)}.")
    if r.per_class < 1:
        raise ValueError(f"generator.replay.per_class must be >= 1, got {r.per_class}.")
    if r.split not in ("train", "eval"):
        raise ValueError(f"generator.replay.split={r.split!r}; valid: train, eval.")


def _labels(source, index: int) -> int:
    labels = getattr(source, "labels", None)  # ImageFolder knows them without decoding
    return int(labels[index]) if labels is not None else int(source[index]["label"])


def bank_indices(source, num_classes: int, per_class: int) -> np.ndarray:
    """int64 [num_classes, per_class]: the first `per_class` records of each class, in the
    source's order."""
    chosen = [[] for _ in range(num_classes)]
    missing = num_classes
    for i in range(len(source)):
        label = _labels(source, i)
        if 0 <= label < num_classes and len(chosen[label]) < per_class:
            chosen[label].append(i)
            if len(chosen[label]) == per_class:
                missing -= 1
                if not missing:
                    break
    short = [c for c in range(num_classes) if len(chosen[c]) < per_class]
    if short:
        raise ValueError(
            f"replay: {len(short)} of {num_classes} classes have fewer than "
            f"generator.replay.per_class={per_class} images in {source!r} (class {short[0]} has "
            f"{len(chosen[short[0]])}); lower per_class or sample.num_classes.")
    return np.asarray(chosen, np.int64)


def bank_images(data, split: str, indices: np.ndarray, crop: str, seed: int) -> np.ndarray:
    """uint8 [*indices.shape, S, S, 3]: the records at `indices`, cropped as configured."""
    source = pipeline.make_source(data, split)
    resize = pipeline.resize_shorter(data)
    if crop == "random":
        transform = transforms.TrainTransform(data.image_size, resize)
        crop_fn = lambda rec, i: transform.random_map(  # noqa: E731
            rec, np.random.default_rng([int(seed), int(i)]))
    else:
        transform = transforms.EvalTransform(data.image_size, resize)
        crop_fn = lambda rec, i: transform.map(rec)  # noqa: E731
    flat = indices.reshape(-1)
    images = np.stack([crop_fn(source[int(i)], i)["image"] for i in flat])
    return images.reshape(*indices.shape, *images.shape[1:])


class Replay(Generator):

    def __init__(self, config, tokenizer, images: np.ndarray, indices: np.ndarray, mesh,
                 chunk: int = 256):
        r = config.generator.replay
        self.space = r.space
        self.config = config
        self.images = images  # uint8 [C, M, S, S, 3]
        self.indices = indices  # the records they are, [C, M]
        num_classes, per_class = images.shape[:2]
        self.per_class = per_class
        flat = images.reshape(-1, *images.shape[2:])
        encode = tokenizer.encode if self.space == "codes" else tokenizer.encode_latents
        bank = np.concatenate([encode(flat[i:i + chunk]) for i in range(0, len(flat), chunk)])
        bank = bank.reshape(num_classes, per_class, *bank.shape[1:])
        self.variables = {"bank": jax.device_put(bank, parallel.replicated(mesh))}
        self._identity = {"kind": "replay", "space": self.space, "per_class": int(per_class),
                          "split": r.split, "crop": r.crop, "seed": int(r.seed),
                          "data": _data_description(_data_config(config, tokenizer), r.split)}

    @classmethod
    def load(cls, config, workdir: str, *, tokenizer, mesh) -> "Replay":
        del workdir  # nothing trained: the bank is made from the data
        check_config(config)
        r = config.generator.replay
        data = _data_config(config, tokenizer)
        if data.image_size != tokenizer.image_size:
            raise ValueError(f"generator.replay.data.image_size={data.image_size} but the "
                             f"tokenizer works at {tokenizer.image_size} px.")
        indices = bank_indices(pipeline.make_source(data, r.split), config.sample.num_classes,
                               r.per_class)
        images = bank_images(data, r.split, indices, r.crop, r.seed)
        return cls(config, tokenizer, images, indices, mesh)

    def choice(self, keys) -> jax.Array:
        """int32 [B]: the bank entry each sample draws, from its own key."""
        return jax.vmap(lambda k: jax.random.randint(k, (), 0, self.per_class))(keys)

    def sample(self, variables, keys, labels):
        bank = variables["bank"]
        return bank[jnp.asarray(labels, jnp.int32), self.choice(keys)]

    def reference_images(self) -> np.ndarray:
        """uint8 [C, M, S, S, 3]: the bank images themselves (before the tokenizer)."""
        return self.images

    def identity(self) -> dict:
        return dict(self._identity)


def _data_config(config, tokenizer):
    data = config.generator.replay.data
    return tokenizer.config.data if not data.kind else data


def _data_description(data, split: str) -> dict:
    desc = {"kind": data.kind, "split": split, "image_size": int(data.image_size)}
    for field in ("path", "eval_path") + (("name",) if data.kind == "tfds" else ()):
        if data.get(field):
            desc[field] = data[field]
    return desc
