"""Patch features of a dataset, streamed to disk shards: resumable, multi-device, multi-process.

Layout of a features folder (``<workdir>/features/`` for the codebook task)::

    spec.json                      what produced the features (backbone, pooling, data, ...)
    shard-000012-p001/             shard 12, written by process 1; appears only when complete
        features.npy               [n, D] float32 or float16, n = images x rows_per_image
        labels.npy                 int32 [n], the source's label of each row's image
        indices.npy                int64 [n], the source index of each row's image
    manifest-p001.json             the shards process 1 holds, rewritten after each shard

Shard ``s`` holds images ``[s * images_per_shard, (s + 1) * images_per_shard)`` of the source
in order (no shuffle), and process ``p`` of ``n`` extracts the shards with ``s % n == p``. So
the content of a shard depends on neither the number of processes nor the batch size, and a
re-run skips every shard already on disk: after a kill nothing is lost or duplicated. Each
process runs its own shards on its local devices (the batch split over a data mesh), so
processes never wait for each other. A shard is written to a temporary folder and renamed
into place, so readers never see half of one. Host memory holds one shard at a time.
"""
from __future__ import annotations

import glob
import itertools
import json
import logging
import os
import re
import shutil
import time
from typing import Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vqlc import extras

with extras.needed("train"):
    import grain

from vqlc import atomic_io, parallel
from vqlc.data import shards, transforms

SPEC_FILE = "spec.json"
SPEC_FORMAT = 1
_SHARD_RE = re.compile(r"^shard-(\d{6})-p(\d{3,})$")
DTYPES = ("float32", "float16")


# ----------------------------------------------------------------------------------------------
# Pooling
# ----------------------------------------------------------------------------------------------

def check_pool(grid_size: int, window: int) -> int:
    """Validates an average-pool window for a grid; returns the pooled grid size."""
    if window < 1 or grid_size % window:
        raise ValueError(f"features.pool={window} does not divide the backbone's "
                         f"{grid_size}x{grid_size} patch grid; pick a divisor of {grid_size}.")
    return grid_size // window


def pool_patches(features: jax.Array, grid_size: int, window: int) -> jax.Array:
    """Average pool of non-overlapping ``window`` x ``window`` blocks of the patch grid.

    features: [B, grid_size**2, D] in row-major grid order -> float32 [B, (grid/window)**2, D],
    still row-major. window 4 on CLIP's 16x16 grid is the release's pooling (16 vectors/image).
    """
    pooled = check_pool(grid_size, window)
    features = features.astype(jnp.float32)
    if window == 1:
        return features
    b, _, d = features.shape
    blocks = features.reshape(b, pooled, window, pooled, window, d)
    return blocks.mean(axis=(2, 4)).reshape(b, pooled * pooled, d)


# ----------------------------------------------------------------------------------------------
# Host-side records (grain workers)
# ----------------------------------------------------------------------------------------------

class _Record(grain.transforms.Map):
    """Position in this process's work list -> {'image', 'label', 'index'}, preprocessed."""

    def __init__(self, source, indices: np.ndarray, preprocess: Callable,
                 random_crop: Optional[tuple], seed: int):
        self.source = source
        self.indices = indices
        self.preprocess = preprocess
        self.random_crop = random_crop
        self.seed = seed

    def map(self, position: int) -> dict:
        index = int(self.indices[position])
        record = self.source[index]
        image = record["image"]
        if self.random_crop is not None:
            # The tokenizer's training transform, seeded by the image's index: deterministic,
            # so a resumed extraction gives the same crops.
            size, resize = self.random_crop
            image = transforms.seeded_train_crop(image, size, resize, self.seed, index)
        return {"image": np.asarray(self.preprocess(image), np.uint8),
                "label": np.int32(record["label"]), "index": np.int64(index)}


# ----------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------

def shard_name(shard: int, process_index: int) -> str:
    return f"shard-{shard:06d}-p{process_index:03d}"


