"""The latent-diffusion UNet (Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion
Models": `ldm/modules/diffusionmodules/openaimodel.py` UNetModel with `ldm/modules/attention.py`
SpatialTransformer) in Flax Linen, over NHWC latents, as VQGAN-LC's release configures it for
LDM-LC (`ldm-lc/configs/imagenet-f{16,8}-vqgan-lc-100K.yaml`): class-conditional through
cross-attention to a learned class embedding (`conditioning_key: crossattn`, ClassEmbedder).

Forward (openaimodel's UNetModel.forward, conditioning as LatentDiffusion's "crossattn"):
  context = cond_stage_model(labels)           [B, 1, context_dim]: a row of a label table
  emb = time_embed(sinusoid(t, model_channels)) linear, SiLU, linear to 4 * model_channels
  h = input_blocks (conv_in, then per level num_res_blocks x [ResBlock, SpatialTransformer if
      the level's downsampling rate is in attention_resolutions], then a strided-conv
      Downsample except after the last level); every block's output is kept for the skips
  h = middle_block (ResBlock, SpatialTransformer, ResBlock)
  h = output_blocks (per level, deepest first, num_res_blocks + 1 x [concat(h, skip),
      ResBlock, SpatialTransformer if attending, Upsample (nearest x2 + conv) after the level's
      last block except at the top level])
  out = out_2(silu(out_0(h)))                  GroupNorm, SiLU, zero-initialised 3x3 conv

ResBlock (use_scale_shift_norm False, the release's): h = in_layers(x) (GroupNorm, SiLU, 3x3
conv); h += emb_layers(emb) (SiLU, linear) per channel; h = out_layers(h) (GroupNorm, SiLU,
dropout 0, zero-initialised 3x3 conv); out = skip_connection(x) + h, the skip a 1x1 conv when
the channel count changes, else the identity.
SpatialTransformer: x + proj_out(blocks(proj_in(norm(x)))), proj_in / proj_out 1x1 convs
(proj_out zero-initialised), each BasicTransformerBlock
  x = attn1(norm1(x)) + x; x = attn2(norm2(x), context) + x; x = ff(norm3(x)) + x
with CrossAttention (bias-free to_q/to_k/to_v, to_out_0 with bias, softmax(q k^T / sqrt(d)))
and a GEGLU feed-forward (ff/net_0/proj to 2 * 4 * width, x * gelu(gate) with the exact erf
GELU, ff/net_2 back to width). Heads: width // num_head_channels, each num_head_channels wide
(openaimodel's `legacy` branch with use_spatial_transformer). GroupNorms have 32 groups (eps
1e-5, openaimodel's GroupNorm32; 1e-6 for SpatialTransformer's `norm`); LayerNorms eps 1e-5.
The timestep sinusoid is cos then sin of t * 10000^(-k / half) (openaimodel's
timestep_embedding, the same as DiT's).

Parameter names follow the PyTorch state dict, each torch `Sequential` / `ModuleList` index
joined to the name before it with "_" (as vqlc.gen.networks.dit does), so a converter maps the
keys 1:1 by that one rule:
  model.diffusion_model.time_embed.0.weight          -> time_embed_0/kernel
  model.diffusion_model.input_blocks.0.0.weight      -> input_blocks_0_0/kernel
  ...input_blocks.1.0.in_layers.0.weight             -> input_blocks_1_0/in_layers_0/scale
  ...input_blocks.1.0.in_layers.2 / emb_layers.1 / out_layers.0 / out_layers.3 / skip_connection
  ...input_blocks.1.1.{norm, proj_in, proj_out}      -> input_blocks_1_1/{norm, proj_in, proj_out}
  ...input_blocks.1.1.transformer_blocks.0.attn1.to_q
                                     -> input_blocks_1_1/transformer_blocks_0/attn1/to_q/kernel
  ...transformer_blocks.0.attn2.to_out.0             -> .../attn2/to_out_0
  ...transformer_blocks.0.ff.net.0.proj / ff.net.2   -> .../ff/net_0/proj, .../ff/net_2
  ...transformer_blocks.0.norm{1,2,3}                -> .../norm{1,2,3}
  ...input_blocks.{k}.0.op (Downsample)              -> input_blocks_{k}_0/op
  ...middle_block.{0,1,2}                            -> middle_block_{0,1,2}
  ...output_blocks.{i}.{j}.conv (Upsample)           -> output_blocks_{i}_{j}/conv
  ...out.0 / out.2                                   -> out_0 / out_2
  cond_stage_model.embedding.weight                  -> cond_stage_model/embedding/embedding
Leaves: a conv's `weight` [O, I, kh, kw] -> `kernel` [kh, kw, I, O]; a linear's `weight` [O, I]
-> `kernel` [I, O]; a GroupNorm's / LayerNorm's `weight` -> `scale`; the Embedding's `weight`
-> `embedding` as is; every `bias` as is. The class embedding is the release's
`cond_stage_model` (a top-level module of LatentDiffusion, beside `model.diffusion_model`); it
lives inside this network here, so one parameter tree holds both. The release's table has
n_classes 1001 rows (its sampler uses row 1000 as the unconditional context but never trains
it); ours has num_classes + 1, row num_classes being the null class, trained with label
dropout (vqlc.gen.diffusion_train), so a release ImageNet checkpoint converts with the same
shapes. An unconditional network (num_classes 0) keeps a one-row table: every sample attends
to the same learned context token.

Interface as DiT's (vqlc.gen.networks.dit): apply(vars, x [B, h, w, C], t [B] timesteps
0..999, labels int32 [B] in [0, num_classes]) -> float32 [B, h, w, C], the predicted noise (no
learned variance). `dtype` is the compute dtype of the convs and linears; parameters, norms,
the time sinusoid and the output stay float32. `remat` recomputes each ResBlock's and
SpatialTransformer's activations in the backward pass.
"""
from __future__ import annotations

