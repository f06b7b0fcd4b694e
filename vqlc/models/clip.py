"""CLIP vision tower in Flax Linen (NHWC) that loads real checkpoints without torch.

VQGAN-LC builds its frozen codebook from OpenAI CLIP ViT-L/14 patch features:
the last transformer layer's output, with the post-layernorm applied to EVERY
token and then the (bias-free) visual projection, CLS dropped. In Hugging Face
terms ``visual_projection(post_layernorm(last_hidden_state))[:, 1:]``: a
``[B, 256, 768]`` array for a 224 px image.

Parameter names follow the Hugging Face keys (``embeddings/patch_embedding``,
``pre_layrnorm`` with HF's spelling, ``encoder/layers_{i}/self_attn/q_proj``,
``post_layernorm``, ``visual_projection``) so a converted checkpoint reads 1:1.

Weights come from either

* a local Hugging Face snapshot directory: ``config.json`` (a ``CLIPConfig`` with
  ``vision_config``, or a ``CLIPVisionConfig``) plus ``model.safetensors`` or a
  sharded ``model.safetensors.index.json`` + shards, read with ``safetensors``'
  numpy API (only the vision keys are read); or
* OpenAI's ``.pt`` release (a TorchScript archive, e.g. ``ViT-L-14.pt``) or a
  plain ``torch.save``'d OpenAI state dict, read by :mod:`vqlc.torch_files`.

Preprocessing is OpenAI's (``clip.load``, which the VQGAN-LC release uses):
PIL bicubic resize of the shorter side to S (the long side to
``int(S * long / short)``), centre crop with torchvision's rounding
(``round((h - S) / 2)``; HF's ``CLIPImageProcessor`` floors instead, so the two
differ by one pixel when the excess is odd), scale to [0, 1], normalise.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import json
import math
import os
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqlc.models import activations

Array = jax.Array
Params = Dict[str, Any]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig:
    """Geometry of a CLIP ViT vision tower (with its projection head)."""
    image_size: int
    patch_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    projection_dim: int
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of "
                             f"patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_heads {self.num_heads}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} not supported; "
                             f"known: {sorted(_ACTIVATIONS)}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2


def _quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


# HF ``hidden_act`` names -> activation. "gelu" in HF/PyTorch is the exact erf form.
_ACTIVATIONS: Dict[str, Callable] = {
    "quick_gelu": _quick_gelu,
    "gelu": activations.gelu_exact,
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}

# OpenAI's released vision towers (heads = width // 64, MLP = 4 * width).
KNOWN_GEOMETRIES: Dict[str, ClipVisionConfig] = {
    "ViT-B/32": ClipVisionConfig(224, 32, 768, 12, 12, 3072, 512),
    "ViT-B/16": ClipVisionConfig(224, 16, 768, 12, 12, 3072, 512),
    "ViT-L/14": ClipVisionConfig(224, 14, 1024, 24, 16, 4096, 768),
    "ViT-L/14@336px": ClipVisionConfig(336, 14, 1024, 24, 16, 4096, 768),
}

_GEOMETRY_FIELDS = ("image_size", "patch_size", "hidden_size", "num_layers", "num_heads",
                    "intermediate_size", "projection_dim")


def geometry_name(config: ClipVisionConfig) -> str:
    """The KNOWN_GEOMETRIES name whose shapes match ``config``, else 'custom'."""
    for name, known in KNOWN_GEOMETRIES.items():
        if all(getattr(known, f) == getattr(config, f) for f in _GEOMETRY_FIELDS):
            return name
    return "custom"


def _known_geometries_text() -> str:
    return "; ".join(
        f"{n}: " + ", ".join(f"{f}={getattr(c, f)}" for f in _GEOMETRY_FIELDS)
        for n, c in KNOWN_GEOMETRIES.items())


# --------------------------------------------------------------------------- model


class ClipAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections (HF layout)."""
    hidden_size: int
    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, n, _ = x.shape
        head_dim = self.hidden_size // self.num_heads
        dense = functools.partial(nn.Dense, self.hidden_size, dtype=self.dtype,
                                  param_dtype=jnp.float32)
        split = lambda t: t.reshape(b, n, self.num_heads, head_dim)
        q = split(dense(name="q_proj")(x)) * (head_dim ** -0.5)
        k = split(dense(name="k_proj")(x))
        v = split(dense(name="v_proj")(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
        # Softmax in float32 whatever the activation dtype.
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, self.hidden_size)
        return dense(name="out_proj")(out)


class ClipMLP(nn.Module):
    """fc1 -> activation -> fc2."""
    hidden_size: int
    intermediate_size: int
    hidden_act: str = "quick_gelu"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = nn.Dense(self.intermediate_size, dtype=self.dtype, param_dtype=jnp.float32,
                     name="fc1")(x)
        x = _ACTIVATIONS[self.hidden_act](x)
        return nn.Dense(self.hidden_size, dtype=self.dtype, param_dtype=jnp.float32,
                        name="fc2")(x)


class ClipEncoderLayer(nn.Module):
    """Pre-LN transformer block."""
    config: ClipVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        ln = functools.partial(nn.LayerNorm, epsilon=c.layer_norm_eps, dtype=self.dtype,
                               param_dtype=jnp.float32)
        x = x + ClipAttention(c.hidden_size, c.num_heads, self.dtype,
                              name="self_attn")(ln(name="layer_norm1")(x))
        x = x + ClipMLP(c.hidden_size, c.intermediate_size, c.hidden_act, self.dtype,
                        name="mlp")(ln(name="layer_norm2")(x))
        return x


class ClipEncoder(nn.Module):
    """The stack of encoder layers (``encoder/layers_{i}``)."""
    config: ClipVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for i in range(self.config.num_layers):
            x = ClipEncoderLayer(self.config, self.dtype, name=f"layers_{i}")(x)
        return x


class ClipEmbeddings(nn.Module):
    """Patchify conv (no bias) + CLS token + learned position embedding."""
    image_size: int
    patch_size: int
    hidden_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        p = self.patch_size
        x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                    dtype=self.dtype, param_dtype=jnp.float32, name="patch_embedding")(x)
        b = x.shape[0]
        x = x.reshape(b, -1, self.hidden_size)
        cls = self.param("class_embedding", nn.initializers.normal(self.hidden_size ** -0.5),
                         (self.hidden_size,), jnp.float32)
        cls = jnp.broadcast_to(cls.astype(x.dtype), (b, 1, self.hidden_size))
        x = jnp.concatenate([cls, x], axis=1)
        num_positions = (self.image_size // p) ** 2 + 1
        pos = nn.Embed(num_positions, self.hidden_size, param_dtype=jnp.float32,
                       embedding_init=nn.initializers.normal(0.02), name="position_embedding")
        return x + pos.embedding.astype(x.dtype)[None]


class ClipVisionTower(nn.Module):
    """CLIP ViT vision tower returning projected patch features ``[B, grid^2, projection_dim]``.

    Input: normalised float images, NHWC, ``image_size`` square. Params are float32;
    ``dtype`` sets the activation dtype (bfloat16 on accelerators); the output is
    float32.
    """
    config: ClipVisionConfig
    dtype: Any = jnp.float32

    @classmethod
    def from_config(cls, config: ClipVisionConfig, dtype: Any = jnp.float32) -> "ClipVisionTower":
        return cls(config, dtype=dtype)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        if x.shape[1:3] != (c.image_size, c.image_size):
            raise ValueError(f"expected {c.image_size}x{c.image_size} images, got "
                             f"{x.shape[1]}x{x.shape[2]}")
        ln = functools.partial(nn.LayerNorm, epsilon=c.layer_norm_eps, dtype=self.dtype,
                               param_dtype=jnp.float32)
        x = ClipEmbeddings(c.image_size, c.patch_size, c.hidden_size, self.dtype,
                           name="embeddings")(x.astype(self.dtype))
        x = ln(name="pre_layrnorm")(x)
        x = ClipEncoder(c, self.dtype, name="encoder")(x)
        # The post-layernorm goes on every token (not only CLS, unlike CLIP's pooled output).
        x = ln(name="post_layernorm")(x[:, 1:])
        x = nn.Dense(c.projection_dim, use_bias=False, dtype=self.dtype,
                     param_dtype=jnp.float32, name="visual_projection")(x)
        return x.astype(jnp.float32)


# ------------------------------------------------------------------- preprocessing


def preprocess_image(image: np.ndarray, size: int) -> np.ndarray:
    """OpenAI CLIP geometry for one uint8 HWC RGB image -> uint8 ``[size, size, 3]``.

    PIL bicubic resize of the shorter side to ``size`` (long side
    ``int(size * long / short)``), then a centre crop with torchvision's rounding.
    Already ``size x size`` images are returned unchanged. Safe to call in data
    loader workers (numpy + PIL only).
    """
    from PIL import Image  # local: keep module import light for workers that never resize

    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an HWC image with 1, 3 or 4 channels, got {image.shape}")
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    elif image.shape[-1] == 4:
        image = image[..., :3]
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {image.dtype}")
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    short, long = (w, h) if w <= h else (h, w)
    if short != size:
        new_long = int(size * long / short)
        new_w, new_h = (size, new_long) if w <= h else (new_long, size)
        image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC))
        h, w = new_h, new_w
    if h < size or w < size:  # only possible when int() truncates the long side below size
        raise ValueError(f"image {h}x{w} smaller than the {size} px crop")
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return np.ascontiguousarray(image[top:top + size, left:left + size])


