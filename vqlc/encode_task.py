"""The `encode` task: a trained tokenizer over a dataset -> resumable shards of tokens / latents.

    python -m vqlc.main --config=encode_imagenet --workdir=runs/in_tokens \\
        --config.tokenizer.workdir=runs/lc

Writes ``<workdir>/manifest.json`` and ``<workdir>/shards/shard_XXXXX.npz`` (layout: see
vqlc/data/encoded.py, whose ``EncodedDataset`` reads them back for training).

Images: the tokenizer's ``image_size``; ``encode.crop='center'`` is the evaluation transform
(shorter side resized to ``data.resize_shorter``, then the central square), ``'random'`` the
training crop drawn from ``(config.seed, image index)`` alone. ``encode.augment`` adds copies:
'flip' (the mirrored image, aug 1) or 'ten_crop' (LlamaGen's: shorter side to
int(image_size * crop_scale), central square, its four corner and central crops, then the same
five of its mirror image; aug 0..9).

Shards and resume. Shard ``s`` holds images ``[s * images_per_shard, (s + 1) *
images_per_shard)`` (every copy of each), so it depends on neither the batch size nor the
process count; a re-run skips the shards on disk and redoes the rest: killed and re-run, no
image is lost or doubled. The manifest is written at the start and checked on a re-run: another
tokenizer (workdir, step or config) or other settings are refused.

Devices and processes. Every process runs every pending shard together: each global batch of
``encode.batch_size`` images is split into equal per-process blocks (the last batch of a shard
is padded), every process encodes its block on its devices of the one mesh, the rows are
gathered and only process 0 writes. So processes always agree on the collectives, and there is
one writer, as for metrics and checkpoints. Images that cannot be decoded are left out (logged;
``data.max_bad_fraction`` bounds them).
"""
from __future__ import annotations

import logging
import os
import time

import jax
import ml_collections
import numpy as np

from vqlc import extras

with extras.needed("train"):
    import grain

from vqlc import atomic_io, parallel, storage
from vqlc.data import encoded, pipeline, shards, sources, transforms

WHATS = ("codes", "latents", "both")
AUGMENTS = {"none": 1, "flip": 2, "ten_crop": 10}
CROPS = ("center", "random")


def base_config() -> ml_collections.ConfigDict:
    """Defaults of every encode config."""
    from vqlc import config_base
    c = ml_collections.ConfigDict()
    c.task = "encode"
    c.seed = 0  # encode.crop='random' only: crops are drawn from (seed, image index)

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.workdir = ""  # a training workdir (or vqlc.convert's output)
    c.tokenizer.step = -1  # checkpoint step; -1 = the newest

    c.data = config_base.get_base_config().data  # same fields as the tokenizer's data
    c.data.image_size = 0  # 0 = the tokenizer's image_size (the only size accepted)
    c.data.resize_shorter = 0  # 0 = image_size (the evaluation transform)

    c.encode = ml_collections.ConfigDict()
    c.encode.what = "both"  # codes | latents | both (one encoder pass)
    c.encode.augment = "flip"  # none | flip | ten_crop
    c.encode.crop_scale = 1.1  # ten_crop: shorter side resized to int(image_size * crop_scale)
    c.encode.crop = "center"  # center | random (the training crop, seeded per image)
    c.encode.split = "train"  # train | eval (data.train_split / data.eval_split)
    c.encode.images_per_shard = 5000
    c.encode.batch_size = 256  # global images per step; the encoder sees batch x copies crops
    c.encode.max_images = 0  # the first max_images images; 0 = all
    c.encode.progress = True

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # devices on the data axis; -1 = all (of every process)
    c.mesh.model = 1  # devices an LC codebook is split over along K (vqlc.parallel)
    return c


