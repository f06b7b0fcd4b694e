"""The `sample` task: a generator's samples, decoded by its tokenizer, as ADM-layout .npz.

    python -m vqlc.main --config=sample_demo --workdir=runs/sample_demo

Labels. Class-balanced (``sample.labels='balanced'``, ``sample.per_class``; the release's
protocol: 50 per class x 1,000 classes = 50,000, in class order) or uniformly random
(``sample.labels='random'``, ``sample.num_samples``; the DiT / LlamaGen protocol; label i is
drawn from its own key, fold_in(fold_in(key(seed), LABEL_STREAM), i)).

Determinism. Sample i gets the key fold_in(key(sample.seed), i) of its GLOBAL index, and every
generator draws sample i from that key alone, so the images do not depend on the batch size,
the device count or the process count. Global batches of ``sample.batch_size`` are split over
every device of every process (each process feeds its own rows); the decoded uint8 images and
their code maps come back to every process and process 0 writes them.

Outputs in the workdir:
  samples/shard_XXXXX.npz   one per batch: arr_0 uint8 [n, H, W, 3], arr_1 int64 labels,
                            indices int64 (global sample ids), codes int32 [n, h, w]; written
                            atomically, so a re-run skips every complete shard (resume)
  samples/spec.json         what the shards are; a re-run with other settings is refused
  samples.npz               arr_0, arr_1: all samples in index order (ADM's layout, what the
                            ADM / LlamaGen evaluators read); streamed, never all in memory
  samples.json              tokenizer identity, generator, seed, counts, utilization (share
                            of the tokenizer's codes used at least once in the samples' code
                            maps: the release's 'utilization' column), wall time, images/s
  samples_grid.png          rows = the first sample.grid_classes classes, a few each
  samples_png/<class>/<index>.png   with sample.png=True (per-class folders)
Latent generators' samples are snapped to the nearest code before decoding (the release's
way), and those codes are what the utilisation counts.
"""
from __future__ import annotations

import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vqlc import atomic_io, extras, parallel, rundir, storage
from vqlc import tokenizer as tokenizer_lib
from vqlc.data import shards
from vqlc.eval import images as images_lib
from vqlc.eval import metrics
from vqlc.gen import generator as generator_lib

FORMAT = 1
LABEL_MODES = ("balanced", "random")
LABEL_STREAM = 0xFFFFFFFF  # fold_in data of the label keys' root (sample keys use 0, 1, ...)
SHARD_DIR = "samples"


def base_config() -> ml_collections.ConfigDict:
    """Defaults of every sampling config; per-generator configs override what differs."""
    from vqlc import config_base
    c = ml_collections.ConfigDict()
    c.task = "sample"

    c.generator = ml_collections.ConfigDict()
    c.generator.kind = "replay"  # a key of vqlc.gen.generator.GENERATORS
    c.generator.workdir = ""  # the generator's training workdir ('' for replay)
    c.generator.replay = ml_collections.ConfigDict()
    c.generator.replay.space = "codes"  # codes | latents (the latter snaps, as LDM/DiT/SiT)
    c.generator.replay.per_class = 16  # bank: the first images of each class
    c.generator.replay.split = "train"  # train | eval
    c.generator.replay.crop = "random"  # random (training crop, seeded per image) | center
    c.generator.replay.seed = 0
    c.generator.replay.data = config_base.get_base_config().data  # kind '' = the tokenizer's
    c.generator.replay.data.kind = ""

    c.generator.gpt = ml_collections.ConfigDict()  # generator.kind = 'gpt'
    c.generator.gpt.use_ema = True  # the EMA weights, when the run kept them
    c.generator.gpt.temperature = 1.0  # 0 = greedy
    c.generator.gpt.top_k = 0  # 0 = all codes (GPT-LC: 10,000, a tenth of the vocabulary)
    c.generator.gpt.top_p = 0.0  # 0 = off
    c.generator.gpt.cfg_scale = 0.0  # 0 = no guidance (llamagen, or mingpt with class dropout)
    c.generator.gpt.cfg_start = 0  # guided code positions [cfg_start, cfg_end); end 0 = all
    c.generator.gpt.cfg_end = 0

    from vqlc.gen import diffusion_generator
    c.generator.diffusion = diffusion_generator.sampler_config()  # generator.kind = 'diffusion'

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.workdir = ""  # the generator's tokenizer (a trained tokenizer workdir)

    c.sample = ml_collections.ConfigDict()
    c.sample.num_classes = 1000
    c.sample.labels = "balanced"  # balanced (per_class) | random (num_samples)
    c.sample.per_class = 0  # balanced: samples per class (the release: 50)
    c.sample.num_samples = 0  # random: total samples (DiT / LlamaGen: 50,000)
    c.sample.batch_size = 64  # global, over all devices and processes
    c.sample.seed = 0
    c.sample.png = False  # also write samples_png/<class>/<index>.png
    c.sample.grid_classes = 8  # rows of samples_grid.png (the first classes)
    c.sample.grid_per_class = 8
    c.sample.progress_bar = True

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # devices on the data axis; -1 = all
    return c


