"""A Vision Transformer classifier shaped as MAE fine-tunes ViT-B/16 (facebookresearch/mae,
models_vit.py over timm's VisionTransformer), in Flax Linen, whose input is an image or a
tokenizer's token map through a stem.

Forward (MAE's models_vit.VisionTransformer with global_pool=True):
  x = stem(inputs)                         [B, grid*grid, width], tokens row-major
  x = concat(cls_token, x) + pos_embed     learned, [1, 1 + grid*grid, width]
  x = blocks_i(x)                          pre-norm blocks, drop path on both residual branches
  out = head(fc_norm(mean(x[:, 1:])))      global_pool=True: mean of the patch tokens
  out = head(norm(x)[:, 0])                global_pool=False: the class token (timm's default)

A block (timm's Block): x = x + drop_path(attn(norm1(x))); x = x + drop_path(mlp(norm2(x))), with
fused qkv (with bias) split as [3, heads, head_dim], exact GELU (torch's nn.GELU default), and
LayerNorms with eps 1e-6 (MAE's norm_layer), always float32.

Stems (`stem`): what enters the transformer in place of MAE's patch embedding.
  pixels     images [B, H, W, in_channels] (H = W = grid * patch_size) through `patch_embed/proj`,
             a conv with kernel = stride = patch_size: MAE's own. For token maps the caller
             decodes the map first (the classifier sees reconstructions).
  projected  per-token vectors [B, grid, grid, in_channels]: each token's projected code
             proj(C)[id] (the tokenizer's latent, e.g. 8-d) -> `stem/proj` Linear(d, width).
  codebook   per-token vectors [B, grid, grid, in_channels]: the frozen codebook row C[id]
             (VQGAN-LC's 768-d CLIP features) -> `stem/proj` Linear(D, width).
  embed      int ids [B, grid, grid] in [0, vocab_size) -> `stem/embedding` (a
             learned table of vocab_size x width). It also takes float vectors
             [B, grid, grid, width] already gathered from that table (`embed_ids`), so mixup
             can mix embedded vectors (ids cannot be averaged; see vqlc.cls.recipe).
The network never holds the tokenizer: the caller gathers proj(C)[id] or C[id]. A 16 x 16 token
map (256 px through an f16 tokenizer) is ViT-B/16's grid at 256 px; MAE's 14 x 14 table is
interpolated to it at conversion (vqlc.cls.pos_embed).

Parameter names follow timm's / MAE's state dict so vqlc.cls.convert_mae maps keys 1:1:
  cls_token [1, 1, width], pos_embed [1, 1 + grid*grid, width], patch_embed/proj (pixels),
  blocks_{i}/{norm1, attn/{qkv, proj}, norm2, mlp/{fc1, fc2}}, fc_norm (global_pool) or norm,
  head; the token stems' `stem/{proj, embedding}` are ours (not in MAE's checkpoint).

Initialisation (for training from scratch, and for what MAE's checkpoint lacks): timm's, as MAE
fine-tunes: linears truncated normal std 0.02 (flax's truncation at 2 std), zero biases;
pos_embed truncated normal 0.02; cls_token normal 1e-6; LayerNorms 1 / 0; the head truncated
normal std 2e-5 with zero bias (main_finetune.py's trunc_normal_(head.weight, std=2e-5)); the
patch conv torch's Conv2d default (kaiming uniform a = sqrt(5): U(+-1/sqrt(fan_in))); the `embed`
table normal 0.02.

Drop path (stochastic depth): block i drops each sample's residual branch with probability
drop_path * i / (depth - 1) (timm's linspace), scaling kept ones by 1 / keep; active only with
train=True, and then it needs a 'dropout' rng (model.apply(..., rngs={"dropout": key})): a
missing rng is an error, not a silent deterministic pass. At eval (train=False) it is the
identity.

`dtype` is the compute dtype of the linears, the conv and attention; parameters, LayerNorms, the
residual stream and the logits stay float32. `remat` recomputes each block's activations in the
backward pass (nn.remat).
"""
from __future__ import annotations