def check_config(config) -> None:
    """Fails on settings that cannot work, before the tokenizer or any image is read."""
    e = config.encode
    if not config.tokenizer.workdir:
        raise ValueError("config.tokenizer.workdir is empty: pass the tokenizer's training "
                         "workdir, e.g. --config.tokenizer.workdir=runs/demo.")
    if e.what not in WHATS:
        raise ValueError(f"encode.what={e.what!r}; valid: {', '.join(WHATS)}.")
    if e.augment not in AUGMENTS:
        raise ValueError(f"encode.augment={e.augment!r}; valid: {', '.join(AUGMENTS)}.")
    if e.crop not in CROPS:
        raise ValueError(f"encode.crop={e.crop!r}; valid: {', '.join(CROPS)}.")
    if e.augment == "ten_crop" and e.crop != "center":
        raise ValueError("encode.augment='ten_crop' makes its own crops; set encode.crop='center'.")
    if e.augment == "ten_crop" and e.crop_scale < 1.0:
        raise ValueError(f"encode.crop_scale={e.crop_scale} must be >= 1 (the crops must fit).")
    if e.split not in ("train", "eval"):
        raise ValueError(f"encode.split={e.split!r}; valid: train, eval.")
    for name in ("images_per_shard", "batch_size"):
        if e[name] < 1:
            raise ValueError(f"encode.{name} must be >= 1, got {e[name]}.")
    if e.max_images < 0:
        raise ValueError(f"encode.max_images must be >= 0, got {e.max_images}.")
    if e.batch_size % jax.process_count():
        raise ValueError(f"encode.batch_size={e.batch_size} must be divisible by the "
                         f"{jax.process_count()} processes.")


def data_config(config, image_size: int):
    """config.data with the tokenizer's image size filled in (checked)."""
    data = ml_collections.ConfigDict(config.data.to_dict())
    if data.image_size and data.image_size != image_size:
        raise ValueError(f"data.image_size={data.image_size}, but the tokenizer was trained on "
                         f"{image_size} px images; set data.image_size=0 (the tokenizer's).")
    data.image_size = image_size
    if data.kind != "demo" and data.resize_shorter and data.resize_shorter < image_size:
        raise ValueError(f"data.resize_shorter {data.resize_shorter} < image size {image_size}: "
                         "the crop would not fit.")
    return data


def encoded_workdir(given: str, encode_config, *, tokenizer_workdir: str, mesh_data: int,
                    directory: str) -> str:
    """A trainer's data: `given` (an existing encode workdir), or `directory` encoded now
    (resumably: a re-run skips the shards on disk) with the trainer's nested encode config,
    through the trainer's tokenizer and mesh."""
    if given:
        return given
    c = ml_collections.ConfigDict(encode_config.to_dict())
    c.tokenizer.workdir = tokenizer_workdir
    c.mesh.data = mesh_data
    run(c, directory)
    return directory


def dataset_description(data, split: str, source) -> dict:
    desc = {"kind": data.kind, "split": split, "source": repr(source)}
    if data.kind == "tfds":
        desc.update(name=data.name,
                    tfds_split=data.train_split if split == "train" else data.eval_split)
    if data.kind in ("folder", "tfds") and (data.path or data.eval_path):
        desc["path"] = data.eval_path if (split == "eval" and data.eval_path) else data.path
    return desc


# ----------------------------------------------------------------------------------------------
# Host side: image index -> every copy of the image
# ----------------------------------------------------------------------------------------------

class _Views(grain.transforms.Map):
    """Position in this process's index list -> {'images': uint8 [copies, S, S, 3], 'label',
    'index', 'valid'}; index -1 (padding) or an unreadable image gives zeros, valid False."""

    def __init__(self, source, indices: np.ndarray, image_size: int, resize_shorter: int,
                 crop: str, augment: str, crop_scale: float, seed: int):
        self.source = source
        self.indices = indices
        self.image_size = image_size
        self.resize_shorter = resize_shorter
        self.crop = crop
        self.augment = augment
        self.crop_size = int(image_size * crop_scale)
        self.seed = seed

    def views(self, image: np.ndarray, index: int) -> list[np.ndarray]:
        size = self.image_size
        if self.augment == "ten_crop":
            return transforms.ten_crop(image, size, self.crop_size)
        if self.crop == "random":
            view = transforms.seeded_train_crop(image, size, self.resize_shorter, self.seed, index)
        else:
            view = transforms.EvalTransform(size, self.resize_shorter).map({"image": image})[
                "image"]
        if self.augment == "flip":
            return [view, np.ascontiguousarray(view[:, ::-1])]
        return [view]

    def map(self, position: int) -> dict:
        index = int(self.indices[position])
        record = None if index < 0 else sources.try_read(self.source, index)
        copies = AUGMENTS[self.augment]
        if record is None:
            return {"images": np.zeros((copies, self.image_size, self.image_size, 3), np.uint8),
                    "label": np.int32(0), "index": np.int64(index), "valid": np.bool_(False)}
        images = np.stack(self.views(record["image"], index)).astype(np.uint8)
        return {"images": images, "label": np.int32(record["label"]), "index": np.int64(index),
                "valid": np.bool_(True)}


