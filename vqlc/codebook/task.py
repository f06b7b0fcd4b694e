"""The `codebook` task: patch features of a dataset -> k-means -> <workdir>/codebook.npy (+ .json).

    python -m vqlc.main --config=codebook_imagenet --workdir=runs/cb \\
        --config.clip.path=<HF snapshot folder or ViT-L-14.pt>

Stages: (1) features streamed to ``<workdir>/features/`` shards (resumable; see features.py);
(2) clustering, in memory when the float32 features fit in ``kmeans.in_memory_limit_gb``, else
streamed from the shards; (3) the centres written atomically as float32 [K, D], with a JSON
record of how they were made. Re-running the command resumes an interrupted extraction.
"""
from __future__ import annotations

import logging
import os
import time

import jax
import ml_collections
import numpy as np

from vqlc import atomic_io, rundir, storage
from vqlc.codebook import backbones
from vqlc.codebook import features as features_lib
from vqlc.codebook import frozen

MODES = ("per_class", "global", "random_features", "random_init")
INITS = ("random", "k-means++")
RESCALES = ("none", "mean_norm")


def base_config() -> ml_collections.ConfigDict:
    """Defaults of every codebook config: the release's recipe (CLIP ViT-L/14, 4x4 pooling,
    100 k-means centres per ImageNet class). Per-dataset configs override what differs."""
    from vqlc import config_base
    c = ml_collections.ConfigDict()
    c.task = "codebook"
    c.seed = 0
    c.data = config_base.get_base_config().data  # same fields as the tokenizer's data
    c.backbone = "clip"  # clip | vgg16 | random_init (a CLIP tower with random weights)

    c.clip = ml_collections.ConfigDict()
    c.clip.path = ""  # HF snapshot folder of openai/clip-vit-large-patch14, or ViT-L-14.pt
    c.clip.dtype = "float32"  # activations; 'bfloat16' on GPUs/TPUs (params stay float32)
    # backbone='random_init' only: the vqlc.models.clip.ClipVisionConfig of the random tower
    # (default: ViT-L/14's geometry, i.e. the paper's encoder without its training).
    c.clip.random_config = ml_collections.ConfigDict(dict(
        image_size=224, patch_size=14, hidden_size=1024, num_layers=24, num_heads=16,
        intermediate_size=4096, projection_dim=768))

    c.vgg16 = ml_collections.ConfigDict()
    c.vgg16.layer = "relu4_3"  # images are data.image_size square

    c.features = ml_collections.ConfigDict()
    c.features.dir = ""  # "" = <workdir>/features
    c.features.pool = 4  # average-pool window over the patch grid (4: 16x16 -> 4x4); 1 = none
    c.features.dim = 0  # expected feature width; 0 = whatever the backbone gives
    c.features.batch_size = 256  # global, over all processes and devices
    c.features.images_per_shard = 5000
    c.features.max_images = 0  # 0 = all
    c.features.dtype = "float16"  # on disk
    # 'center': the backbone's own resize and centre crop; 'random': first the tokenizer's
    # training crop (data.resize_shorter, then a random data.image_size square, seeded per image).
    c.features.crop = "center"
    c.features.rescale = "none"  # 'mean_norm': divide by the mean feature norm (VGG's scale)
    c.features.progress = True

    c.kmeans = ml_collections.ConfigDict()
    c.kmeans.mode = "per_class"  # per_class | global | random_features | random_init
    c.kmeans.num_clusters = 100_000  # K ('per_class': must equal classes x clusters_per_class)
    c.kmeans.clusters_per_class = 100
    c.kmeans.num_iters = 100  # Lloyd iterations at most; stops earlier at centre shift < tol
    c.kmeans.batch_size = 0  # 0 = full-batch Lloyd; else mini-batch size (global mode)
    c.kmeans.init = "random"  # the release: K distinct data points; or 'k-means++'
    c.kmeans.tol = 1e-4
    c.kmeans.in_memory_limit_gb = 16.0  # float32 features above this are clustered streaming
    c.kmeans.inertia_max_rows = 1_000_000  # inertia over a fixed random sample beyond this; 0 = all

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # local devices used for extraction; -1 = all
    # Global k-means: the centres split along K over this many devices (vqlc.codebook.kmeans),
    # for codebooks too large to hold whole on one (1,000,000 x 768 = 3 GB).
    c.mesh.model = 1
    return c


