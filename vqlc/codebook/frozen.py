"""The LC quantizer's frozen codebook: load and validate a .npy file, or build the demo one.

The workdir keeps one copy, <workdir>/codebook.npy, written once; checkpoints do not hold it.
"""
import logging
import os
import shutil
import time

import jax
import ml_collections
import numpy as np

from vqlc import atomic_io

WORKDIR_FILE = "codebook.npy"
INFO_FILE = "codebook.json"


def load_codebook(path: str, codebook_size: int, feature_dim: int) -> np.ndarray:
    """Reads a float32 [codebook_size, feature_dim] .npy file, with a clear error when it is not."""
    if not path:
        raise ValueError(
            "quantizer.kind='lc' needs a frozen codebook: set --config.codebook.path=<file.npy> "
            "(float32 [K, D], e.g. from configs/codebook_imagenet.py), or "
            "--config.codebook.build=vgg16_kmeans to build one from the training data.")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"Codebook file not found: {path!r}. Build one with the codebook task "
            "(python -m vqlc.main --config=configs/codebook_imagenet.py --workdir=<dir>) "
            "or point --config.codebook.path at an existing float32 [K, D] .npy file.")
    try:
        codes = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # pickles, text, truncated files
        raise ValueError(f"Codebook {path!r} is not a readable .npy array file ({e}); it must "
                         "hold a float32 [K, D] array (numpy.save).") from e
    if not isinstance(codes, np.ndarray):  # an .npz archive
        raise ValueError(f"Codebook {path!r} is an .npz archive; it must be a single float32 "
                         "[K, D] array saved with numpy.save.")
    if codes.shape != (codebook_size, feature_dim):
        raise ValueError(
            f"Codebook {path!r} has shape {codes.shape}, but the config asks for "
            f"quantizer.codebook_size={codebook_size} x codebook.feature_dim={feature_dim}. "
            "Fix the config or the file.")
    if not np.issubdtype(codes.dtype, np.floating):  # token ids or labels, not centres
        raise ValueError(f"Codebook {path!r} has dtype {codes.dtype}; k-means centres are "
                         "floating point (float32).")
    codes = np.asarray(codes, np.float32)
    bad = ~np.isfinite(codes).all(axis=1)
    if bad.any():
        raise ValueError(f"Codebook {path!r} contains NaN or Inf values (in {int(bad.sum())} of "
                         f"its {codebook_size} rows, first row {int(np.argmax(bad))}).")
    return codes


