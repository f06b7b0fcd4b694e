"""taming-transformers' VQGAN encoder and decoder in Flax Linen (NHWC), and the VQModel around them.

The networks follow `taming/modules/diffusionmodules/model.py` (Encoder with double_z=False, Decoder)
layer for layer, so the authors' released PyTorch checkpoints convert one-to-one
(`vqlc.models.taming_names.torch_to_flax`).

Naming rule (taming key -> Flax path), applied by the converter:
  1. the last dot-separated part of a key is the parameter (weight, bias, running_mean, ...);
  2. a numeric part is glued to the part before it with "_" (``down.1`` -> ``down_1``);
  3. the last remaining part names the layer (conv, norm), and the parts before it, joined with "_",
     name the block module that owns it.
So ``down.1.block.0.norm1.weight`` is ``down_1_block_0/norm1/scale``, ``mid.attn_1.q.weight`` is
``mid_attn_1/q/kernel``, ``down.0.downsample.conv.weight`` is ``down_0_downsample/conv/kernel``,
``conv_in.weight`` is ``conv_in/kernel``. In VQModel, ``encoder.``/``decoder.`` prefixes are the
``encoder``/``decoder`` submodules and ``quant_conv``/``post_quant_conv`` keep their names.

Precision and memory (config.model.dtype, config.model.remat): `dtype` is the compute dtype of
the convolutions (float32 or bfloat16); parameters are float32 whatever it is (param_dtype), so
the optimiser updates them at full precision. GroupNorm, the attention softmax, the quantizer
and the model's output stay float32. `remat=True` recomputes each ResnetBlock's and AttnBlock's
activations in the backward pass instead of storing them (less memory, ~1/3 more compute); the
parameters and the numbers are the same.
"""
from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqlc.models.conv import Conv


def swish(x: jax.Array) -> jax.Array:
    """taming's `nonlinearity`: x * sigmoid(x)."""
    return x * jax.nn.sigmoid(x)


def normalize(name: str) -> nn.GroupNorm:
    """taming's `Normalize`: GroupNorm with 32 groups, eps 1e-6, affine.

    Two-pass variance (use_fast_variance=False) as torch computes it; E[x^2]-E[x]^2 loses precision
    when activations have a large mean. Always float32 (statistics and output), whatever the compute
    dtype: bfloat16's 8-bit mantissa is too coarse for a mean and variance over thousands of values,
    and the swish after it is elementwise, so it costs little to keep.
    """
    return nn.GroupNorm(num_groups=32, epsilon=1e-6, use_fast_variance=False, dtype=jnp.float32,
                        param_dtype=jnp.float32, name=name)


def conv(features: int, kernel: int, name: str, stride: int = 1, padding: Any = None,
         dtype: Any = jnp.float32) -> nn.Conv:
    """Conv2d as taming builds it: by default 3x3 convs pad 1 on every side, 1x1 convs pad nothing.

    `dtype` is the compute dtype (inputs and kernel are cast to it); the kernel is stored float32.
    """
    if padding is None:
        padding = kernel // 2
    return Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                dtype=dtype, param_dtype=jnp.float32, name=name)