def check_config(config) -> None:
    """Fails on settings that cannot work, before any weights are read or images decoded."""
    if config.backbone not in backbones.BACKBONES:
        raise ValueError(f"config.backbone={config.backbone!r} is unknown; valid: "
                         f"{', '.join(backbones.BACKBONES)}.")
    if config.backbone == "clip" and not config.clip.path:
        raise ValueError(backbones.CLIP_HELP)
    f, k = config.features, config.kmeans
    if k.mode not in MODES:
        raise ValueError(f"kmeans.mode={k.mode!r} is unknown; valid: {', '.join(MODES)}.")
    if k.init not in INITS:
        raise ValueError(f"kmeans.init={k.init!r} is unknown; valid: {', '.join(INITS)}.")
    if f.dtype not in features_lib.DTYPES:
        raise ValueError(f"features.dtype={f.dtype!r}; valid: {', '.join(features_lib.DTYPES)}.")
    if f.crop not in ("center", "random"):
        raise ValueError(f"features.crop={f.crop!r}; valid: center, random.")
    if f.rescale not in RESCALES:
        raise ValueError(f"features.rescale={f.rescale!r}; valid: {', '.join(RESCALES)}.")
    for name in ("pool", "batch_size", "images_per_shard"):
        if f[name] < 1:
            raise ValueError(f"features.{name} must be >= 1, got {f[name]}.")
    if k.mode == "per_class":
        if k.clusters_per_class < 1:
            raise ValueError(f"kmeans.clusters_per_class must be >= 1, got {k.clusters_per_class}.")
    elif k.num_clusters < 1:
        raise ValueError(f"kmeans.num_clusters must be >= 1, got {k.num_clusters}.")
    if k.num_iters < 0 or k.batch_size < 0:
        raise ValueError("kmeans.num_iters and kmeans.batch_size must be >= 0.")


def _dataset_description(config, source) -> dict:
    d = config.data
    desc = {"kind": d.kind, "split": d.train_split if d.kind == "tfds" else "train",
            "source": repr(source)}
    if d.kind == "tfds":
        desc["name"] = d.name
    if d.kind in ("folder", "tfds") and d.path:
        desc["path"] = d.path
    return desc


def _check_counts(config, num_rows: int, labels=None) -> int:
    """Returns K, after checking that there are enough features (per class) for it."""
    k = config.kmeans
    if k.mode == "per_class":
        if labels is None:
            return -1
        classes, counts = np.unique(labels, return_counts=True)
        total = len(classes) * k.clusters_per_class
        if k.num_clusters and k.num_clusters != total:
            raise ValueError(
                f"kmeans.mode='per_class' gives {len(classes)} classes x {k.clusters_per_class} "
                f"= {total} centres, but kmeans.num_clusters={k.num_clusters}. Set "
                f"kmeans.num_clusters={total} (or 0), or change kmeans.clusters_per_class.")
        short = counts < k.clusters_per_class
        if short.any():
            bad = ", ".join(f"label {c}: {n}"
                            for c, n in zip(classes[short][:5], counts[short][:5]))
            raise ValueError(
                f"kmeans.mode='per_class' needs >= {k.clusters_per_class} features per class; "
                f"{int(short.sum())} classes have fewer ({bad}). Use more images "
                "(features.max_images), less pooling, fewer clusters_per_class, or mode='global'.")
        return total
    if k.mode != "random_init" and k.num_clusters > num_rows:
        raise ValueError(f"kmeans.num_clusters={k.num_clusters} exceeds the {num_rows} features "
                         "available. Use more images (features.max_images), less pooling "
                         "(features.pool), or fewer clusters.")
    return int(k.num_clusters)