def normalize_images(images_uint8: Array, dtype: Any = jnp.float32) -> Array:
    """uint8 NHWC -> CLIP-normalised float: ``(x / 255 - mean) / std``."""
    x = images_uint8.astype(jnp.float32) / 255.0
    x = (x - jnp.asarray(CLIP_MEAN, jnp.float32)) / jnp.asarray(CLIP_STD, jnp.float32)
    return x.astype(dtype)


# ------------------------------------------------------------------ the extractor


def _apply_features(module: ClipVisionTower, params: Params, images_uint8: Array) -> Array:
    return module.apply({"params": params}, normalize_images(images_uint8, module.dtype))


# One compiled program per (tower geometry, dtype, input shape), shared by all extractors.
_jitted_features = jax.jit(_apply_features, static_argnums=0)


class ClipFeatureExtractor:
    """A CLIP vision tower with its weights: uint8 images in, patch features out.

    Attributes:
      config: the :class:`ClipVisionConfig`.
      params: float32 Flax params (a frozen network: keep it out of optimiser state).
      image_size, grid_size, feature_dim: input side, tokens per side, feature width.
      name: a KNOWN_GEOMETRIES name (e.g. 'ViT-L/14') or 'custom'.
    """

    def __init__(self, config: ClipVisionConfig, params: Params, *, dtype: Any = jnp.float32,
                 name: Optional[str] = None):
        self.config = config
        self.params = params
        self.dtype = dtype
        self.module = ClipVisionTower.from_config(config, dtype)
        self.name = name or geometry_name(config)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def grid_size(self) -> int:
        return self.config.grid_size

    @property
    def feature_dim(self) -> int:
        return self.config.projection_dim

    def __repr__(self):
        return (f"ClipFeatureExtractor(name={self.name!r}, image_size={self.image_size}, "
                f"grid_size={self.grid_size}, feature_dim={self.feature_dim})")

    def features_fn(self, params: Params, images_uint8: Array) -> Array:
        """Pure: uint8 ``[B, S, S, 3]`` -> float32 ``[B, grid^2, feature_dim]``.

        Suitable for ``jax.jit`` with sharded inputs (normalisation happens inside).
        """
        return _apply_features(self.module, params, images_uint8)

    def preprocess(self, images_uint8_nhwc: np.ndarray) -> np.ndarray:
        """Host side: resize + centre crop each image to ``image_size`` (no-op if already).

        Accepts a uint8 NHWC array, or a list of HWC images of different sizes.
        """
        s = self.image_size
        if isinstance(images_uint8_nhwc, (list, tuple)):
            return np.stack([preprocess_image(im, s) for im in images_uint8_nhwc])
        images = np.asarray(images_uint8_nhwc)
        if images.ndim == 4 and images.shape[1:3] == (s, s) and images.dtype == np.uint8:
            return images
        return np.stack([preprocess_image(im, s) for im in images])

    def patch_features(self, images_uint8_nhwc: np.ndarray) -> Array:
        """uint8 NHWC images (any size, or a list) -> float32 ``[B, grid^2, feature_dim]``."""
        return _jitted_features(self.module, self.params, self.preprocess(images_uint8_nhwc))