import math
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqlc.gen.networks.dit import timestep_embedding
from vqlc.models import activations
from vqlc.models.conv import Conv
from vqlc.models.build import COMPUTE_DTYPES

GROUPS = 32  # openaimodel's normalization(): GroupNorm32(32, channels)
RESBLOCK_NORM_EPS = 1e-5  # torch GroupNorm's default
TRANSFORMER_NORM_EPS = 1e-6  # attention.py's Normalize
LAYER_NORM_EPS = 1e-5
FF_MULT = 4

# The release's two UNets (ldm-lc/configs/imagenet-f{16,8}-vqgan-lc-100K.yaml) and "Ti", ours:
# a toy for CPU demos and tests.
VARIANTS = {
    "f16": dict(model_channels=256, channel_mult=(1, 4), num_res_blocks=3,
                attention_resolutions=(4, 1), num_head_channels=32, transformer_depth=1,
                context_dim=512),
    "f8": dict(model_channels=256, channel_mult=(1, 2, 4), num_res_blocks=2,
               attention_resolutions=(4, 2, 1), num_head_channels=32, transformer_depth=1,
               context_dim=512),
    "Ti": dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
               attention_resolutions=(2,), num_head_channels=16, transformer_depth=1,
               context_dim=32),
}

ZEROS = nn.initializers.zeros
# torch's default Linear / Conv init: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)).
TORCH_KERNEL = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias(fan_in: int):
    """torch's default bias init for a layer of fan_in inputs: U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype,
                                                                    -bound, bound)


def conv(features: int, fan_in: int, name: str, dtype: Any, kernel: int = 3, stride: int = 1,
         zero: bool = False) -> nn.Conv:
    """A torch-like Conv2d (padding kernel // 2) in NHWC; zero = openaimodel's zero_module."""
    pad = kernel // 2
    return Conv(features, (kernel, kernel), strides=(stride, stride),
                padding=((pad, pad), (pad, pad)), dtype=dtype, param_dtype=jnp.float32,
                kernel_init=ZEROS if zero else TORCH_KERNEL,
                bias_init=ZEROS if zero else torch_bias(fan_in * kernel * kernel), name=name)


def linear(features: int, fan_in: int, name: str, dtype: Any, use_bias: bool = True,
           zero: bool = False) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=ZEROS if zero else TORCH_KERNEL,
                    bias_init=ZEROS if zero else torch_bias(fan_in), name=name)


