"""grain input pipelines: an infinite, shuffled, checkpointable training iterator and a finite,
padded, sharded evaluation iterator.

Training order. The whole dataset is shuffled with one seed (a fresh permutation per epoch), the
random crops are drawn per record from the seed and the record's GLOBAL position, and only then
is the stream split between processes: process ``p`` of ``n`` takes positions ``p, p + n, ...``.
So the union of the processes' batch ``b`` is exactly batch ``b`` of a single process with an
``n`` times larger batch: the global data order does not depend on the number of processes, and
each epoch visits every record once in total. Batches are formed before any parallelism
(threads or ``num_workers`` processes each build whole batches), so the batches are also
identical for any ``num_workers``; a saved state must be restored with the same ``num_workers``.

Bad data (see ``sources``). Training reads ``source[i]``, which replaces an undecodable record by
the next decodable one in the source's own order: a function of ``i`` only, so the contract
above holds and batches stay full. Evaluation reads ``try_read`` and turns an undecodable record
into a padded row (mask False), so it is left out of every metric. Folders are header-checked at
construction and ``data.max_bad_fraction`` bounds the unreadable share (``BadDataError``).
"""
from __future__ import annotations

import math
import signal

import numpy as np

from vqlc import extras

with extras.needed("train"):
    import grain

from vqlc.data import sources
from vqlc.data import transforms