def make_codebook(config, features_dir: str, backbone=None) -> tuple[np.ndarray, dict]:
    """Extracts (or resumes) the features and clusters them. Every process returns the codes."""
    check_config(config)
    start = time.time()
    f, k = config.features, config.kmeans
    if k.mode != "random_init" and storage.is_remote(features_dir):
        raise ValueError(
            f"The codebook task's features go to {features_dir!r}, a bucket: feature shards are "
            "memory-mapped during k-means, so they need a local (or network-mounted) folder. "
            "Set --config.features.dir (or, for a tokenizer run, "
            "--config.codebook.task.features.dir) to one; the codebook itself can still be "
            "written to a gs:// workdir.")
    if backbone is None:
        backbone = backbones.make_backbone(config)
    pooled_grid = features_lib.check_pool(backbone.grid_size, f.pool)
    if f.dim and f.dim != backbone.feature_dim:
        raise ValueError(f"{backbone.name} gives {backbone.feature_dim}-d features but "
                         f"features.dim={f.dim}.")
    info = {"encoder": backbone.name, "backbone": backbone.spec,
            "layer": backbone.spec.get("layer", "last layer: ln_post + proj, patch tokens"),
            "feature_dim": int(backbone.feature_dim),
            "pooling": {"window": int(f.pool), "grid": f"{backbone.grid_size}x{backbone.grid_size}"
                        f" -> {pooled_grid}x{pooled_grid}", "rows_per_image": pooled_grid ** 2},
            "mode": k.mode, "seed": int(config.seed)}
    if k.mode == "random_init":  # paper Table 6: codes not taken from any data
        codes = np.random.default_rng(config.seed).standard_normal(
            (k.num_clusters, backbone.feature_dim)).astype(np.float32)
        info.update({"K": int(k.num_clusters), "distribution": "standard normal",
                     "dataset": None, "num_images": 0, "num_features": 0, "inertia": None,
                     "extraction_wall_s": 0.0, "clustering_wall_s": 0.0})
        return codes, info

    from vqlc.data import pipeline
    source = pipeline.make_source(config.data, "train")
    num_images = len(source) if not f.max_images else min(len(source), f.max_images)
    num_rows = num_images * pooled_grid ** 2
    known = getattr(source, "labels", None)  # folders know their labels without decoding
    _check_counts(config, num_rows, None if known is None else
                  np.repeat(np.asarray(known)[:num_images], pooled_grid ** 2))
    info["dataset"] = _dataset_description(config, source)

    mesh_devices = jax.local_devices()
    if config.mesh.data != -1:
        mesh_devices = mesh_devices[:config.mesh.data]
    random_crop = None
    if f.crop == "random":
        random_crop = (config.data.image_size, pipeline.resize_shorter(config.data))
    shards = features_lib.extract_features(
        backbone, source, features_dir, pool=f.pool, batch_size=f.batch_size,
        images_per_shard=f.images_per_shard, max_images=f.max_images, dtype=f.dtype,
        random_crop=random_crop, seed=config.seed, num_workers=config.data.num_workers,
        dataset=info["dataset"], devices=mesh_devices, progress=f.progress)
    if jax.process_count() > 1:  # every process needs every shard (shared filesystem)
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("vqlc codebook features")
        shards = features_lib.FeatureShards(features_dir)
    extraction_s = time.time() - start

    start = time.time()
    labels = shards.labels().astype(np.int64) if k.mode == "per_class" else None
    k_total = _check_counts(config, shards.num_rows, labels)
    codes, details = _cluster(config, shards, k_total, labels, features_dir)
    scale = 1.0
    if f.rescale == "mean_norm":
        # Lloyd and k-means++ commute with a global scale, so scaling the centres afterwards
        # equals clustering scaled features: codes on the projector's init scale.
        scale = shards.mean_norm()
        codes = codes / max(scale, 1e-12)
    clustering_s = time.time() - start
    inertia, inertia_over = _inertia(shards, codes, scale, k.inertia_max_rows, config.seed)
    info.update({"num_images": int(shards.num_images), "num_features": int(shards.num_rows),
                 "K": int(codes.shape[0]), "kmeans_iters": int(k.num_iters),
                 "kmeans_init": k.init, "kmeans_tol": float(k.tol),
                 "kmeans_batch_size": int(k.batch_size), "feature_scale_divisor": scale,
                 "inertia": inertia, "inertia_over": inertia_over,
                 "features_dir": features_dir, "features_dtype": f.dtype,
                 "extraction_wall_s": round(extraction_s, 1),
                 "clustering_wall_s": round(clustering_s, 1), **details})
    return codes, info