def group_norm(name: str, eps: float = RESBLOCK_NORM_EPS) -> nn.GroupNorm:
    """GroupNorm32: 32 groups, affine, computed in float32."""
    return nn.GroupNorm(num_groups=GROUPS, epsilon=eps, dtype=jnp.float32,
                        param_dtype=jnp.float32, use_fast_variance=False, name=name)


def layer_norm(name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=jnp.float32, param_dtype=jnp.float32,
                        use_fast_variance=False, name=name)


# ------------------------------------------------------------------------------------ blocks

class ResBlock(nn.Module):
    """openaimodel's ResBlock (no scale-shift norm, no up/down, dropout 0)."""
    out_channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        h = jax.nn.silu(group_norm("in_layers_0")(x))
        h = conv(self.out_channels, channels, "in_layers_2", self.dtype)(h)
        e = linear(self.out_channels, emb.shape[-1], "emb_layers_1", self.dtype)(
            jax.nn.silu(emb))
        h = h.astype(jnp.float32) + e.astype(jnp.float32)[:, None, None, :]
        h = jax.nn.silu(group_norm("out_layers_0")(h))
        h = conv(self.out_channels, self.out_channels, "out_layers_3", self.dtype, zero=True)(h)
        if channels != self.out_channels:
            x = conv(self.out_channels, channels, "skip_connection", self.dtype, kernel=1)(x)
        return x.astype(jnp.float32) + h.astype(jnp.float32)


class CrossAttention(nn.Module):
    """attention.py's CrossAttention: self-attention when context is None."""
    heads: int
    dim_head: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        width = x.shape[-1]
        context = x if context is None else context
        inner = self.heads * self.dim_head
        q = linear(inner, width, "to_q", self.dtype, use_bias=False)(x)
        k = linear(inner, context.shape[-1], "to_k", self.dtype, use_bias=False)(context)
        v = linear(inner, context.shape[-1], "to_v", self.dtype, use_bias=False)(context)

        def split(a):
            return a.reshape(*a.shape[:2], self.heads, self.dim_head)
        out = jax.nn.dot_product_attention(split(q), split(k), split(v))
        out = out.reshape(*x.shape[:2], inner)
        return linear(width, inner, "to_out_0", self.dtype)(out)


class GEGLU(nn.Module):
    """x, gate = proj(x).chunk(2); x * gelu(gate) (exact GELU, as torch's F.gelu)."""
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h, gate = jnp.split(linear(2 * self.features, x.shape[-1], "proj", self.dtype)(x), 2,
                            axis=-1)
        return h * activations.gelu_exact(gate)


class FeedForward(nn.Module):
    """net_0 (GEGLU to FF_MULT * width), dropout 0 (net_1), net_2 (back to width)."""
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        h = GEGLU(FF_MULT * width, self.dtype, name="net_0")(x)
        return linear(width, FF_MULT * width, "net_2", self.dtype)(h)


class BasicTransformerBlock(nn.Module):
    heads: int
    dim_head: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        x = x + CrossAttention(self.heads, self.dim_head, self.dtype, name="attn1")(
            layer_norm("norm1")(x)).astype(jnp.float32)
        x = x + CrossAttention(self.heads, self.dim_head, self.dtype, name="attn2")(
            layer_norm("norm2")(x), context).astype(jnp.float32)
        return x + FeedForward(self.dtype, name="ff")(layer_norm("norm3")(x)).astype(
            jnp.float32)