def random_init(config: ClipVisionConfig, seed: int = 0, *,
                dtype: Any = jnp.float32) -> ClipFeatureExtractor:
    """A randomly initialised tower (tests and demos without weights).

    Shapes come from ``jax.eval_shape`` and values from numpy (kernels and embeddings
    normal with std 1/sqrt(fan_in), layernorms identity, biases zero): XLA's CPU
    compile of a full ``init`` costs seconds, this costs nothing.
    """
    module = ClipVisionTower.from_config(config)
    x = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)["params"]
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = getattr(path[-1], "key", str(path[-1]))
        if name == "bias":
            return np.zeros(leaf.shape, np.float32)
        if name == "scale":
            return np.ones(leaf.shape, np.float32)
        fan_in = int(np.prod(leaf.shape[:-1])) if leaf.ndim > 1 else leaf.shape[-1]
        if name in ("embedding", "class_embedding"):
            fan_in = leaf.shape[-1]
        return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(fill, shapes)
    return ClipFeatureExtractor(config, params, dtype=dtype)


# ----------------------------------------------------------------------- loading


def _take(weights: Mapping[str, np.ndarray], key: str, shape: Tuple[int, ...],
          source: str) -> np.ndarray:
    if key not in weights:
        raise KeyError(f"{source}: missing weight {key!r} (expected shape {shape})")
    value = np.asarray(weights[key])
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{source}: weight {key!r} has shape {tuple(value.shape)}, "
                         f"expected {tuple(shape)} for this geometry")
    if value.dtype != np.float32:
        value = value.astype(np.float32)
    return value