def process_indices(pending: list[int], num_images: int, images_per_shard: int,
                    batch_size: int, process_index: int, process_count: int) -> np.ndarray:
    """This process's image indices for the pending shards, -1 for padding.

    Each shard is cut into global batches of ``batch_size`` (the last padded with -1); process
    ``p`` takes block ``p`` of ``batch_size / process_count`` images of every batch. So all
    processes run the same number of steps, and concatenating the blocks of all processes in
    process order gives each batch in image order."""
    local = batch_size // process_count
    blocks = []
    for s in pending:
        r = shards.shard_range(s, num_images, images_per_shard)
        steps = -(-len(r) // batch_size)
        grid = np.full(steps * batch_size, -1, np.int64)
        grid[:len(r)] = np.arange(r.start, r.stop)
        blocks.append(grid.reshape(steps, batch_size)[:, process_index * local:
                                                      (process_index + 1) * local].reshape(-1))
    return np.concatenate(blocks) if blocks else np.zeros(0, np.int64)


# ----------------------------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------------------------

def _write_shard(directory: str, shard: int, arrays: dict) -> str:
    path = os.path.join(directory, encoded.shard_file(shard))
    atomic_io.atomic_save_npz(path, arrays)
    return path


def _gather(tree: dict) -> dict:
    """Every process's rows, concatenated in process order (a no-op with one process)."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils
    return {k: np.asarray(v) for k, v in
            multihost_utils.process_allgather(tree, tiled=True).items()}


def _manifest(tok, config, data, source, num_images: int) -> dict:
    e = config.encode
    h = data.image_size // tok.downsample_factor
    arrays = {"labels": {"shape": [], "dtype": "int32"}, "indices": {"shape": [], "dtype": "int64"},
              "aug": {"shape": [], "dtype": "int32"}}
    if e.what in ("codes", "both"):
        arrays["codes"] = {"shape": [h, h], "dtype": "int32", "codebook_size": tok.codebook_size}
    if e.what in ("latents", "both"):
        arrays["latents"] = {"shape": [h, h, tok.latent_dim], "dtype": "float32"}
    return {
        "format": encoded.FORMAT, "tokenizer": tok.identity(), "what": e.what,
        "augment": e.augment, "copies": AUGMENTS[e.augment],
        "crop_scale": float(e.crop_scale) if e.augment == "ten_crop" else None,
        "crop": e.crop, "seed": int(config.seed) if e.crop == "random" else None,
        "image_size": data.image_size, "resize_shorter": pipeline.resize_shorter(data),
        "num_images": num_images, "images_per_shard": int(e.images_per_shard),
        "num_shards": shards.num_shards(num_images, e.images_per_shard),
        "arrays": arrays, "dataset": dataset_description(data, e.split, source)}


def run(config, workdir: str) -> dict:
    from vqlc.tokenizer import Tokenizer
    check_config(config)
    e = config.encode
    step = None if config.tokenizer.step < 0 else int(config.tokenizer.step)
    tok = Tokenizer.load(config.tokenizer.workdir, step,
                         mesh=parallel.make_mesh(config.mesh.data,
                                                 model=config.mesh.get("model", 1)))
    data = data_config(config, tok.image_size)
    source = pipeline.make_source(data, e.split)
    num_images = len(source) if not e.max_images else min(len(source), int(e.max_images))
    if num_images < 1:
        raise ValueError(f"No images to encode in {source!r}.")
    manifest = _manifest(tok, config, data, source, num_images)
    first = jax.process_index() == 0
    shards.check_or_write_spec(
        os.path.join(workdir, encoded.MANIFEST_FILE), manifest, what="an encoded dataset",
        remedy="Use a new workdir for these settings (or delete this one).", write=first)
    directory = os.path.join(workdir, encoded.SHARDS_DIR)
    num_shards = manifest["num_shards"]
    if first:
        storage.makedirs(directory)
    shards.remove_unfinished(directory)
    done = np.zeros(num_shards, bool)
    done[[s for s in encoded.completed_shards(directory) if s < num_shards]] = True
    done = shards.agreed_done(done)
    pending = [s for s in range(num_shards) if not done[s]]
    start = time.time()
    written = 0
    if pending:
        logging.info("Encode: %d of %d shards to write (%d images each) into %s", len(pending),
                     num_shards, e.images_per_shard, directory)
        written = _encode_shards(tok, config, data, source, directory, pending, num_images)
    elapsed = time.time() - start
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("vqlc encode done")
    rate = written / max(elapsed, 1e-9)
    logging.info("Encode: %d images in %.1f s (%.1f images/s); %d shards in %s", written,
                 elapsed, rate, num_shards, directory)
    return {"num_images": num_images, "images_encoded": written, "shards": num_shards,
            "shards_written": len(pending), "seconds": round(elapsed, 2),
            "images_per_second": round(rate, 1), "tokenizer": manifest["tokenizer"],
            "dir": directory}


def _encode_shards(tok, config, data, source, directory, pending, num_images) -> int:
    e = config.encode
    copies = AUGMENTS[e.augment]
    count, index = jax.process_count(), jax.process_index()
    local = e.batch_size // count
    indices = process_indices(pending, num_images, e.images_per_shard, e.batch_size, index, count)
    views = _Views(source, indices, data.image_size, pipeline.resize_shorter(data), e.crop,
                   e.augment, e.crop_scale, config.seed)
    ds = grain.MapDataset.range(len(indices)).map(views).batch(local, drop_remainder=False)
    ds = ds.to_iter_dataset(pipeline._read_options(data.num_workers))
    ds = pipeline._maybe_multiprocess(ds, data.num_workers)
    steps_per_shard = [-(-len(shards.shard_range(s, num_images, e.images_per_shard))
                         // e.batch_size) for s in pending]
    first = index == 0
    bar = None
    total = sum(len(shards.shard_range(s, num_images, e.images_per_shard)) for s in pending)
    if e.progress and first:
        with extras.needed("train", "the progress bar"):
            import tqdm
        bar = tqdm.tqdm(total=total, unit="img", dynamic_ncols=True, desc="encode")
    start, written, last_log = time.time(), 0, time.time()
    iterator = iter(ds)
    try:
        for shard, steps in zip(pending, steps_per_shard):
            parts = []
            for _ in range(steps):
                batch = next(iterator)
                parts.append(_gather(_encode_batch(tok, e.what, batch, copies)))
                n = int(parts[-1]["valid"].sum())
                if bar is not None:
                    bar.update(n)
                    bar.set_postfix(img_s=f"{bar.n / max(time.time() - start, 1e-9):.1f}")
            if first:
                arrays = _shard_arrays(parts, shard, num_images, e.images_per_shard, copies)
                path = _write_shard(directory, shard, arrays)
                written += len(arrays["indices"]) // copies
                if bar is None or time.time() - last_log > 60:
                    last_log = time.time()
                    logging.info("Encode: wrote %s (%d/%d images, %.1f images/s)", path,
                                 written, total, written / max(time.time() - start, 1e-9))
    finally:
        if bar is not None:
            bar.close()
        if hasattr(iterator, "close"):
            iterator.close()
    return written


def _encode_batch(tok, what: str, batch: dict, copies: int) -> dict:
    images = batch["images"]
    n = images.shape[0]
    flat = images.reshape(n * copies, *images.shape[2:])
    out = {"label": batch["label"], "index": batch["index"], "valid": batch["valid"]}
    if what == "both":
        codes, latents = tok.encode_with_latents(flat)
    else:
        codes = tok.encode(flat) if what == "codes" else None
        latents = tok.encode_latents(flat) if what == "latents" else None
    if codes is not None:
        out["codes"] = codes.reshape(n, copies, *codes.shape[1:]).astype(np.int32)
    if latents is not None:
        out["latents"] = latents.reshape(n, copies, *latents.shape[1:]).astype(np.float32)
    return out


def _shard_arrays(parts: list[dict], shard: int, num_images: int, images_per_shard: int,
                  copies: int) -> dict:
    """The gathered batches of one shard -> its arrays, one row per (image, copy)."""
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    r = shards.shard_range(shard, num_images, images_per_shard)
    keep = cat["valid"]
    if not np.array_equal(cat["index"][:len(r)], np.arange(r.start, r.stop)) or \
            keep[len(r):].any():  # order is the whole resume story
        raise RuntimeError(f"Shard {shard}: images out of order.")
    out = {}
    for k in ("codes", "latents"):
        if k in cat:
            x = cat[k][keep]
            out[k] = x.reshape(-1, *x.shape[2:])
    out["labels"] = np.repeat(cat["label"][keep], copies).astype(np.int32)
    out["indices"] = np.repeat(cat["index"][keep], copies).astype(np.int64)
    out["aug"] = np.tile(np.arange(copies, dtype=np.int32), int(keep.sum()))
    return out