import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqlc.gen.networks import dit  # timm's Attention and Mlp, shared with DiT
from vqlc.models.build import COMPUTE_DTYPES

STEMS = ("pixels", "projected", "codebook", "embed")
NORM_EPS = 1e-6  # MAE's partial(nn.LayerNorm, eps=1e-6)
INIT_STD = 0.02  # timm's trunc_normal_(std=.02) of linears and pos_embed
HEAD_INIT_STD = 2e-5  # MAE's main_finetune.py: trunc_normal_(model.head.weight, std=2e-5)
CLS_INIT_STD = 1e-6  # timm's nn.init.normal_(cls_token, std=1e-6)

# name -> (depth, width, heads). MAE's ViT-B/L/H; "Ti" ours: a toy for CPU demos and tests.
SIZES = {"B": (12, 768, 12), "L": (24, 1024, 16), "H": (32, 1280, 16), "Ti": (4, 128, 4)}

TRUNC = nn.initializers.truncated_normal(INIT_STD)
ZEROS = nn.initializers.zeros
# torch's Conv2d default weight init: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), +...).
TORCH_CONV = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=(0, 1, 2),
                                              out_axis=-1)


def linear(features: int, name: str, dtype: Any, kernel_init=TRUNC) -> nn.Dense:
    """dit.linear with timm's ViT init (trunc normal, std 0.02)."""
    return dit.linear(features, name, dtype, kernel_init)


def layer_norm(name: str) -> nn.LayerNorm:
    """MAE's LayerNorm (eps 1e-6, affine, two-pass variance), always float32."""
    return nn.LayerNorm(epsilon=NORM_EPS, use_fast_variance=False, dtype=jnp.float32,
                        param_dtype=jnp.float32, name=name)


def drop_path_rates(drop_path: float, depth: int) -> list:
    """timm's per-block stochastic-depth rates: linspace(0, drop_path, depth)."""
    return [float(r) for r in np.linspace(0.0, drop_path, depth)] if depth else []


# ------------------------------------------------------------------------------------ blocks

def drop_path(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """timm's drop_path: each sample's branch kept with probability 1 - rate, scaled by
    1 / (1 - rate)."""
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


class Block(nn.Module):
    """timm's pre-norm Block with stochastic depth `drop_rate` on both branches."""
    num_heads: int
    mlp_ratio: float = 4.0
    drop_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        width = x.shape[-1]
        active = train and self.drop_rate > 0.0

        def branch(y):
            if not active:
                return y
            return drop_path(y, self.drop_rate, self.make_rng("dropout"))

        x = x + branch(dit.Attention(self.num_heads, self.dtype, TRUNC, name="attn")(
            layer_norm("norm1")(x)).astype(jnp.float32))
        mlp = dit.Mlp(int(width * self.mlp_ratio), self.dtype, approximate_gelu=False,
                      kernel_init=TRUNC, name="mlp")
        return x + branch(mlp(layer_norm("norm2")(x)).astype(jnp.float32))


class PatchEmbed(nn.Module):
    """images [B, H, W, C] -> [B, (H/p)*(W/p), width] via a conv, kernel = stride = p (torch's
    Conv2d default init: weight and bias U(+-1/sqrt(C * p * p)))."""
    patch_size: int
    width: int
    in_channels: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.patch_size
        bound = 1.0 / math.sqrt(self.in_channels * p * p)
        y = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    param_dtype=jnp.float32, kernel_init=TORCH_CONV,
                    bias_init=lambda key, shape, dtype=jnp.float32: jax.random.uniform(
                        key, shape, dtype, -bound, bound),
                    name="proj")(x)
        return y.reshape(y.shape[0], -1, self.width)