def check_config(config) -> None:
    """Fails on settings that cannot work, before any weights are read or images decoded."""
    s = config.sample
    generator_lib.resolve(config.generator.kind)  # unknown kind: a clear error now
    if config.generator.kind == "replay":
        from vqlc.gen import replay
        replay.check_config(config)
    if not config.tokenizer.workdir:
        raise ValueError("config.tokenizer.workdir is empty: set it to the generator's "
                         "tokenizer (a trained tokenizer workdir, e.g. "
                         "--config.tokenizer.workdir=runs/demo).")
    if s.num_classes < 1:
        raise ValueError(f"sample.num_classes must be >= 1, got {s.num_classes}.")
    if s.labels not in LABEL_MODES:
        raise ValueError(f"sample.labels={s.labels!r}; valid: {', '.join(LABEL_MODES)}.")
    if (s.per_class > 0) == (s.num_samples > 0):
        raise ValueError(
            f"Set exactly one of sample.per_class (class-balanced: per_class x num_classes "
            f"samples) and sample.num_samples (with sample.labels='random'); got per_class="
            f"{s.per_class}, num_samples={s.num_samples}.")
    if s.per_class < 0 or s.num_samples < 0:
        raise ValueError("sample.per_class and sample.num_samples must be >= 0.")
    if s.labels == "balanced" and not s.per_class:
        raise ValueError("sample.labels='balanced' needs sample.per_class (and no num_samples).")
    if s.labels == "random" and not s.num_samples:
        raise ValueError("sample.labels='random' needs sample.num_samples (and no per_class).")
    if s.batch_size < 1:
        raise ValueError(f"sample.batch_size must be >= 1, got {s.batch_size}.")


def sample_labels(config) -> np.ndarray:
    """int64 [N]: the label of every sample, by global index."""
    s = config.sample
    if s.labels == "balanced":
        return np.repeat(np.arange(s.num_classes, dtype=np.int64), s.per_class)
    root = jax.random.fold_in(jax.random.key(s.seed), LABEL_STREAM)
    draw = jax.jit(jax.vmap(lambda i: jax.random.randint(
        jax.random.fold_in(root, i), (), 0, s.num_classes)))
    return np.asarray(draw(jnp.arange(s.num_samples, dtype=jnp.uint32))).astype(np.int64)


def sample_keys(seed: int, indices) -> jax.Array:
    """The key of each sample: fold_in(key(seed), global index)."""
    root = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.asarray(indices, jnp.uint32))


def draw_fn(gen, tok_model, outputs=("images", "codes")):
    """(generator variables, tokenizer variables, seed, indices [B], labels [B]) -> a tuple
    of the named outputs: "images" (uint8 [B, H, W, 3]), "codes" (int32 [B, h, w]) and, for a
    latent generator, "latents" (the sampled latents before snapping, [B, h, w, dim]).

    The one sampling step of the sample task and of the Generator API; the seed may be a
    Python int or a traced uint32 (so that another seed does not compile again)."""
    decode = tokenizer_lib.decode_fn(tok_model)
    snap = tokenizer_lib.snap_fn(tok_model)
    if "latents" in outputs and gen.space != "latents":
        raise ValueError(f"A {gen.space} generator draws no latents.")

    def draw(gen_vars, tok_vars, seed, indices, labels):
        out = gen.sample(gen_vars, sample_keys(seed, indices), labels)
        result = {"latents": out} if gen.space == "latents" else {}
        if "codes" in outputs or "images" in outputs:
            codes = out if gen.space == "codes" else snap(tok_vars, out)
            result["codes"] = codes = codes.astype(jnp.int32)
        if "images" in outputs:
            x = decode(tok_vars, codes).astype(jnp.float32)
            # images.to_uint8's arithmetic, on the device
            result["images"] = jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
        return tuple(result[name] for name in outputs)

    return draw


def make_step(gen, tok, seed: int, mesh):
    """jitted (generator variables, tokenizer variables, indices [B], labels [B]) ->
    (uint8 images [B, H, W, 3], int32 codes [B, h, w]), both replicated."""
    draw = draw_fn(gen, tok.model)
    replicated = parallel.replicated(mesh)
    return jax.jit(lambda gen_vars, tok_vars, indices, labels:
                   draw(gen_vars, tok_vars, seed, indices, labels),
                   out_shardings=(replicated, replicated))


def shard_path(workdir: str, batch: int) -> str:
    return os.path.join(workdir, SHARD_DIR, f"shard_{batch:05d}.npz")