def _cluster(config, shards, k_total: int, labels, features_dir: str):
    from vqlc.codebook import kmeans
    k = config.kmeans
    in_memory = shards.nbytes_float32 <= k.in_memory_limit_gb * 2 ** 30
    common = {"num_iters": k.num_iters, "seed": config.seed, "init": k.init, "tol": k.tol}
    chunk_rows = max(1, (256 << 20) // (4 * shards.dim))  # 256 MB chunks
    if k.mode == "random_features":  # paper Table 6: K features drawn at random
        rng = np.random.default_rng(config.seed)
        rows = np.sort(rng.choice(shards.num_rows, k_total, replace=False))
        return shards.load(rows), {"clustered": "none: random features", "in_memory": True}
    logging.info("k-means (%s): %d features x %d -> %d centres, %s", k.mode, shards.num_rows,
                 shards.dim, k_total, "in memory" if in_memory else "streaming")
    if k.mode == "global":
        split = {"centre_shards": config.mesh.get("model", 1)}
        if in_memory:
            kwargs = dict(common, batch_size=k.batch_size) if k.batch_size else common
            codes = kmeans.fit(shards.load(), k_total, **kwargs, **split)
        else:
            codes = kmeans.fit_streaming(lambda: shards.iter_chunks(chunk_rows), k_total,
                                         **common, **split)
    else:
        if in_memory:
            x = shards.load()
        else:  # one class-sorted copy on disk, so each class is one contiguous block
            x, labels = shards.class_sorted_memmap(os.path.join(features_dir, "by_class.npy"))
            labels = labels.astype(np.int64)
        codes = kmeans.fit_per_class(x, labels, k.clusters_per_class, **common)
    codes = np.asarray(codes, np.float32)
    if codes.shape != (k_total, shards.dim):
        raise RuntimeError(f"k-means returned {codes.shape}, expected {(k_total, shards.dim)}.")
    return codes, {"in_memory": bool(in_memory)}


def _inertia(shards, codes, scale: float, max_rows: int, seed: int):
    """Sum over features of the squared distance to the nearest code (features / scale)."""
    from vqlc.codebook import kmeans
    centres = codes * scale  # back to the features' units
    if not max_rows or shards.num_rows <= max_rows:
        chunk_rows = max(1, (64 << 20) // (4 * shards.dim))
        total = kmeans.inertia(lambda: shards.iter_chunks(chunk_rows), centres)
        over = f"all {shards.num_rows} features"
    else:
        rows = np.sort(np.random.default_rng(seed + 1).choice(shards.num_rows, max_rows,
                                                              replace=False))
        total = kmeans.inertia(shards.load(rows), centres)
        over = f"random sample of {max_rows} of {shards.num_rows} features (seed {seed + 1})"
    return float(total) / scale ** 2, over


def build_codebook(config, workdir: str) -> dict:
    """The codebook task: writes <workdir>/codebook.npy (float32 [K, D]) and codebook.json."""
    check_config(config)
    storage.makedirs(workdir)
    start = time.time()
    features_dir = config.features.dir or rundir.features(workdir)
    codes, info = make_codebook(config, features_dir)
    info["wall_time_s"] = round(time.time() - start, 1)
    info["codebook_file"] = rundir.codebook(workdir)
    if jax.process_index() == 0:
        frozen.save_codebook(workdir, codes, info)
        logging.info("Codebook: %s [%d, %d] (%s, inertia %s) in %.1f s",
                     info["codebook_file"], codes.shape[0], codes.shape[1], info["mode"],
                     info["inertia"], info["wall_time_s"])
    return info


def run(config, workdir: str) -> dict:
    """vqlc.main's `codebook` task."""
    return build_codebook(config, workdir)


def tokenizer_task_config(config) -> ml_collections.ConfigDict:
    """The codebook-task config a tokenizer config nests (codebook.task), completed by what the
    tokenizer fixes: its data (features of its own training crops), K = quantizer.codebook_size,
    D = codebook.feature_dim and its seed; a feature batch that every device divides."""
    c = ml_collections.ConfigDict(config.codebook.task.to_dict())
    c.seed = config.seed
    c.data = ml_collections.ConfigDict(config.data.to_dict())
    c.features.dim = config.codebook.feature_dim
    c.features.progress = False
    c.kmeans.num_clusters = config.quantizer.codebook_size
    devices = jax.local_device_count() * jax.process_count()
    c.features.batch_size = max(c.features.batch_size // devices, 1) * devices
    return c


def prepare_tokenizer_codebook(config, workdir: str) -> np.ndarray:
    """The LC tokenizer's frozen codebook, making sure <workdir>/codebook.npy holds it: reused
    when present (a resumed run), else copied from codebook.path, else built with the nested
    codebook task (codebook.build='task'; its features kept in <workdir>/codebook_features/)."""
    q, cb = config.quantizer, config.codebook  # validated by frozen.check_codebook
    storage.makedirs(workdir)
    target = rundir.codebook(workdir)
    if storage.exists(target):
        return frozen.load_codebook(target, q.codebook_size, cb.feature_dim)
    if cb.path:
        codes = frozen.load_codebook(cb.path, q.codebook_size, cb.feature_dim)
        if jax.process_index() == 0:
            atomic_io.atomic_copy(cb.path, target)
        return codes
    start = time.time()
    task_config = tokenizer_task_config(config)
    check_config(task_config)
    codes, info = make_codebook(task_config, rundir.codebook_features(workdir))
    info["wall_time_s"] = round(time.time() - start, 1)
    logging.info("Codebook: k-means of %d %s features -> %d centres", info["num_features"],
                 info["encoder"], codes.shape[0])
    if jax.process_index() == 0:
        frozen.save_codebook(workdir, codes, info)
    return codes