class TokenStem(nn.Module):
    """A token map's stem -> [B, h*w, width], tokens row-major: `proj` (Linear) for projected /
    codebook vectors; `embedding` (a vocab_size x width table) for ids, or for float vectors
    already gathered from that table (embed_ids)."""
    kind: str
    width: int
    vocab_size: int = 0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b = x.shape[0]
        if self.kind != "embed":
            return linear(self.width, "proj", self.dtype)(x).reshape(b, -1, self.width)
        table = self.param("embedding", nn.initializers.normal(INIT_STD),
                           (self.vocab_size, self.width), jnp.float32)
        vectors = x if jnp.issubdtype(x.dtype, jnp.floating) else jnp.take(table, x, axis=0)
        return vectors.reshape(b, -1, self.width)


def embed_ids(params, ids: jax.Array) -> jax.Array:
    """ids [B, h, w] -> float32 [B, h, w, width] from an `embed` stem's table in `params` (the
    model's params dict): what mixup mixes for that stem (differentiable in params)."""
    try:
        table = params["stem"]["embedding"]
    except (KeyError, TypeError):
        raise ValueError("embed_ids needs the params of a ViT with stem='embed' "
                         "(params['stem']['embedding']).") from None
    return jnp.take(table, ids, axis=0)


# ---------------------------------------------------------------------------------- the model