def _write_shard(path: str, arrays: dict) -> None:
    atomic_io.atomic_save_npz(path, arrays)


def _write_pngs(png_dir: str, images, labels, indices, num_classes: int) -> None:
    width = max(4, len(str(num_classes - 1)))
    for image, label, index in zip(images, labels, indices):
        path = os.path.join(png_dir, f"{int(label):0{width}d}", f"{int(index):06d}.png")
        images_lib.save_png(path, image)  # atomic


def _spec(config, tok, gen, num_samples: int) -> dict:
    s = config.sample
    tok_id = tok.identity()
    return {"format": FORMAT, "num_samples": int(num_samples), "batch_size": int(s.batch_size),
            "seed": int(s.seed), "labels": s.labels, "num_classes": int(s.num_classes),
            "per_class": int(s.per_class),
            "tokenizer": {"step": tok_id["step"], "config_hash": tok_id["config_hash"]},
            "generator": {"kind": config.generator.kind, "workdir": config.generator.workdir,
                          **gen.identity()}}


def _pending_batches(workdir: str, num_batches: int) -> np.ndarray:
    """Batches without a complete shard, as process 0 sees them (every process runs them)."""
    done = np.array([storage.exists(shard_path(workdir, b)) for b in range(num_batches)])
    return np.flatnonzero(~shards.agreed_done(done))