def _dense(w: np.ndarray, b: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """PyTorch Linear weight [out, in] -> Flax Dense kernel [in, out]."""
    out = {"kernel": np.ascontiguousarray(w.T)}
    if b is not None:
        out["bias"] = b
    return out


def _ln(w: np.ndarray, b: np.ndarray) -> Dict[str, np.ndarray]:
    return {"scale": w, "bias": b}


def convert_hf_weights(weights: Mapping[str, np.ndarray], config: ClipVisionConfig,
                       source: str = "checkpoint") -> Params:
    """HF ``vision_model.*`` + ``visual_projection.weight`` -> Flax params (strict)."""
    c, d = config, config.hidden_size
    get = lambda k, s: _take(weights, k, s, source)
    v = "vision_model."
    params: Params = {
        "embeddings": {
            "patch_embedding": {"kernel": np.ascontiguousarray(get(
                v + "embeddings.patch_embedding.weight",
                (d, 3, c.patch_size, c.patch_size)).transpose(2, 3, 1, 0))},
            "class_embedding": get(v + "embeddings.class_embedding", (d,)),
            "position_embedding": {"embedding": get(
                v + "embeddings.position_embedding.weight", (c.num_patches + 1, d))},
        },
        "pre_layrnorm": _ln(get(v + "pre_layrnorm.weight", (d,)),
                            get(v + "pre_layrnorm.bias", (d,))),
        "post_layernorm": _ln(get(v + "post_layernorm.weight", (d,)),
                              get(v + "post_layernorm.bias", (d,))),
        "visual_projection": _dense(get("visual_projection.weight", (c.projection_dim, d))),
        "encoder": {},
    }
    for i in range(c.num_layers):
        p = f"{v}encoder.layers.{i}."
        lin = lambda n, o, i_: _dense(get(p + n + ".weight", (o, i_)), get(p + n + ".bias", (o,)))
        params["encoder"][f"layers_{i}"] = {
            "layer_norm1": _ln(get(p + "layer_norm1.weight", (d,)),
                               get(p + "layer_norm1.bias", (d,))),
            "layer_norm2": _ln(get(p + "layer_norm2.weight", (d,)),
                               get(p + "layer_norm2.bias", (d,))),
            "self_attn": {n: lin(f"self_attn.{n}", d, d)
                          for n in ("q_proj", "k_proj", "v_proj", "out_proj")},
            "mlp": {"fc1": lin("mlp.fc1", c.intermediate_size, d),
                    "fc2": lin("mlp.fc2", d, c.intermediate_size)},
        }
    extra = [k for k in weights
             if k.startswith(f"{v}encoder.layers.{c.num_layers}.")]
    if extra:
        raise ValueError(f"{source}: checkpoint has more than num_layers={c.num_layers} "
                         f"layers (found {extra[0]!r}); config.json disagrees with the weights")
    return params


def openai_to_hf_keys(weights: Mapping[str, np.ndarray], num_layers: int,
                      source: str = "checkpoint") -> Dict[str, np.ndarray]:
    """Rename OpenAI ``visual.*`` weights to HF keys (splitting the fused q/k/v)."""
    def get(k):
        if k not in weights:
            raise KeyError(f"{source}: missing weight {k!r}")
        return np.asarray(weights[k])

    v, o = "vision_model.", "visual."
    out = {
        v + "embeddings.patch_embedding.weight": get(o + "conv1.weight"),
        v + "embeddings.class_embedding": get(o + "class_embedding"),
        v + "embeddings.position_embedding.weight": get(o + "positional_embedding"),
        v + "pre_layrnorm.weight": get(o + "ln_pre.weight"),
        v + "pre_layrnorm.bias": get(o + "ln_pre.bias"),
        v + "post_layernorm.weight": get(o + "ln_post.weight"),
        v + "post_layernorm.bias": get(o + "ln_post.bias"),
        # OpenAI applies x @ proj with proj [width, out]; HF's Linear weight is its transpose.
        "visual_projection.weight": get(o + "proj").T,
    }
    for i in range(num_layers):
        s, t = f"{o}transformer.resblocks.{i}.", f"{v}encoder.layers.{i}."
        w_qkv, b_qkv = get(s + "attn.in_proj_weight"), get(s + "attn.in_proj_bias")
        if w_qkv.shape[0] % 3 or b_qkv.shape[0] != w_qkv.shape[0]:
            raise ValueError(f"{source}: {s}attn.in_proj_weight has shape {w_qkv.shape}, "
                             "expected [3 * width, width]")
        for name, w, b in zip(("q_proj", "k_proj", "v_proj"), np.split(w_qkv, 3),
                              np.split(b_qkv, 3)):
            out[f"{t}self_attn.{name}.weight"], out[f"{t}self_attn.{name}.bias"] = w, b
        for src, dst in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                         ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                         ("mlp.c_proj", "mlp.fc2")):
            out[f"{t}{dst}.weight"] = get(f"{s}{src}.weight")
            out[f"{t}{dst}.bias"] = get(f"{s}{src}.bias")
    return out