class SpatialTransformer(nn.Module):
    """attention.py's SpatialTransformer on NHWC features, cross-attending to context."""
    heads: int
    dim_head: int
    depth: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, h, w, channels = x.shape
        inner = self.heads * self.dim_head
        y = group_norm("norm", TRANSFORMER_NORM_EPS)(x)
        y = conv(inner, channels, "proj_in", self.dtype, kernel=1)(y)
        y = y.astype(jnp.float32).reshape(b, h * w, inner)
        for d in range(self.depth):
            y = BasicTransformerBlock(self.heads, self.dim_head, self.dtype,
                                      name=f"transformer_blocks_{d}")(y, context)
        y = conv(channels, inner, "proj_out", self.dtype, kernel=1, zero=True)(
            y.reshape(b, h, w, inner))
        return x.astype(jnp.float32) + y.astype(jnp.float32)


class Downsample(nn.Module):
    """A 3x3 conv of stride 2 (padding 1), openaimodel's Downsample with conv_resample."""
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        return conv(channels, channels, "op", self.dtype, stride=2)(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(channels, channels, "conv", self.dtype)(x)


class ClassEmbedder(nn.Module):
    """ldm's ClassEmbedder: labels [B] -> context [B, 1, embed_dim] from a table of
    num_classes + 1 rows (the last the null class). torch's Embedding init: N(0, 1)."""
    num_classes: int
    embed_dim: int

    @nn.compact
    def __call__(self, labels: jax.Array) -> jax.Array:
        table = nn.Embed(self.num_classes + 1, self.embed_dim, dtype=jnp.float32,
                         param_dtype=jnp.float32,
                         embedding_init=nn.initializers.normal(1.0), name="embedding")
        return table(labels[:, None])


# ---------------------------------------------------------------------------------- the model

class UNet(nn.Module):
    """openaimodel's UNetModel with use_spatial_transformer, over NHWC latents
    [B, input_size, input_size, in_channels]; epsilon output of in_channels channels."""
    input_size: int  # the latent grid side (h = w)
    in_channels: int
    model_channels: int
    channel_mult: Tuple[int, ...]
    num_res_blocks: int
    attention_resolutions: Tuple[int, ...]  # downsampling rates (1 = the input grid) that attend
    num_head_channels: int
    transformer_depth: int = 1
    context_dim: int = 512
    num_classes: int = 1000
    dtype: Any = jnp.float32
    remat: bool = False

    @property
    def out_channels(self) -> int:
        return self.in_channels

    @property
    def null_label(self) -> int:
        """The label that stands for "no class" (guidance's unconditional branch)."""
        return self.num_classes

    @property
    def learn_sigma(self) -> bool:
        return False

    def check_geometry(self, x_shape) -> None:
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.input_size % factor:
            raise ValueError(f"input_size={self.input_size} is not a multiple of {factor}, the "
                             f"UNet's downsampling over {len(self.channel_mult)} levels.")
        widths = {self.model_channels * m for m in self.channel_mult}
        if any(w % GROUPS or w % self.num_head_channels for w in widths):
            raise ValueError(f"The UNet's widths {sorted(widths)} must be multiples of {GROUPS} "
                             f"(GroupNorm) and of num_head_channels={self.num_head_channels}.")
        expected = (self.input_size, self.input_size, self.in_channels)
        if tuple(x_shape[1:]) != expected:
            raise ValueError(f"The UNet expects latents [B, {', '.join(map(str, expected))}] "
                             f"(NHWC), got {list(x_shape)}.")

    def _attention(self, channels: int, name: str):
        heads = channels // self.num_head_channels
        block = nn.remat(SpatialTransformer) if self.remat else SpatialTransformer
        return block(heads, channels // heads, self.transformer_depth, self.dtype, name=name)

    def _resblock(self, out_channels: int, name: str):
        block = nn.remat(ResBlock) if self.remat else ResBlock
        return block(out_channels, self.dtype, name=name)

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, labels: jax.Array) -> jax.Array:
        """x [B, h, w, C], t [B] timesteps 0..999, labels int32 [B] in [0, num_classes] ->
        float32 [B, h, w, C] (predicted noise)."""
        self.check_geometry(x.shape)
        mc = self.model_channels
        context = ClassEmbedder(self.num_classes, self.context_dim,
                                name="cond_stage_model")(labels)
        emb = linear(4 * mc, mc, "time_embed_0", self.dtype)(timestep_embedding(t, mc))
        emb = linear(4 * mc, 4 * mc, "time_embed_2", self.dtype)(jax.nn.silu(emb))
        emb = emb.astype(jnp.float32)

        h = conv(mc, self.in_channels, "input_blocks_0_0", self.dtype)(x).astype(jnp.float32)
        skips, index, ds, ch = [h], 1, 1, mc
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                ch = mult * mc
                h = self._resblock(ch, f"input_blocks_{index}_0")(h, emb)
                if ds in self.attention_resolutions:
                    h = self._attention(ch, f"input_blocks_{index}_1")(h, context)
                skips.append(h)
                index += 1
            if level != len(self.channel_mult) - 1:
                h = Downsample(self.dtype, name=f"input_blocks_{index}_0")(h).astype(
                    jnp.float32)
                skips.append(h)
                index += 1
                ds *= 2

        h = self._resblock(ch, "middle_block_0")(h, emb)
        h = self._attention(ch, "middle_block_1")(h, context)
        h = self._resblock(ch, "middle_block_2")(h, emb)

        index = 0
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                ch = mult * mc
                j = 0
                h = self._resblock(ch, f"output_blocks_{index}_{j}")(h, emb)
                if ds in self.attention_resolutions:
                    j += 1
                    h = self._attention(ch, f"output_blocks_{index}_{j}")(h, context)
                if level and i == self.num_res_blocks:
                    j += 1
                    h = Upsample(self.dtype, name=f"output_blocks_{index}_{j}")(h).astype(
                        jnp.float32)
                    ds //= 2
                index += 1

        h = jax.nn.silu(group_norm("out_0")(h))
        out = conv(self.out_channels, mc, "out_2", self.dtype, zero=True)(h)
        return out.astype(jnp.float32)


def make_unet(variant: str, **fields) -> UNet:
    """The UNet by variant name ("f16", "f8": the release's; "Ti": ours), plus module fields
    (input_size, in_channels, num_classes, dtype, remat). dtype may be a config.model.dtype
    string."""
    if variant not in VARIANTS:
        raise ValueError(f"UNet variant {variant!r} is not known; valid sizes: "
                         f"{', '.join(VARIANTS)}.")
    clash = set(VARIANTS[variant]) & set(fields)
    if clash:
        raise ValueError(f"{', '.join(sorted(clash))} come from the variant {variant!r}; "
                         f"do not pass them too.")
    if isinstance(fields.get("dtype"), str):
        fields["dtype"] = COMPUTE_DTYPES[fields["dtype"]]
    return UNet(**VARIANTS[variant], **fields)


# ------------------------------------------------------------------------- parameter counting

def param_shapes(model: UNet):
    """The parameter tree as ShapeDtypeStructs (jax.eval_shape: nothing is allocated)."""
    x = jnp.zeros((1, model.input_size, model.input_size, model.in_channels), jnp.float32)
    t, labels = jnp.zeros((1,), jnp.float32), jnp.zeros((1,), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), x, t, labels)["params"]


def param_counts(model: UNet) -> dict:
    """Parameter counts: total; unet (everything but the class table: the release's
    `model.diffusion_model`, what LatentDiffusion's count_params prints for DiffusionWrapper);
    cond_stage_model (the class table)."""
    sizes = {name: sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))
             for name, tree in param_shapes(model).items()}
    total = sum(sizes.values())
    cond = sizes.get("cond_stage_model", 0)
    return {"total": total, "unet": total - cond, "cond_stage_model": cond}