def check_codebook(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Validates the frozen-codebook settings before any compute (and before anything is written
    to `workdir`): the file the run would use exists and matches the config, and a resumed run is
    not silently given a different codebook than the one it trained with."""
    q, cb = config.quantizer, config.codebook
    if q.kind != "lc":
        return
    target = os.path.join(workdir, WORKDIR_FILE)
    if os.path.exists(target):
        stored = load_codebook(target, q.codebook_size, cb.feature_dim)
        if cb.path and not np.array_equal(
                stored, load_codebook(cb.path, q.codebook_size, cb.feature_dim)):
            raise ValueError(
                f"codebook.path={cb.path!r} differs from the codebook this workdir's run was "
                f"started with ({target}). Use a new --workdir for a new codebook, or drop "
                "--config.codebook.path to resume with the stored one.")
        return
    if cb.path:
        load_codebook(cb.path, q.codebook_size, cb.feature_dim)
    elif cb.build and cb.build != "vgg16_kmeans":
        raise ValueError(f"codebook.build={cb.build!r} is unknown; valid: '', 'vgg16_kmeans'.")
    elif not cb.build:
        load_codebook(cb.path, q.codebook_size, cb.feature_dim)  # raises the 'set a path' error


def prepare_codebook(config: ml_collections.ConfigDict, workdir: str) -> np.ndarray:
    """Returns the frozen codebook, making sure <workdir>/codebook.npy holds it."""
    q, cb = config.quantizer, config.codebook
    os.makedirs(workdir, exist_ok=True)
    target = os.path.join(workdir, WORKDIR_FILE)
    if os.path.exists(target):  # a resumed run, or an earlier build: reuse it
        return load_codebook(target, q.codebook_size, cb.feature_dim)
    if cb.path:
        codes = load_codebook(cb.path, q.codebook_size, cb.feature_dim)
        if jax.process_index() == 0:
            _atomic_copy(cb.path, target)
        return codes
    if cb.build == "vgg16_kmeans":
        codes, info = build_vgg16_kmeans_codebook(config, workdir)
        if jax.process_index() == 0:
            save_codebook(workdir, codes, info)
        return codes
    if cb.build:
        raise ValueError(f"codebook.build={cb.build!r} is unknown; valid: '', 'vgg16_kmeans'.")
    return load_codebook(cb.path, q.codebook_size, cb.feature_dim)  # raises the 'set a path' error


def codebook_task_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The codebook-task config equivalent to a tokenizer's ``codebook.build='vgg16_kmeans'``.

    Pretrained VGG16 patch features (the demo's offline stand-in for the paper's CLIP ViT-L/14;
    paper Table 6: other backbones give nearly the same result) of ``codebook.build_images``
    training crops (the tokenizer's own random crop, seeded per image), at a layer whose stride
    matches the tokenizer's (relu3_3: f4, relu4_3: f8), so one feature per token; k-means++ and
    Lloyd to ``quantizer.codebook_size`` centres, rescaled to unit mean feature norm.
    """
    from vqlc.codebook import task
    cb, q = config.codebook, config.quantizer
    c = task.base_config()
    c.seed = config.seed
    c.data = ml_collections.ConfigDict(config.data.to_dict())
    c.backbone = "vgg16"
    c.vgg16.layer = cb.build_layer
    c.features.pool = 1
    c.features.dim = cb.feature_dim
    devices = jax.local_device_count() * jax.process_count()
    c.features.batch_size = max(64 // devices, 1) * devices
    c.features.images_per_shard = 256
    c.features.max_images = cb.build_images
    c.features.dtype = "float32"
    c.features.crop = "random"
    # VGG activations run to the hundreds. Rescaled to unit mean vector norm, codes start (through
    # the projector's init, std dim**-0.5) at the encoder latents' scale instead of dozens of
    # units away, where every latent would pick the same smallest code.
    c.features.rescale = "mean_norm"
    c.features.progress = False
    c.kmeans.mode = "global"
    c.kmeans.num_clusters = q.codebook_size
    c.kmeans.init = "k-means++"
    c.kmeans.num_iters = cb.kmeans_iters
    c.kmeans.tol = 1e-4
    c.mesh.data = -1
    return c


def build_vgg16_kmeans_codebook(config: ml_collections.ConfigDict,
                                workdir: str) -> tuple[np.ndarray, dict]:
    """k-means centres of pretrained VGG16 patch features of training crops (see
    ``codebook_task_config``); the features are kept in <workdir>/codebook_features/."""
    from vqlc.codebook import task
    start = time.time()
    codes, info = task.make_codebook(codebook_task_config(config),
                                     os.path.join(workdir, "codebook_features"))
    logging.info("Codebook: k-means of %d %s features -> %d centres", info["num_features"],
                 info["encoder"], codes.shape[0])
    info["wall_time_s"] = round(time.time() - start, 1)
    return codes, info


def save_codebook(workdir: str, codes: np.ndarray, info: dict) -> str:
    """Writes <workdir>/codebook.npy (float32) and codebook.json, each atomically; returns the
    .npy path."""
    target = os.path.join(workdir, WORKDIR_FILE)
    atomic_io.atomic_save_npy(target, np.asarray(codes, np.float32))
    atomic_io.atomic_write_json(os.path.join(workdir, INFO_FILE), info)
    return target


def _atomic_copy(src: str, dst: str) -> None:
    tmp = dst + ".tmp"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