def make_source(cfg, split: str):
    """The random-access source of ``cfg`` for ``split`` ('train' or 'eval')."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}.")
    if cfg.kind == "demo":
        return sources.DemoPhotos(
            split, photo_size=cfg.demo_photo_size, crop_size=cfg.image_size,
            holdout=float(cfg.get("demo_holdout", 0.0)))  # older workdirs' configs lack it
    if cfg.kind == "folder":
        root = cfg.path if split == "train" else (cfg.eval_path or cfg.path)
        if not root:
            raise ValueError("data.kind='folder' needs data.path (and optionally data.eval_path).")
        return sources.ImageFolder(root, check_images=cfg.get("check_images", True),
                                   max_bad_fraction=_max_bad_fraction(cfg))
    if cfg.kind == "tfds":
        tfds_split = cfg.train_split if split == "train" else cfg.eval_split
        return sources.TfdsImages(cfg.name, tfds_split, data_dir=cfg.path or None,
                                  max_bad_fraction=_max_bad_fraction(cfg))
    raise ValueError(f"Unknown data.kind {cfg.kind!r} (expected 'demo', 'folder' or 'tfds').")


def _max_bad_fraction(cfg) -> float:
    return float(cfg.get("max_bad_fraction", sources.DEFAULT_MAX_BAD_FRACTION))


def resize_shorter(cfg) -> int:
    """Resize target of the transforms; 0 for the demo, whose source already sizes its photos."""
    if cfg.kind == "demo":
        return 0
    return cfg.resize_shorter or cfg.image_size


def _derive_seeds(seed: int, count: int) -> list[int]:
    """Independent 32-bit seeds (grain wants seeds in [0, 2**32)) from one integer seed."""
    return [int(s) for s in np.random.SeedSequence(int(seed)).generate_state(count)]


def _read_options(num_workers: int) -> grain.ReadOptions:
    # Elements are whole batches, so a few threads (each building one batch) suffice and the
    # buffer stays small: it holds uint8 batches, e.g. 12.6 MB each for 64 x 256^2 images.
    threads = 4 if num_workers == 0 else 2
    return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)


def _maybe_multiprocess(ds: grain.IterDataset, num_workers: int) -> grain.IterDataset:
    if num_workers <= 0:
        return ds
    # grain's worker processes read absl flags; outside absl.app.run nothing has parsed them.
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers),
                          worker_init_fn=_ignore_sigterm)


def _ignore_sigterm(worker_index: int, worker_count: int) -> None:
    """Workers outlive a SIGTERM sent to the whole process group (SLURM, Kubernetes), so the
    main process, which catches it to save a checkpoint, still gets the batch it waits for;
    they stop when the main process closes the iterator or exits."""
    del worker_index, worker_count
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _check_args(cfg, shard_index: int, shard_count: int):
    """Fails early (before scanning folders or opening datasets) on inconsistent settings."""
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(f"Need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}.")
    if cfg.kind == "demo":
        if cfg.demo_photo_size < cfg.image_size:
            raise ValueError(f"data.demo_photo_size {cfg.demo_photo_size} < data.image_size "
                             f"{cfg.image_size}.")
    elif cfg.resize_shorter and cfg.resize_shorter < cfg.image_size:
        raise ValueError(f"data.resize_shorter {cfg.resize_shorter} < data.image_size "
                         f"{cfg.image_size}: the crop would not fit.")


def make_train_iterator(cfg, *, batch_size: int, seed: int, shard_index: int = 0,
                        shard_count: int = 1):
    """Infinite iterator of {'image': float32 [batch_size, S, S, 3] in [-1, 1]} for this process.

    ``batch_size`` is the per-process batch. The iterator has ``get_state()`` / ``set_state()``;
    a restored iterator yields exactly the batches the original would have yielded next.
    """
    ds = _train_dataset(cfg, batch_size=batch_size, seed=seed, shard_index=shard_index,
                        shard_count=shard_count, keep_label=False)
    return iter(ds.map(transforms.NormalizeBatch()))  # in this process: workers pass uint8


def labelled_train_dataset(cfg, *, batch_size: int, seed: int, shard_index: int = 0,
                           shard_count: int = 1) -> grain.IterDataset:
    """The crops make_train_iterator draws, as batches of {'image': uint8 [batch_size, S, S, 3],
    'label': int32 [batch_size]} (what Tokenizer.encode takes), before iteration."""
    return _train_dataset(cfg, batch_size=batch_size, seed=seed, shard_index=shard_index,
                          shard_count=shard_count, keep_label=True)


def _train_dataset(cfg, *, batch_size: int, seed: int, shard_index: int, shard_count: int,
                   keep_label: bool) -> grain.IterDataset:
    _check_args(cfg, shard_index, shard_count)
    source = make_source(cfg, "train")
    if len(source) == 0:
        raise ValueError(f"Training source {source!r} is empty.")
    shuffle_seed, crop_seed = _derive_seeds(seed, 2)
    ds = grain.MapDataset.source(source)
    ds = ds.shuffle(seed=shuffle_seed)  # indices past len(source) get a new permutation per epoch
    ds = ds.repeat(None)
    ds = ds.random_map(transforms.TrainTransform(cfg.image_size, resize_shorter(cfg),
                                                 keep_label=keep_label), seed=crop_seed)
    ds = ds[shard_index::shard_count]
    ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds.to_iter_dataset(_read_options(cfg.num_workers))
    return _maybe_multiprocess(ds, cfg.num_workers)


def num_eval_examples(cfg) -> int:
    """Number of evaluation examples (over all processes), after ``eval_max_images``."""
    count = len(make_source(cfg, "eval"))
    if cfg.eval_max_images:
        count = min(count, int(cfg.eval_max_images))
    return count


class _EvalRecord(grain.transforms.Map):
    """Position in the padded shard -> {'image': image_fn(record), 'mask': True}, or a zero
    image of ``pad_shape``/``pad_dtype`` with mask False (padding, or a record that cannot be
    decoded: it is logged by the source and left out of the metrics)."""

    def __init__(self, source, indices: np.ndarray, image_fn, pad_shape: tuple, pad_dtype):
        self.source = source
        self.indices = indices
        self.image_fn = image_fn
        self.pad_shape = tuple(pad_shape)
        self.pad_dtype = pad_dtype

    def map(self, position: int) -> dict:
        index = int(self.indices[position])
        record = None if index < 0 else sources.try_read(self.source, index)
        if record is None:
            return {"image": np.zeros(self.pad_shape, self.pad_dtype), "mask": np.bool_(False)}
        return {"image": self.image_fn(record["image"]), "mask": np.bool_(True)}


class _CentreCrop:
    """The evaluation transform as a picklable image -> image function (for grain workers)."""

    def __init__(self, transform: transforms.EvalTransform):
        self.transform = transform

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return self.transform.map({"image": image})["image"]


def eval_shard_indices(num_examples: int, batch_size: int, shard_index: int,
                       shard_count: int) -> np.ndarray:
    """Example indices of one shard, strided, padded with -1 to a whole number of batches.

    Every shard gets the same number of batches (ceil(ceil(N / shards) / batch_size)) so that all
    processes run the same number of evaluation steps (collectives must match).
    """
    per_shard = math.ceil(num_examples / shard_count)
    num_batches = math.ceil(per_shard / batch_size)
    indices = np.full(num_batches * batch_size, -1, dtype=np.int64)
    mine = np.arange(shard_index, num_examples, shard_count, dtype=np.int64)
    indices[:len(mine)] = mine
    return indices


def make_eval_iterator(cfg, *, batch_size: int, shard_index: int = 0, shard_count: int = 1):
    """Finite iterator of {'image': float32 [batch_size, S, S, 3], 'mask': bool [batch_size]}.

    Deterministic. Process ``p`` of ``n`` evaluates examples ``p, p + n, ...`` of the first
    ``num_eval_examples(cfg)``; the tail is padded with zero images whose mask is False, and so
    is any example that cannot be decoded (named in the log). Over all processes every example
    appears exactly once, and all yield the same number of batches.
    """
    size = cfg.image_size
    crop = _CentreCrop(transforms.EvalTransform(size, resize_shorter(cfg)))
    ds = _eval_dataset(cfg, crop, (size, size, 3), np.uint8, batch_size=batch_size,
                       shard_index=shard_index, shard_count=shard_count)
    return _closing(iter(ds.map(transforms.NormalizeBatch())))


def make_eval_source_iterator(cfg, image_fn, image_shape: tuple, image_dtype, *, batch_size: int,
                              shard_index: int = 0, shard_count: int = 1):
    """Like :func:`make_eval_iterator`, over the same examples in the same order, but each
    example is ``image_fn(raw source image)`` instead of the centre crop (e.g. the raw
    validation images resized for Inception: the release's rFID reference).

    ``image_fn`` maps uint8 [H, W, 3] of any size to an array of ``image_shape`` and
    ``image_dtype`` (padding is zeros of that shape); it must be picklable when
    ``cfg.num_workers > 0``. Yields {'image': [batch_size, *image_shape], 'mask'}.
    """
    ds = _eval_dataset(cfg, image_fn, image_shape, image_dtype, batch_size=batch_size,
                       shard_index=shard_index, shard_count=shard_count)
    return _closing(iter(ds))


def num_eval_batches(cfg, batch_size: int, shard_count: int = 1) -> int:
    """How many batches each process's evaluation iterator yields."""
    return len(eval_shard_indices(num_eval_examples(cfg), batch_size, 0, shard_count)) // batch_size


def _eval_dataset(cfg, image_fn, pad_shape, pad_dtype, *, batch_size, shard_index, shard_count):
    _check_args(cfg, shard_index, shard_count)
    source = make_source(cfg, "eval")
    count = len(source)
    if cfg.eval_max_images:
        count = min(count, int(cfg.eval_max_images))
    indices = eval_shard_indices(count, batch_size, shard_index, shard_count)
    record = _EvalRecord(source, indices, image_fn, pad_shape, pad_dtype)
    ds = grain.MapDataset.range(len(indices)).map(record)
    ds = ds.batch(batch_size, drop_remainder=False)  # always whole: len(indices) % batch_size == 0
    ds = ds.to_iter_dataset(_read_options(cfg.num_workers))
    return _maybe_multiprocess(ds, cfg.num_workers)


def _closing(iterator):
    """Yields from a grain iterator and closes it (its worker processes) once exhausted."""
    try:
        yield from iterator
    finally:
        iterator.close()