def infer_openai_config(weights: Mapping[str, np.ndarray], source: str = "checkpoint",
                        config: Optional[ClipVisionConfig] = None) -> ClipVisionConfig:
    """Geometry of an OpenAI ``visual.*`` state dict, checked against KNOWN_GEOMETRIES.

    OpenAI checkpoints carry no config: shapes give everything but the head count,
    which is only defined for the known geometries (width // 64). Other shapes need
    an explicit ``config``, which is then checked against the weights.
    """
    needed = ("visual.conv1.weight", "visual.positional_embedding", "visual.proj",
              "visual.transformer.resblocks.0.mlp.c_fc.weight")
    missing = [k for k in needed if k not in weights]
    if missing:
        raise KeyError(f"{source}: not an OpenAI CLIP checkpoint, missing {missing} "
                       f"(found e.g. {sorted(weights)[:5]})")
    width, _, patch, _ = weights["visual.conv1.weight"].shape
    num_pos = weights["visual.positional_embedding"].shape[0]
    grid = int(round(math.sqrt(num_pos - 1)))
    layers = 0
    while f"visual.transformer.resblocks.{layers}.ln_1.weight" in weights:
        layers += 1
    mlp = weights["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    shapes = dict(image_size=grid * patch, patch_size=patch, hidden_size=width,
                  num_layers=layers, intermediate_size=mlp,
                  projection_dim=weights["visual.proj"].shape[1])
    if grid * grid != num_pos - 1:
        raise ValueError(f"{source}: visual.positional_embedding has {num_pos} rows, not "
                         "1 + grid^2")
    if config is not None:
        bad = {k: (getattr(config, k), v) for k, v in shapes.items() if getattr(config, k) != v}
        if bad:
            raise ValueError(f"{source}: the given config disagrees with the weights "
                             f"(field: (config, weights)) {bad}")
        return config
    for known in KNOWN_GEOMETRIES.values():
        if all(getattr(known, k) == v for k, v in shapes.items()):
            return known
    raise ValueError(
        f"{source}: CLIP geometry {shapes} is not a known OpenAI model; known geometries: "
        f"{_known_geometries_text()}. Pass config=ClipVisionConfig(...) for another model.")


