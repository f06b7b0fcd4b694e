"""DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers") in Flax Linen, over NHWC
latents. The same backbone serves SiT, whose network is DiT's with t in [0, 1].

Forward (DiT's `models.py`):
  tokens = x_embedder(x) + pos_embed       patch conv (kernel = stride = patch), fixed 2-D sin-cos
  c = t_embedder(t) + y_embedder(labels)   sinusoidal t (256 frequencies) -> MLP; label table
  tokens = blocks_i(tokens, c)             adaLN-Zero blocks
  out = unpatchify(final_layer(tokens, c))

A block: shift/scale/gate for attention and MLP come from adaLN_modulation_1(silu(c)), and
  x = x + gate_msa * attn(modulate(norm1(x), shift_msa, scale_msa))
  x = x + gate_mlp * mlp(modulate(norm2(x), shift_mlp, scale_mlp))
with modulate(x, shift, scale) = x * (1 + scale) + shift and affine-free LayerNorms (eps 1e-6).

Parameter names follow DiT's state dict, with torch's `Sequential` index kept in the name
(`t_embedder.mlp.0` -> `t_embedder/mlp_0`, `adaLN_modulation.1` -> `adaLN_modulation_1`):
  x_embedder/proj, t_embedder/{mlp_0,mlp_2}, y_embedder/embedding_table,
  blocks_{i}/attn/{qkv,proj}, blocks_{i}/mlp/{fc1,fc2}, blocks_{i}/adaLN_modulation_1,
  final_layer/{adaLN_modulation_1,linear}.
DiT's `pos_embed` is a frozen buffer; here it is a constant computed in the forward pass, so it
is not in the parameter tree.

Channel order of `final_layer/linear`'s outputs (DiT's `unpatchify`): per token, the
patch*patch*out_channels outputs are read as (p, q, c): row within the patch, column within
the patch, channel. Token (i, j) of the h x w token grid (row-major) fills pixels
(i*p + p_, j*p + q_). With learn_sigma the first C channels are the prediction (noise,
velocity, ...) and the last C the variance interpolation.

Labels are int32 in [0, num_classes]; num_classes is the null class (guidance's unconditional
branch). The network is deterministic: label dropout is the caller's (it passes the null label).

`dtype` is the compute dtype of the linears and the patch conv; parameters, LayerNorms, the
time frequencies, the residual stream and the output stay float32. `remat` recomputes each
block's activations in the backward pass (nn.remat).
"""
from __future__ import annotations

import math
import re
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqlc.models import activations
from vqlc.models.build import COMPUTE_DTYPES

FREQUENCY_EMBEDDING_SIZE = 256  # DiT's TimestepEmbedder default
MAX_PERIOD = 10000.0  # both the time embedding's and the position embedding's base
NORM_EPS = 1e-6
EMBED_STD = 0.02  # DiT's init of the label table and the time MLP

# (depth, width, heads). DiT's four sizes, and "Ti", ours: a toy for CPU demos and tests.
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16),
         "Ti": (4, 128, 4)}

XAVIER = nn.initializers.xavier_uniform()
# torch's xavier_uniform_ on the conv weight viewed as [hidden, C*p*p]: fan_in C*p*p and
# fan_out hidden (flax's conv default would count fan_out as hidden*p*p).
PATCH_XAVIER = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform",
                                                in_axis=(0, 1, 2), out_axis=-1)
ZEROS = nn.initializers.zeros


def linear(features: int, name: str, dtype: Any, kernel_init=XAVIER) -> nn.Dense:
    """A linear layer with bias: float32 parameters, `dtype` compute, zero bias."""
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=kernel_init,
                    bias_init=ZEROS, name=name)


def layer_norm(name: str) -> nn.LayerNorm:
    """DiT's affine-free LayerNorm (eps 1e-6, two-pass variance), always float32."""
    return nn.LayerNorm(epsilon=NORM_EPS, use_bias=False, use_scale=False,
                        use_fast_variance=False, dtype=jnp.float32, name=name)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """x [B, T, D] scaled and shifted per sample by shift, scale [B, D]."""
    return x * (1 + scale[:, None]) + shift[:, None]


# ------------------------------------------------------------------------- fixed embeddings

def sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    """[len(positions), embed_dim]: sin of positions * omega_k, then cos, for
    omega_k = 1 / 10000^(k / (embed_dim / 2)), k < embed_dim / 2 (MAE's / DiT's 1-D table)."""
    omega = 1.0 / MAX_PERIOD ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2))
    angles = np.outer(positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> np.ndarray:
    """DiT's get_2d_sincos_pos_embed: float32 [grid_size**2, embed_dim], tokens row-major.

    The first half of the channels encodes the token's column, the second half its row: DiT
    builds the grid with np.meshgrid(grid_w, grid_h), whose first array varies along columns.
    """
    if embed_dim % 4:
        raise ValueError(f"the 2-D sin-cos position embedding needs hidden_size divisible by "
                         f"4, got {embed_dim}.")
    rows, cols = np.divmod(np.arange(grid_size * grid_size), grid_size)
    table = np.concatenate([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)],
                           axis=1)
    return table.astype(np.float32)