def _completed_shards(directory: str) -> dict[int, str]:
    """Shard index -> folder name of every complete shard on disk (lowest name on duplicates)."""
    done = {}
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else ():
        match = _SHARD_RE.match(name)
        if match and os.path.isdir(os.path.join(directory, name)):
            done.setdefault(int(match.group(1)), name)
    return done


def _check_or_write_spec(directory: str, spec: dict) -> None:
    """Refuses to mix features made by different settings in one folder."""
    shards.check_or_write_spec(
        os.path.join(directory, SPEC_FILE), spec, what="features",
        remedy="Delete that folder, or point features.dir at a new one, to extract with these "
               "settings.")


def _write_shard(directory: str, shard: int, process_index: int, features: np.ndarray,
                 labels: np.ndarray, indices: np.ndarray) -> str:
    """Writes one shard under a temporary name and renames it into place (atomic)."""
    name = shard_name(shard, process_index)
    tmp = os.path.join(directory, f".tmp-{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    np.save(os.path.join(tmp, "features.npy"), features)
    np.save(os.path.join(tmp, "labels.npy"), labels.astype(np.int32))
    np.save(os.path.join(tmp, "indices.npy"), indices.astype(np.int64))
    os.replace(tmp, os.path.join(directory, name))
    return name


def _write_manifest(directory: str, process_index: int, rows_per_image: int) -> None:
    """Lists this process's complete shards (an index for tools; readers also scan folders)."""
    entries = []
    for shard, name in sorted(_completed_shards(directory).items()):
        if name.endswith(f"-p{process_index:03d}"):
            labels = np.load(os.path.join(directory, name, "labels.npy"), mmap_mode="r")
            entries.append({"shard": shard, "name": name, "rows": int(labels.shape[0]),
                            "images": int(labels.shape[0]) // rows_per_image})
    atomic_io.atomic_write_json(os.path.join(directory, f"manifest-p{process_index:03d}.json"),
                                {"process_index": process_index, "shards": entries},
                                sort_keys=True)


def extract_features(backbone, source, directory: str, *, pool: int = 1, batch_size: int = 64,
                     images_per_shard: int = 1024, max_images: int = 0,
                     dtype: str = "float32", random_crop: Optional[tuple] = None, seed: int = 0,
                     num_workers: int = 0, dataset: Optional[dict] = None,
                     devices: Optional[Sequence] = None, process_index: Optional[int] = None,
                     process_count: Optional[int] = None,
                     progress: bool = True) -> "FeatureShards | None":
    """Extracts (pooled) patch features of ``source`` into shards under ``directory``.

    Args:
      backbone: a ``backbones.Backbone``.
      source: random access, ``source[i] -> {'image': uint8 HxWx3, 'label': int}``.
      pool: average-pool window over the patch grid (1 = none).
      batch_size: global images per step; each process runs ``batch_size / process_count``,
        split over its local devices.
      images_per_shard: images per shard file (host memory holds one shard).
      max_images: only the first ``max_images`` images (0 = all).
      dtype: on-disk dtype, 'float32' or 'float16'.
      random_crop: None (the backbone's own resize / centre crop only), or
        ``(image_size, resize_shorter)``: the tokenizer's training crop first, seeded by ``seed``
        and the image index.
      dataset: a description of the data, stored in spec.json (part of the resume check).
      devices: local devices for the data mesh (default: all of this process's).
    Returns:
      A ``FeatureShards`` reader when every shard of every process is on disk, else None (other
      processes still running).
    """
    if dtype not in DTYPES:
        raise ValueError(f"features.dtype={dtype!r}; valid: {', '.join(DTYPES)}.")
    if images_per_shard < 1:
        raise ValueError(f"features.images_per_shard must be >= 1, got {images_per_shard}.")
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    pooled = check_pool(backbone.grid_size, pool)
    rows_per_image = pooled * pooled
    num_images = len(source) if not max_images else min(len(source), int(max_images))
    if num_images < 1:
        raise ValueError(f"No images to extract features from (source {source!r}).")
    num_shards = shards.num_shards(num_images, images_per_shard)
    mesh = parallel.make_mesh(devices=devices if devices is not None else jax.local_devices())
    num_devices = parallel.batch_devices(mesh)
    if batch_size % process_count or (batch_size // process_count) % num_devices:
        raise ValueError(f"features.batch_size={batch_size} must be divisible by the "
                         f"{process_count} processes x {num_devices} local devices.")
    local_batch = batch_size // process_count

    spec = {"format": SPEC_FORMAT, "backbone": backbone.spec, "pool": int(pool),
            "rows_per_image": rows_per_image, "feature_dim": int(backbone.feature_dim),
            "dtype": dtype, "num_images": num_images, "images_per_shard": int(images_per_shard),
            "num_shards": num_shards, "dataset": dataset or {"source": repr(source)},
            "random_crop": None if random_crop is None else {
                "image_size": int(random_crop[0]), "resize_shorter": int(random_crop[1]),
                "seed": int(seed)}}
    _check_or_write_spec(directory, spec)
    for stale in glob.glob(os.path.join(directory, f".tmp-shard-*-p{process_index:03d}")):
        shutil.rmtree(stale, ignore_errors=True)  # a shard cut short by a kill

    done = _completed_shards(directory)
    pending = [s for s in range(process_index, num_shards, process_count) if s not in done]
    _write_manifest(directory, process_index, rows_per_image)
    if pending:
        logging.info("Features: %d of this process's %d shards to extract (%d images each, "
                     "%d shards in all) into %s", len(pending),
                     len(range(process_index, num_shards, process_count)), images_per_shard,
                     num_shards, directory)
        _run(backbone, source, directory, pending, num_images, images_per_shard, pool,
             rows_per_image, local_batch, mesh, np.dtype(dtype), random_crop, seed, num_workers,
             process_index, progress)
    done = _completed_shards(directory)
    if len(done) < num_shards:
        return None
    return FeatureShards(directory)


_shard_range = shards.shard_range


def _run(backbone, source, directory, pending, num_images, images_per_shard, pool,
         rows_per_image, local_batch, mesh, dtype, random_crop, seed, num_workers,
         process_index, progress):
    indices = np.concatenate([np.arange(r.start, r.stop, dtype=np.int64) for r in (
        _shard_range(s, num_images, images_per_shard) for s in pending)])
    record = _Record(source, indices, backbone.preprocess_image, random_crop, seed)
    ds = grain.MapDataset.range(len(indices)).map(record)
    ds = ds.batch(local_batch, drop_remainder=False)
    threads = 4 if num_workers <= 0 else 2
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                              prefetch_buffer_size=2 * threads))
    if num_workers > 0:
        from absl import flags
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))

    grid = backbone.grid_size

    def step(params, images):
        return pool_patches(backbone.features_fn(params, images), grid, pool)

    step = jax.jit(step, in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
                   out_shardings=parallel.replicated(mesh))
    params = jax.device_put(backbone.params, parallel.replicated(mesh))
    size = backbone.image_size
    buffers = {"features": [], "label": [], "index": []}
    buffered = 0  # images in `buffers`
    shard_iter = iter(pending)
    shard = next(shard_iter)
    need = len(_shard_range(shard, num_images, images_per_shard))
    start, images_done, last_log = time.time(), 0, time.time()
    bar = None
    if progress:
        with extras.needed("train", "the progress bar"):
            import tqdm
        bar = tqdm.tqdm(total=len(indices), unit="img", dynamic_ncols=True, desc="features")
    iterator = iter(ds)
    try:
        # One batch in flight: the next batch is dispatched before the previous one's features
        # are copied to the host, so the accelerator does not wait on the host's shard work.
        in_flight = None
        for batch in itertools.chain(iterator, [None]):
            launched = None
            if batch is not None:
                images = batch["image"]
                if images.shape[1:] != (size, size, 3):
                    raise ValueError(f"Preprocessed images are {images.shape[1:]}, the backbone "
                                     f"wants {(size, size, 3)}.")
                n_new = images.shape[0]
                if n_new < local_batch:  # the last batch: pad so the step compiles once
                    images = np.concatenate([images, np.zeros(
                        (local_batch - n_new, size, size, 3), np.uint8)])
                launched = (step(params, jax.device_put(images, parallel.batch_sharded(mesh))),
                            n_new, batch["label"], batch["index"])
            if in_flight is None:
                in_flight = launched
                continue
            out, n, batch_labels, batch_indices = in_flight
            in_flight = launched
            out = np.asarray(out)[:n]
            if not np.all(np.isfinite(out)):
                raise FloatingPointError("Non-finite features: check the backbone weights.")
            buffers["features"].append(out.astype(dtype))
            buffers["label"].append(batch_labels)
            buffers["index"].append(batch_indices)
            buffered += n
            while shard is not None and buffered >= need:
                feats = np.concatenate(buffers["features"])
                labels = np.concatenate(buffers["label"])
                idx = np.concatenate(buffers["index"])
                expected = np.arange(shard * images_per_shard,
                                     shard * images_per_shard + need)
                if not np.array_equal(idx[:need], expected):  # order is the whole resume story
                    raise RuntimeError(f"Shard {shard}: images out of order.")
                name = _write_shard(
                    directory, shard, process_index,
                    feats[:need].reshape(need * rows_per_image, -1),
                    np.repeat(labels[:need], rows_per_image),
                    np.repeat(idx[:need], rows_per_image))
                _write_manifest(directory, process_index, rows_per_image)
                buffers = {"features": [feats[need:]], "label": [labels[need:]],
                           "index": [idx[need:]]}
                buffered -= need
                images_done += need
                elapsed = time.time() - start
                if bar is None or time.time() - last_log > 60:
                    last_log = time.time()
                    logging.info("Features: wrote %s (%d/%d images of this process, %.1f img/s)",
                                 name, images_done, len(indices), images_done / max(elapsed, 1e-9))
                shard = next(shard_iter, None)
                need = (len(_shard_range(shard, num_images, images_per_shard))
                        if shard is not None else 0)
            if bar is not None:
                bar.update(n)
                bar.set_postfix(img_s=f"{bar.n / max(time.time() - start, 1e-9):.1f}")
    finally:
        if bar is not None:
            bar.close()
        if hasattr(iterator, "close"):
            iterator.close()
    if shard is not None:
        raise RuntimeError(f"The data ended before shard {shard} was complete.")
    elapsed = time.time() - start
    logging.info("Features: %d images in %.1f s (%.1f img/s)", images_done, elapsed,
                 images_done / max(elapsed, 1e-9))