class ResnetBlock(nn.Module):
    """norm1 -> swish -> conv1 -> norm2 -> swish -> dropout -> conv2, plus a shortcut.

    The shortcut is a 1x1 conv (`nin_shortcut`) only when the channel count changes (taming's
    conv_shortcut=False, the only setting its Encoder/Decoder use).
    """
    out_channels: int
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        # `train` may be passed by position: nn.remat marks it static by its position.
        h = conv(self.out_channels, 3, "conv1", dtype=self.dtype)(swish(normalize("norm1")(x)))
        h = swish(normalize("norm2")(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = conv(self.out_channels, 3, "conv2", dtype=self.dtype)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, "nin_shortcut", dtype=self.dtype)(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions; q, k, v, proj_out are 1x1 convs."""
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        h = normalize("norm")(x)
        q = conv(c, 1, "q", dtype=self.dtype)(h).reshape(b, hgt * wid, c)
        k = conv(c, 1, "k", dtype=self.dtype)(h).reshape(b, hgt * wid, c)
        v = conv(c, 1, "v", dtype=self.dtype)(h).reshape(b, hgt * wid, c)
        # Logits accumulated and normalised in float32: a softmax over thousands of positions
        # in bfloat16 loses the small weights.
        w = jnp.einsum("bic,bjc->bij", q, k, preferred_element_type=jnp.float32) * (c ** -0.5)
        w = jax.nn.softmax(w, axis=-1).astype(self.dtype)
        h = jnp.einsum("bij,bjc->bic", w, v).reshape(b, hgt, wid, c)
        return x + conv(c, 1, "proj_out", dtype=self.dtype)(h)


class Downsample(nn.Module):
    """Halve the resolution: zero-pad right and bottom by one, then a 3x3 stride-2 VALID conv."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # torch has no asymmetric conv padding, so taming pads (0, 1, 0, 1) by hand; kept for parity.
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(x.shape[-1], 3, "conv", stride=2, padding="VALID", dtype=self.dtype)(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour x2, then a 3x3 conv."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(x.shape[-1], 3, "conv", dtype=self.dtype)(x)


class Encoder(nn.Module):
    """taming's Encoder (double_z=False): image [B,H,W,in_channels] -> z [B,H/f,W/f,z_channels].

    f = 2 ** (len(ch_mult) - 1). Attention follows every res block of a level whose resolution
    (`resolution` / 2**level) is in `attn_resolutions`; the middle always has one.
    """
    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    attn_resolutions: Sequence[int]
    resolution: int
    z_channels: int
    out_ch: int = 3  # unused by the encoder; kept so one set of fields builds both halves
    dropout: float = 0.0
    in_channels: int = 3
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32
    remat: bool = False  # recompute block activations in the backward pass

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        Block, Attn = _blocks(self.remat)
        h = conv(self.ch, 3, "conv_in", dtype=self.dtype)(x)
        curr_res = self.resolution
        for level, mult in enumerate(self.ch_mult):
            for i in range(self.num_res_blocks):
                h = Block(self.ch * mult, self.dropout, self.dtype,
                          name=f"down_{level}_block_{i}")(h, train)
                if curr_res in self.attn_resolutions:
                    h = Attn(self.dtype, name=f"down_{level}_attn_{i}")(h)
            if level != len(self.ch_mult) - 1:
                h = Downsample(self.dtype, name=f"down_{level}_downsample")(h)
                curr_res //= 2
        c = h.shape[-1]
        h = Block(c, self.dropout, self.dtype, name="mid_block_1")(h, train)
        h = Attn(self.dtype, name="mid_attn_1")(h)
        h = Block(c, self.dropout, self.dtype, name="mid_block_2")(h, train)
        h = swish(normalize("norm_out")(h))
        return conv(self.z_channels, 3, "conv_out", dtype=self.dtype)(h)


class Decoder(nn.Module):
    """taming's Decoder: z [B,h,w,z_channels] -> image [B,h*f,w*f,out_ch].

    Each level has num_res_blocks + 1 res blocks. Sows the activation that enters `conv_out` as
    ('intermediates', 'conv_out_input'): the trainer needs gradients w.r.t. the conv_out kernel
    (taming's adaptive GAN weight), which it gets from this activation and the output cotangent.
    """
    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    attn_resolutions: Sequence[int]
    resolution: int
    z_channels: int
    out_ch: int = 3
    dropout: float = 0.0
    in_channels: int = 3  # unused by the decoder; kept so one set of fields builds both halves
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32
    remat: bool = False  # recompute block activations in the backward pass

    @nn.compact
    def __call__(self, z: jax.Array, *, train: bool = False) -> jax.Array:
        Block, Attn = _blocks(self.remat)
        num_levels = len(self.ch_mult)
        block_in = self.ch * self.ch_mult[-1]
        curr_res = self.resolution // 2 ** (num_levels - 1)
        h = conv(block_in, 3, "conv_in", dtype=self.dtype)(z)
        h = Block(block_in, self.dropout, self.dtype, name="mid_block_1")(h, train)
        h = Attn(self.dtype, name="mid_attn_1")(h)
        h = Block(block_in, self.dropout, self.dtype, name="mid_block_2")(h, train)
        # taming numbers up levels by resolution (up.0 is the finest) but runs them coarsest first.
        for level in reversed(range(num_levels)):
            for i in range(self.num_res_blocks + 1):
                h = Block(self.ch * self.ch_mult[level], self.dropout, self.dtype,
                          name=f"up_{level}_block_{i}")(h, train)
                if curr_res in self.attn_resolutions:
                    h = Attn(self.dtype, name=f"up_{level}_attn_{i}")(h)
            if level != 0:
                h = Upsample(self.dtype, name=f"up_{level}_upsample")(h)
                curr_res *= 2
        h = swish(normalize("norm_out")(h))  # float32 (the norm's output dtype)
        self.sow("intermediates", "conv_out_input", h)
        # The image leaves in float32 whatever the compute dtype: the losses (L1, LPIPS, GAN)
        # and their gradients, which the trainer feeds back through this output, stay float32.
        return conv(self.out_ch, 3, "conv_out", dtype=self.dtype)(h).astype(jnp.float32)


def _blocks(remat: bool):
    """(ResnetBlock, AttnBlock), checkpointed when `remat`: their activations are recomputed in
    the backward pass. Argument 2 of ResnetBlock (self, x, train) is the static `train` flag."""
    if not remat:
        return ResnetBlock, AttnBlock
    return nn.remat(ResnetBlock, static_argnums=(2,)), nn.remat(AttnBlock)


class VQModel(nn.Module):
    """Encoder -> quant_conv -> quantizer -> post_quant_conv -> Decoder.

    `quantizer` is any Linen module with `__call__(z [B,h,w,embed_dim], *, train) -> out` where out has
    `z_q` (straight-through, z's shape), `indices` (int32 [B,h,w]) and `loss` (scalar), and
    `embed(indices) -> [..., embed_dim]`. It is bound as the submodule `quantizer`.
    """
    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    attn_resolutions: Sequence[int]
    resolution: int
    z_channels: int
    embed_dim: int
    quantizer: nn.Module
    out_ch: int = 3
    dropout: float = 0.0
    in_channels: int = 3
    dtype: Any = jnp.float32  # compute dtype of encoder and decoder; parameters stay float32
    remat: bool = False  # recompute the blocks' activations in the backward pass

    def setup(self):
        fields = dict(ch=self.ch, ch_mult=self.ch_mult, num_res_blocks=self.num_res_blocks,
                      attn_resolutions=self.attn_resolutions, resolution=self.resolution,
                      z_channels=self.z_channels, out_ch=self.out_ch, dropout=self.dropout,
                      in_channels=self.in_channels, dtype=self.dtype, remat=self.remat)
        self.encoder = Encoder(**fields)
        self.decoder = Decoder(**fields)
        self.quant_conv = nn.Conv(self.embed_dim, (1, 1), padding=0, dtype=self.dtype,
                                  param_dtype=jnp.float32)
        self.post_quant_conv = nn.Conv(self.z_channels, (1, 1), padding=0, dtype=self.dtype,
                                       param_dtype=jnp.float32)

    def encode(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Image [B,H,W,C] -> pre-quantisation latent [B,h,w,embed_dim], float32.

        float32 whatever the compute dtype: the quantizer's nearest-code search and its losses
        run on it, and bfloat16 distances would tie or swap near codes among 100K."""
        return self.quant_conv(self.encoder(x, train=train)).astype(jnp.float32)

    def decode(self, z_q: jax.Array, *, train: bool = False) -> jax.Array:
        """Quantised latent [B,h,w,embed_dim] -> image [B,H,W,out_ch]."""
        return self.decoder(self.post_quant_conv(z_q), train=train)

    def decode_code(self, indices: jax.Array) -> jax.Array:
        """Code indices [B,h,w] -> image, through the quantizer's `embed`."""
        return self.decode(self.quantizer.embed(indices))

    def __call__(self, x: jax.Array, *, train: bool = False) -> Tuple[jax.Array, Any]:
        """Returns (reconstruction, quantizer output)."""
        q = self.quantizer(self.encode(x, train=train), train=train)
        return self.decode(q.z_q, train=train), q