def timestep_embedding(t: jax.Array, dim: int = FREQUENCY_EMBEDDING_SIZE) -> jax.Array:
    """DiT's TimestepEmbedder.timestep_embedding: float32 [B, dim], cos then sin of
    t * 10000^(-k / (dim/2)). Float32 whatever the compute dtype: t reaches 999."""
    half = dim // 2
    freqs = jnp.exp(-math.log(MAX_PERIOD) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = t.astype(jnp.float32)[:, None] * freqs[None]
    embedding = jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)
    if dim % 2:
        embedding = jnp.pad(embedding, ((0, 0), (0, 1)))
    return embedding


# -------------------------------------------------------------------- patchify / unpatchify

def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C], each token's values ordered (p, q, c)."""
    return einops.rearrange(images, "b (h p) (w q) c -> b (h w) (p q c)",
                            p=patch_size, q=patch_size)


def unpatchify(tokens: jax.Array, patch_size: int, grid_size: int) -> jax.Array:
    """The inverse of patchify for a square grid (DiT's unpatchify, in NHWC)."""
    return einops.rearrange(tokens, "b (h w) (p q c) -> b (h p) (w q) c",
                            h=grid_size, w=grid_size, p=patch_size, q=patch_size)


# -------------------------------------------------------------------------------- embedders

class PatchEmbed(nn.Module):
    """x [B, H, W, C] -> tokens [B, (H/p)*(W/p), hidden], row-major, via a strided conv."""
    patch_size: int
    hidden_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.patch_size
        y = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID",
                    dtype=self.dtype, param_dtype=jnp.float32, kernel_init=PATCH_XAVIER,
                    bias_init=ZEROS, name="proj")(x)
        return y.reshape(y.shape[0], -1, self.hidden_size)


class TimestepEmbedder(nn.Module):
    """t [B] -> [B, hidden]: sinusoidal frequencies -> mlp_0 -> SiLU -> mlp_2."""
    hidden_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        init = nn.initializers.normal(EMBED_STD)
        h = linear(self.hidden_size, "mlp_0", self.dtype, init)(timestep_embedding(t))
        return linear(self.hidden_size, "mlp_2", self.dtype, init)(jax.nn.silu(h))


class LabelEmbedder(nn.Module):
    """labels [B] in [0, num_classes] -> [B, hidden]; row num_classes is the null class."""
    num_classes: int
    hidden_size: int

    @nn.compact
    def __call__(self, labels: jax.Array) -> jax.Array:
        table = nn.Embed(self.num_classes + 1, self.hidden_size, dtype=jnp.float32,
                         param_dtype=jnp.float32,
                         embedding_init=nn.initializers.normal(EMBED_STD),
                         name="embedding_table")
        return table(labels)


# ------------------------------------------------------------------------------------ blocks