# ----------------------------------------------------------------------------------------------
# Reader
# ----------------------------------------------------------------------------------------------

class FeatureShards:
    """Reads a features folder written by ``extract_features``: rows in image order.

    Feature files are memory-mapped, so opening costs nothing; ``iter_chunks`` streams with
    constant memory and ``load(rows)`` gathers rows without reading the rest.
    """

    def __init__(self, directory: str):
        path = os.path.join(directory, SPEC_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: {directory!r} is not a features folder "
                                    "written by vqlc.codebook.features.extract_features.")
        with open(path) as f:
            self.spec = json.load(f)
        self.directory = directory
        done = _completed_shards(directory)
        missing = [s for s in range(self.spec["num_shards"]) if s not in done]
        if missing:
            raise ValueError(
                f"{directory} is incomplete: {len(missing)} of {self.spec['num_shards']} shards "
                f"missing (first: {missing[:5]}). Re-run the extraction to resume it.")
        self._paths = [os.path.join(directory, done[s]) for s in range(self.spec["num_shards"])]
        rows = [np.load(os.path.join(p, "labels.npy"), mmap_mode="r").shape[0]
                for p in self._paths]
        self._offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        expected = self.spec["num_images"] * self.spec["rows_per_image"]
        if self.num_rows != expected:
            raise ValueError(f"{directory}: {self.num_rows} rows on disk, spec says {expected}.")

    @property
    def num_rows(self) -> int:
        return int(self._offsets[-1])

    @property
    def dim(self) -> int:
        return int(self.spec["feature_dim"])

    @property
    def num_images(self) -> int:
        return int(self.spec["num_images"])

    @property
    def rows_per_image(self) -> int:
        return int(self.spec["rows_per_image"])

    @property
    def nbytes_float32(self) -> int:
        return self.num_rows * self.dim * 4

    def _features(self, i: int) -> np.ndarray:
        return np.load(os.path.join(self._paths[i], "features.npy"), mmap_mode="r")

    def _concat(self, name: str) -> np.ndarray:
        return np.concatenate([np.load(os.path.join(p, name)) for p in self._paths])

    def labels(self) -> np.ndarray:
        """int32 [num_rows]: each row's image label."""
        return self._concat("labels.npy")

    def image_indices(self) -> np.ndarray:
        """int64 [num_rows]: each row's image index in the source."""
        return self._concat("indices.npy")

    def iter_chunks(self, rows_per_chunk: int) -> Iterator[np.ndarray]:
        """float32 [n, D] chunks of ``rows_per_chunk`` rows (the last may be shorter), in order."""
        if rows_per_chunk < 1:
            raise ValueError(f"rows_per_chunk must be >= 1, got {rows_per_chunk}.")
        pieces, held = [], 0
        for i in range(len(self._paths)):
            mm = self._features(i)
            pos = 0
            while pos < mm.shape[0]:
                take = min(rows_per_chunk - held, mm.shape[0] - pos)
                pieces.append(np.asarray(mm[pos:pos + take], np.float32))
                held += take
                pos += take
                if held == rows_per_chunk:
                    yield pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
                    pieces, held = [], 0
        if held:
            yield np.concatenate(pieces)

    def load(self, rows=None) -> np.ndarray:
        """float32 [len(rows), D]: the given rows (any order, repeats allowed), or all rows."""
        if rows is None:
            out = np.empty((self.num_rows, self.dim), np.float32)
            for i in range(len(self._paths)):
                out[self._offsets[i]:self._offsets[i + 1]] = self._features(i)
            return out
        rows = np.asarray(rows, np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise IndexError(f"rows out of range [0, {self.num_rows}).")
        out = np.empty((rows.size, self.dim), np.float32)
        shard_of = np.searchsorted(self._offsets, rows, side="right") - 1
        for i in np.unique(shard_of):
            where = np.flatnonzero(shard_of == i)
            local = rows[where] - self._offsets[i]
            order = np.argsort(local, kind="stable")  # ascending reads from the memmap
            out[where[order]] = self._features(int(i))[local[order]]
        return out

    def mean_norm(self, rows_per_chunk: int = 65536) -> float:
        """Mean Euclidean norm of the rows (streaming, float64 accumulation)."""
        total = 0.0
        for chunk in self.iter_chunks(rows_per_chunk):
            total += float(np.linalg.norm(chunk.astype(np.float64), axis=1).sum())
        return total / max(self.num_rows, 1)

    def class_sorted_memmap(self, path: str, rows_per_chunk: int = 65536):
        """Writes the rows grouped by label (stable) into one .npy; returns (memmap, labels).

        For per-class k-means on more features than fit in memory: each class becomes one
        contiguous block of the file. Uses the on-disk dtype, so the file is as large as the
        shards. Reused when it already exists with the right size.
        """
        labels = self.labels()
        order = np.argsort(labels, kind="stable")
        dtype = np.dtype(self.spec["dtype"])
        if not os.path.exists(path):
            tmp = path + ".tmp.npy"
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype,
                                            shape=(self.num_rows, self.dim))
            destination = np.empty_like(order)
            destination[order] = np.arange(order.size)
            start = 0
            for chunk in self.iter_chunks(rows_per_chunk):
                dest = destination[start:start + len(chunk)]
                out[dest] = chunk.astype(dtype)
                start += len(chunk)
            out.flush()
            del out
            os.replace(tmp, path)
        mm = np.load(path, mmap_mode="r")
        if mm.shape != (self.num_rows, self.dim):
            raise ValueError(f"{path} has shape {mm.shape}; delete it to rebuild.")
        return mm, labels[order]