def run(config, workdir: str) -> dict:
    start = time.time()
    check_config(config)
    s = config.sample
    workdir = rundir.absolute(workdir)
    if not storage.isdir(config.tokenizer.workdir):
        raise FileNotFoundError(
            f"config.tokenizer.workdir={config.tokenizer.workdir!r} is not a folder: it must be "
            f"a trained tokenizer workdir (e.g. the demo's: python -m vqlc.main "
            f"--config=default --workdir=runs/demo).")
    mesh = parallel.make_mesh(config.mesh.data)
    parallel.check_batch_size(s.batch_size, mesh, "sample.batch_size")
    labels = sample_labels(config)
    num_samples = len(labels)
    batch = s.batch_size
    num_batches = -(-num_samples // batch)

    tok = tokenizer_lib.Tokenizer.load(config.tokenizer.workdir, mesh=mesh)
    gen = generator_lib.resolve(config.generator.kind).load(
        config, config.generator.workdir, tokenizer=tok, mesh=mesh)
    shard_dir = os.path.join(workdir, SHARD_DIR)
    shards.check_or_write_spec(
        os.path.join(shard_dir, "spec.json"), _spec(config, tok, gen, num_samples),
        what="samples", remedy=f"Use a fresh --workdir, or delete {shard_dir} to start over.",
        write=jax.process_index() == 0)
    storage.makedirs(shard_dir)
    shards.remove_unfinished(shard_dir)  # writes cut short by a kill (only process 0 writes)
    png_dir = os.path.join(workdir, "samples_png") if s.png else None
    pending = _pending_batches(workdir, num_batches)
    writer = jax.process_index() == 0
    logging.info("sample: %d samples (%s labels, %d classes) in %d batches of %d; %d to run",
                 num_samples, s.labels, s.num_classes, num_batches, batch, len(pending))

    step = make_step(gen, tok, s.seed, mesh)
    local = parallel.local_batch_size(batch)
    p = jax.process_index()

    def feed(b):
        indices = np.arange(b * batch, (b + 1) * batch, dtype=np.int64)
        batch_labels = labels[np.minimum(indices, num_samples - 1)]  # padding: any valid label
        rows = slice(p * local, (p + 1) * local)
        arrays = parallel.global_batch({"index": indices[rows].astype(np.uint32),
                                        "label": batch_labels[rows].astype(np.int32)}, mesh)
        return step(gen.variables, tok.variables, arrays["index"], arrays["label"])

    compile_s = sampling_s = 0.0
    if len(pending):
        t = time.time()
        example = parallel.global_batch({"index": np.zeros(local, np.uint32),
                                         "label": np.zeros(local, np.int32)}, mesh)
        step = step.lower(gen.variables, tok.variables, example["index"],
                          example["label"]).compile()
        compile_s = time.time() - t
        bar = None
        if writer and s.progress_bar:
            with extras.needed("train", "the progress bar"):
                import tqdm
            bar = tqdm.tqdm(total=num_samples, initial=num_samples - sum(
                min(batch, num_samples - b * batch) for b in pending), unit="img",
                dynamic_ncols=True, desc="sample")
        t = time.time()
        in_flight = (pending[0], feed(pending[0]))
        for k in range(len(pending)):
            b, (images, codes) = in_flight
            # the next batch is dispatched before this one is copied and written
            in_flight = (pending[k + 1], feed(pending[k + 1])) if k + 1 < len(pending) else None
            n = min(batch, num_samples - b * batch)
            if writer:
                images, codes = np.asarray(images)[:n], np.asarray(codes)[:n]
                indices = np.arange(b * batch, b * batch + n, dtype=np.int64)
                if png_dir:
                    _write_pngs(png_dir, images, labels[indices], indices, s.num_classes)
                _write_shard(shard_path(workdir, b), {
                    "arr_0": images, "arr_1": labels[indices], "indices": indices,
                    "codes": codes})
            if bar is not None:
                bar.update(n)
        sampling_s = time.time() - t
        if bar is not None:
            bar.close()
    sampled = int(sum(min(batch, num_samples - b * batch) for b in pending))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("vqlc-sample-done")
    if not writer:
        return None

    summary = merge(config, workdir, labels, num_batches, tok.codebook_size)
    images_per_s = sampled / sampling_s if sampled and sampling_s > 0 else None
    record = {
        "format": FORMAT,
        "tokenizer": tok.identity(),
        "generator": {"kind": config.generator.kind, "workdir": config.generator.workdir,
                      **gen.identity()},
        "space": gen.space,
        "seed": int(s.seed),
        "labels": s.labels,
        "num_classes": int(s.num_classes),
        "per_class": int(s.per_class) or None,
        "num_samples": num_samples,
        "class_counts": np.bincount(labels, minlength=s.num_classes).tolist(),
        **summary,
        "batch_size": int(batch),
        "devices": int(parallel.batch_devices(mesh)),
        "processes": jax.process_count(),
        "sampled_this_run": sampled,
        "compile_s": round(compile_s, 3),
        "sampling_s": round(sampling_s, 3),
        "images_per_s": None if images_per_s is None else round(images_per_s, 2),
        "wall_time_s": round(time.time() - start, 3),
        "npz": os.path.join(workdir, "samples.npz"),
        "png_dir": png_dir,
        "grid": os.path.join(workdir, "samples_grid.png"),
    }
    atomic_io.atomic_write_json(os.path.join(workdir, "samples.json"), record)
    if images_per_s is not None:
        print(f"sample: {sampled} images in {sampling_s:.2f} s ({images_per_s:.1f} images/s, "
              f"compile {compile_s:.1f} s)", flush=True)
    return {k: record[k] for k in ("num_samples", "utilization", "codes_used", "codebook_size",
                                   "images_per_s", "wall_time_s", "npz")}


def merge(config, workdir: str, labels: np.ndarray, num_batches: int,
          codebook_size: int) -> dict:
    """samples.npz (streamed from the shards, in index order), samples_grid.png and the code
    statistics of all samples. Returns the code and shape fields of samples.json."""
    s = config.sample
    num_samples = len(labels)
    grid_classes = min(s.grid_classes, s.num_classes)
    grid_rows = {c: np.flatnonzero(labels == c)[:s.grid_per_class] for c in range(grid_classes)}
    wanted = {int(i): c for c, rows in grid_rows.items() for i in rows}
    grid_images = {}
    counts = np.zeros(codebook_size, np.int64)
    with np.load(storage.local_file(shard_path(workdir, 0))) as first:
        image_shape, token_shape = first["arr_0"].shape[1:], first["codes"].shape[1:]

    def chunks():
        expected = 0
        for b in range(num_batches):
            with np.load(storage.local_file(shard_path(workdir, b))) as shard:
                indices, images, codes = shard["indices"], shard["arr_0"], shard["codes"]
                if not np.array_equal(indices, np.arange(expected, expected + len(indices))):
                    raise RuntimeError(f"{shard_path(workdir, b)}: samples out of order.")
                if not np.array_equal(shard["arr_1"], labels[indices]):
                    raise RuntimeError(f"{shard_path(workdir, b)}: labels differ from the spec.")
                expected += len(indices)
                counts[:] += np.bincount(codes.reshape(-1), minlength=codebook_size)
                for row, i in enumerate(indices):
                    if int(i) in wanted:
                        grid_images[int(i)] = images[row]
                yield images
        if expected != num_samples:
            raise RuntimeError(f"The shards hold {expected} samples, {num_samples} expected.")

    atomic_io.atomic_save_npz(os.path.join(workdir, "samples.npz"), {
        "arr_0": atomic_io.Chunks((num_samples, *image_shape), np.uint8, chunks()),
        "arr_1": labels})
    rows = [np.stack([grid_images[int(i)] for i in grid_rows[c]]) if len(grid_rows[c])
            else np.zeros((0, *image_shape), np.uint8) for c in range(grid_classes)]
    if any(len(r) for r in rows):
        grid = images_lib.image_grid(rows)
        images_lib.save_png(os.path.join(workdir, "samples_grid.png"), grid)  # atomic
    return {"image_shape": list(image_shape), "token_shape": list(token_shape),
            "codebook_size": int(codebook_size),
            "utilization": metrics.utilization(counts),
            "codes_used": int(np.count_nonzero(counts))}