_HF_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, projection_dim=512,
                           num_hidden_layers=12, num_attention_heads=12, image_size=224,
                           patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def config_from_hf(cfg: Mapping[str, Any]) -> ClipVisionConfig:
    """ClipVisionConfig from an HF ``config.json`` (CLIPConfig or CLIPVisionConfig)."""
    if "vision_config" in cfg:
        vision = dict(cfg.get("vision_config") or {})
        # CLIPModel's visual_projection uses the top-level projection_dim (default 512),
        # not vision_config's own.
        vision["projection_dim"] = cfg.get("projection_dim", 512)
    else:
        vision = dict(cfg)
    v = {**_HF_VISION_DEFAULTS, **{k: x for k, x in vision.items() if x is not None}}
    if v.get("num_channels", 3) != 3:
        raise ValueError(f"only 3-channel CLIP towers are supported, got {v['num_channels']}")
    return ClipVisionConfig(
        image_size=int(v["image_size"]), patch_size=int(v["patch_size"]),
        hidden_size=int(v["hidden_size"]), num_layers=int(v["num_hidden_layers"]),
        num_heads=int(v["num_attention_heads"]), intermediate_size=int(v["intermediate_size"]),
        projection_dim=int(v["projection_dim"]), layer_norm_eps=float(v["layer_norm_eps"]),
        hidden_act=str(v["hidden_act"]))


def _hf_needed_keys(config: ClipVisionConfig):
    v = "vision_model."
    keys = [v + "embeddings.patch_embedding.weight", v + "embeddings.class_embedding",
            v + "embeddings.position_embedding.weight", v + "pre_layrnorm.weight",
            v + "pre_layrnorm.bias", v + "post_layernorm.weight", v + "post_layernorm.bias",
            "visual_projection.weight"]
    for i in range(config.num_layers):
        for n in ("layer_norm1", "layer_norm2", "self_attn.q_proj", "self_attn.k_proj",
                  "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"):
            keys += [f"{v}encoder.layers.{i}.{n}.weight", f"{v}encoder.layers.{i}.{n}.bias"]
    return keys