class Attention(nn.Module):
    """timm's Attention (DiT's and ViT's): fused qkv with bias, heads split as
    [3, heads, dim], then proj."""
    num_heads: int
    dtype: Any = jnp.float32
    kernel_init: Any = XAVIER

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, width = x.shape
        qkv = linear(3 * width, "qkv", self.dtype, self.kernel_init)(x)
        qkv = qkv.reshape(b, t, 3, self.num_heads, width // self.num_heads)
        out = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
        return linear(width, "proj", self.dtype, self.kernel_init)(out.reshape(b, t, width))


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2: the tanh approximation as DiT, exact (torch's nn.GELU) as ViT."""
    hidden_features: int
    dtype: Any = jnp.float32
    approximate_gelu: bool = True
    kernel_init: Any = XAVIER

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = linear(self.hidden_features, "fc1", self.dtype, self.kernel_init)(x)
        h = activations.gelu(h, self.approximate_gelu)
        return linear(x.shape[-1], "fc2", self.dtype, self.kernel_init)(h)


class DiTBlock(nn.Module):
    """An adaLN-Zero block: the identity at init (its modulation layer starts at zero)."""
    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        width = x.shape[-1]
        modulation = linear(6 * width, "adaLN_modulation_1", self.dtype, ZEROS)(jax.nn.silu(c))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(
            modulation, 6, axis=-1)
        attn = Attention(self.num_heads, self.dtype, name="attn")
        x = x + gate_msa[:, None] * attn(modulate(layer_norm("norm1")(x), shift_msa, scale_msa))
        mlp = Mlp(int(width * self.mlp_ratio), self.dtype, name="mlp")
        return x + gate_mlp[:, None] * mlp(modulate(layer_norm("norm2")(x), shift_mlp,
                                                     scale_mlp))


class FinalLayer(nn.Module):
    """norm_final -> modulate(shift, scale from c) -> linear to patch*patch*out_channels."""
    outputs_per_token: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        modulation = linear(2 * x.shape[-1], "adaLN_modulation_1", self.dtype, ZEROS)(
            jax.nn.silu(c))
        shift, scale = jnp.split(modulation, 2, axis=-1)
        x = modulate(layer_norm("norm_final")(x), shift, scale)
        return linear(self.outputs_per_token, "linear", self.dtype, ZEROS)(x)


# ---------------------------------------------------------------------------------- the model

class DiT(nn.Module):
    """DiT over NHWC latents [B, input_size, input_size, in_channels]."""
    input_size: int  # the latent grid side (h = w)
    patch_size: int
    in_channels: int
    hidden_size: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    learn_sigma: bool = True
    dtype: Any = jnp.float32
    remat: bool = False

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def null_label(self) -> int:
        """The label that stands for "no class" (guidance's unconditional branch)."""
        return self.num_classes

    @property
    def grid_size(self) -> int:
        """Tokens per side."""
        return self.input_size // self.patch_size

    def check_geometry(self, x_shape) -> None:
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size={self.input_size} is not a multiple of "
                             f"patch_size={self.patch_size}.")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of "
                             f"num_heads={self.num_heads}.")
        expected = (self.input_size, self.input_size, self.in_channels)
        if tuple(x_shape[1:]) != expected:
            raise ValueError(f"DiT expects latents [B, {', '.join(map(str, expected))}] "
                             f"(NHWC), got {list(x_shape)}.")

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, labels: jax.Array) -> jax.Array:
        """x [B, h, w, C], t [B] (DiT: 0..999, SiT: [0, 1]), labels int32 [B] in
        [0, num_classes] -> float32 [B, h, w, out_channels]."""
        self.check_geometry(x.shape)
        pos_embed = sincos_pos_embed_2d(self.hidden_size, self.grid_size)
        tokens = PatchEmbed(self.patch_size, self.hidden_size, self.dtype,
                            name="x_embedder")(x) + pos_embed[None]
        c = (TimestepEmbedder(self.hidden_size, self.dtype, name="t_embedder")(t)
             + LabelEmbedder(self.num_classes, self.hidden_size, name="y_embedder")(labels))
        block = nn.remat(DiTBlock) if self.remat else DiTBlock
        for i in range(self.depth):
            tokens = block(self.num_heads, self.mlp_ratio, self.dtype, name=f"blocks_{i}")(
                tokens, c)
        out = FinalLayer(self.patch_size ** 2 * self.out_channels, self.dtype,
                         name="final_layer")(tokens, c)
        return unpatchify(out.astype(jnp.float32), self.patch_size, self.grid_size)


def make_dit(name: str, **fields) -> DiT:
    """DiT by its paper name, "<size>/<patch>" (e.g. "XL/2", "S/4", "B/8"), plus module
    fields (input_size, in_channels, ...). dtype may be a config.model.dtype string."""
    match = re.fullmatch(r"(\w+)/(\d+)", name)
    if not match or match.group(1) not in SIZES or int(match.group(2)) < 1:
        raise ValueError(f"DiT name {name!r} is not <size>/<patch>; valid sizes: "
                         f"{', '.join(SIZES)} (e.g. 'XL/2', 'B/4', 'S/8').")
    clash = {"depth", "hidden_size", "num_heads", "patch_size"} & set(fields)
    if clash:
        raise ValueError(f"{', '.join(sorted(clash))} come from the name {name!r}; "
                         f"do not pass them too.")
    depth, hidden_size, num_heads = SIZES[match.group(1)]
    if isinstance(fields.get("dtype"), str):
        fields["dtype"] = COMPUTE_DTYPES[fields["dtype"]]
    return DiT(patch_size=int(match.group(2)), depth=depth, hidden_size=hidden_size,
               num_heads=num_heads, **fields)


# ------------------------------------------------------------------------- parameter counting

def param_shapes(model: DiT):
    """The parameter tree as ShapeDtypeStructs (jax.eval_shape: nothing is allocated)."""
    x = jnp.zeros((1, model.input_size, model.input_size, model.in_channels), jnp.float32)
    t, labels = jnp.zeros((1,), jnp.float32), jnp.zeros((1,), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), x, t, labels)["params"]


def param_counts(model: DiT) -> dict:
    """Parameter counts: total (every parameter); blocks; pos_embed (the fixed table, not a
    parameter here); dit_reported (total + pos_embed: what DiT's
    sum(p.numel() for p in model.parameters()) prints, its frozen pos_embed included)."""
    sizes = {name: sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))
             for name, tree in param_shapes(model).items()}
    total = sum(sizes.values())
    pos_embed = model.grid_size ** 2 * model.hidden_size
    return {"total": total,
            "blocks": sum(n for name, n in sizes.items() if name.startswith("blocks_")),
            "pos_embed": pos_embed, "dit_reported": total + pos_embed}