class ViT(nn.Module):
    """A ViT classifier over images or token maps; see the module docstring."""
    grid_size: int  # tokens per side (image side / patch_size for `pixels`, the map's side)
    num_classes: int = 1000
    depth: int = 12
    width: int = 768
    num_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 16  # `pixels` only
    stem: str = "pixels"
    in_channels: int = 3  # pixels: image channels; projected / codebook: the vector's size
    vocab_size: int = 0  # embed: the number of token ids
    global_pool: bool = True  # MAE fine-tuning's: mean of patch tokens -> fc_norm -> head
    drop_path: float = 0.0  # the last block's stochastic-depth rate (MAE fine-tunes with 0.1)
    dtype: Any = jnp.float32
    remat: bool = False

    @property
    def num_positions(self) -> int:
        return 1 + self.grid_size * self.grid_size

    def check_config(self) -> None:
        if self.stem not in STEMS:
            raise ValueError(f"stem={self.stem!r}; valid: {', '.join(STEMS)}.")
        if self.width % self.num_heads:
            raise ValueError(f"width={self.width} is not a multiple of "
                             f"num_heads={self.num_heads}.")
        if self.stem == "embed" and self.vocab_size < 1:
            raise ValueError("stem='embed' needs vocab_size (the tokenizer's number of codes).")
        if self.grid_size < 1 or self.num_classes < 1:
            raise ValueError(f"grid_size={self.grid_size} and num_classes={self.num_classes} "
                             "must be positive.")

    def input_shape(self, batch: int = 1) -> tuple:
        """The shape __call__ takes (ids for `embed`)."""
        g = self.grid_size
        if self.stem == "pixels":
            side = g * self.patch_size
            return (batch, side, side, self.in_channels)
        if self.stem == "embed":
            return (batch, g, g)
        return (batch, g, g, self.in_channels)

    def dummy_input(self, batch: int = 1) -> jax.Array:
        dtype = jnp.int32 if self.stem == "embed" else jnp.float32
        return jnp.zeros(self.input_shape(batch), dtype)

    def _check_input(self, x) -> None:
        want = self.input_shape(x.shape[0] if x.ndim else 1)
        g = self.grid_size
        if self.stem == "embed" and jnp.issubdtype(x.dtype, jnp.floating):
            want = (x.shape[0], g, g, self.width)  # vectors gathered from the table
            what = "embedded vectors (embed_ids)"
        elif self.stem == "embed":
            what = "int token ids"
        elif self.stem == "pixels":
            what = "NHWC images"
        else:
            what = f"per-token {self.stem} vectors"
        if tuple(x.shape) != want:
            grid_hint = ""
            if x.ndim >= 3 and x.shape[1:3] != want[1:3]:
                grid_hint = (f" The position embedding holds {self.num_positions} rows (class "
                             f"token + a {g}x{g} grid): a different grid needs its table "
                             "interpolated (vqlc.cls.pos_embed.interpolate_pos_embed, done by "
                             "vqlc.cls.convert_mae) and the model built with that grid_size.")
            raise ValueError(f"ViT(stem={self.stem!r}, grid_size={g}) expects {what} "
                             f"{list(want)}, got {list(x.shape)} ({x.dtype}).{grid_hint}")
        if self.stem != "embed" and not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"stem={self.stem!r} takes float inputs, got {x.dtype}; only "
                             "stem='embed' takes token ids.")

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x: see `input_shape` (ids or float vectors for `embed`) -> float32 logits
        [B, num_classes]. train=True turns drop path on (needs a 'dropout' rng)."""
        self.check_config()
        self._check_input(x)
        if self.stem == "pixels":
            tokens = PatchEmbed(self.patch_size, self.width, self.in_channels, self.dtype,
                                name="patch_embed")(x)
        else:
            tokens = TokenStem(self.stem, self.width, self.vocab_size, self.dtype,
                               name="stem")(x)
        tokens = tokens.astype(jnp.float32)
        cls_token = self.param("cls_token", nn.initializers.normal(CLS_INIT_STD),
                               (1, 1, self.width), jnp.float32)
        pos_embed = self.param("pos_embed", TRUNC, (1, self.num_positions, self.width),
                               jnp.float32)
        if pos_embed.shape[1] != tokens.shape[1] + 1:
            raise ValueError(f"pos_embed has {pos_embed.shape[1]} rows but the stem gives "
                             f"{tokens.shape[1]} tokens + the class token.")
        b = tokens.shape[0]
        x = jnp.concatenate([jnp.broadcast_to(cls_token, (b, 1, self.width)), tokens], axis=1)
        x = x + pos_embed
        if train and self.drop_path > 0.0 and not self.has_rng("dropout"):
            raise ValueError(f"drop_path={self.drop_path} with train=True needs a 'dropout' "
                             "rng: model.apply(variables, x, train=True, "
                             "rngs={'dropout': key}).")
        block = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
        for i, rate in enumerate(drop_path_rates(self.drop_path, self.depth)):
            x = block(self.num_heads, self.mlp_ratio, rate, self.dtype, name=f"blocks_{i}")(
                x, train)
        if self.global_pool:
            features = layer_norm("fc_norm")(x[:, 1:].mean(axis=1))
        else:
            features = layer_norm("norm")(x)[:, 0]
        head = linear(self.num_classes, "head", self.dtype,
                      nn.initializers.truncated_normal(HEAD_INIT_STD))
        return head(features).astype(jnp.float32)


def make_vit(name: str, **fields) -> ViT:
    """ViT by "<size>/<patch>" (e.g. "B/16", MAE's vit_base_patch16; "Ti/16" a CPU toy) plus
    module fields (grid_size, num_classes, stem, ...). dtype may be a config.model.dtype
    string."""
    match = re.fullmatch(r"(\w+)/(\d+)", name)
    if not match or match.group(1) not in SIZES or int(match.group(2)) < 1:
        raise ValueError(f"ViT name {name!r} is not <size>/<patch>; valid sizes: "
                         f"{', '.join(SIZES)} (e.g. 'B/16').")
    clash = {"depth", "width", "num_heads", "patch_size"} & set(fields)
    if clash:
        raise ValueError(f"{', '.join(sorted(clash))} come from the name {name!r}; "
                         f"do not pass them too.")
    depth, width, num_heads = SIZES[match.group(1)]
    if isinstance(fields.get("dtype"), str):
        fields["dtype"] = COMPUTE_DTYPES[fields["dtype"]]
    return ViT(patch_size=int(match.group(2)), depth=depth, width=width, num_heads=num_heads,
               **fields)


def param_shapes(model: ViT):
    """The parameter tree as ShapeDtypeStructs (jax.eval_shape: nothing is allocated)."""
    return jax.eval_shape(model.init, jax.random.key(0), model.dummy_input())["params"]


def init_params(model: ViT, key: jax.Array):
    """Fresh parameters (timm's / MAE's init, see the module docstring)."""
    return model.init(key, model.dummy_input())["params"]