def _read_safetensors(files_to_keys: Mapping[str, list]) -> Dict[str, np.ndarray]:
    """Read only the named tensors from each file, as float32 numpy."""
    from safetensors import safe_open

    out = {}
    for filename, keys in files_to_keys.items():
        with safe_open(filename, framework="numpy") as f:
            present = set(f.keys())
            for k in keys:
                if k in present:
                    # bfloat16/float16 checkpoints widen to float32 (params stay float32).
                    out[k] = np.asarray(f.get_tensor(k)).astype(np.float32)
    return out


def _hf_snapshot_error(path: str, why: str) -> FileNotFoundError:
    found = sorted(os.listdir(path)) if os.path.isdir(path) else []
    return FileNotFoundError(
        f"{why}: expected a Hugging Face CLIP snapshot with config.json and model.safetensors "
        f"(or model.safetensors.index.json + its model-0000i-of-0000n.safetensors shards) "
        f"in {path}, found: {found}")


def _load_hf(path: str, dtype: Any) -> ClipFeatureExtractor:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise _hf_snapshot_error(path, "no config.json")
    with open(cfg_path) as f:
        config = config_from_hf(json.load(f))
    needed = _hf_needed_keys(config)
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        files = {single: needed}
    elif os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
        files = {}
        for k in needed:
            if k in weight_map:
                files.setdefault(os.path.join(path, weight_map[k]), []).append(k)
        missing = sorted(os.path.basename(p) for p in files if not os.path.isfile(p))
        if missing:
            raise _hf_snapshot_error(
                path, f"model.safetensors.index.json names shard(s) {missing} that are missing")
    else:
        shards = glob.glob(os.path.join(path, "*.safetensors"))
        why = ("no model.safetensors or model.safetensors.index.json" +
               (f" (shards without an index: {[os.path.basename(s) for s in shards]})"
                if shards else ""))
        raise _hf_snapshot_error(path, why)
    weights = _read_safetensors(files)
    params = convert_hf_weights(weights, config, source=path)
    return ClipFeatureExtractor(config, params, dtype=dtype)


def _load_openai(path: str, dtype: Any,
                 config: Optional[ClipVisionConfig]) -> ClipFeatureExtractor:
    from vqlc.torch_files import load_torch_file

    weights = load_torch_file(path)
    # Some exports nest the model one level down (e.g. "model.visual.conv1.weight").
    if "visual.conv1.weight" not in weights:
        for prefix in ("model.", "module.", "clip.", "clip_model."):
            if prefix + "visual.conv1.weight" in weights:
                weights = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
                break
    config = infer_openai_config(weights, source=path, config=config)
    hf = openai_to_hf_keys(weights, config.num_layers, source=path)
    params = convert_hf_weights(hf, config, source=path)
    return ClipFeatureExtractor(config, params, dtype=dtype)


def load(path: str, *, dtype: Any = jnp.float32,
         config: Optional[ClipVisionConfig] = None) -> ClipFeatureExtractor:
    """Load a CLIP vision tower from a local HF snapshot directory or an OpenAI ``.pt``.

    Args:
      path: a directory with ``config.json`` + ``model.safetensors`` (or
        ``model.safetensors.index.json`` + shards), or an OpenAI ``.pt`` file
        (TorchScript as released, or a ``torch.save``'d state dict).
      dtype: activation dtype (params stay float32; features are float32).
      config: only for ``.pt`` files of a geometry outside KNOWN_GEOMETRIES
        (OpenAI files carry no head count); checked against the weights.

    Raises:
      FileNotFoundError: path missing, or a snapshot lacking config.json / weights /
        a shard named by the index (the message names the expected files).
      KeyError / ValueError: a needed weight missing or of the wrong shape, or an
        unrecognised geometry (the message lists the known ones).
    """
    path = os.fspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"CLIP weights not found at {path}: give a Hugging Face snapshot directory "
            "(config.json + model.safetensors, or model.safetensors.index.json + shards) "
            "or OpenAI's ViT-L-14.pt")
    if os.path.isdir(path):
        return _load_hf(path, dtype)
    return _load_openai(path, dtype, config)
