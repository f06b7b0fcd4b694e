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
"""
from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp


def swish(x: jax.Array) -> jax.Array:
    """taming's `nonlinearity`: x * sigmoid(x)."""
    return x * jax.nn.sigmoid(x)


def normalize(name: str) -> nn.GroupNorm:
    """taming's `Normalize`: GroupNorm with 32 groups, eps 1e-6, affine.

    Two-pass variance (use_fast_variance=False) as torch computes it; E[x^2]-E[x]^2 loses precision
    when activations have a large mean.
    """
    return nn.GroupNorm(num_groups=32, epsilon=1e-6, use_fast_variance=False, name=name)


def conv(features: int, kernel: int, name: str, stride: int = 1, padding: Any = None) -> nn.Conv:
    """Conv2d as taming builds it: by default 3x3 convs pad 1 on every side, 1x1 convs pad nothing."""
    if padding is None:
        padding = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding, name=name)


class ResnetBlock(nn.Module):
    """norm1 -> swish -> conv1 -> norm2 -> swish -> dropout -> conv2, plus a shortcut.

    The shortcut is a 1x1 conv (`nin_shortcut`) only when the channel count changes (taming's
    conv_shortcut=False, the only setting its Encoder/Decoder use).
    """
    out_channels: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        h = conv(self.out_channels, 3, "conv1")(swish(normalize("norm1")(x)))
        h = swish(normalize("norm2")(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = conv(self.out_channels, 3, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, "nin_shortcut")(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions; q, k, v, proj_out are 1x1 convs."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        h = normalize("norm")(x)
        q = conv(c, 1, "q")(h).reshape(b, hgt * wid, c)
        k = conv(c, 1, "k")(h).reshape(b, hgt * wid, c)
        v = conv(c, 1, "v")(h).reshape(b, hgt * wid, c)
        w = jnp.einsum("bic,bjc->bij", q, k) * (c ** -0.5)
        w = jax.nn.softmax(w, axis=-1)
        h = jnp.einsum("bij,bjc->bic", w, v).reshape(b, hgt, wid, c)
        return x + conv(c, 1, "proj_out")(h)


class Downsample(nn.Module):
    """Halve the resolution: zero-pad right and bottom by one, then a 3x3 stride-2 VALID conv."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # torch has no asymmetric conv padding, so taming pads (0, 1, 0, 1) by hand; kept for parity.
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(x.shape[-1], 3, "conv", stride=2, padding="VALID")(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour x2, then a 3x3 conv."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(x.shape[-1], 3, "conv")(x)


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

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        h = conv(self.ch, 3, "conv_in")(x)
        curr_res = self.resolution
        for level, mult in enumerate(self.ch_mult):
            for i in range(self.num_res_blocks):
                h = ResnetBlock(self.ch * mult, self.dropout, name=f"down_{level}_block_{i}")(h, train=train)
                if curr_res in self.attn_resolutions:
                    h = AttnBlock(name=f"down_{level}_attn_{i}")(h)
            if level != len(self.ch_mult) - 1:
                h = Downsample(name=f"down_{level}_downsample")(h)
                curr_res //= 2
        c = h.shape[-1]
        h = ResnetBlock(c, self.dropout, name="mid_block_1")(h, train=train)
        h = AttnBlock(name="mid_attn_1")(h)
        h = ResnetBlock(c, self.dropout, name="mid_block_2")(h, train=train)
        h = swish(normalize("norm_out")(h))
        return conv(self.z_channels, 3, "conv_out")(h)


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

    @nn.compact
    def __call__(self, z: jax.Array, *, train: bool = False) -> jax.Array:
        num_levels = len(self.ch_mult)
        block_in = self.ch * self.ch_mult[-1]
        curr_res = self.resolution // 2 ** (num_levels - 1)
        h = conv(block_in, 3, "conv_in")(z)
        h = ResnetBlock(block_in, self.dropout, name="mid_block_1")(h, train=train)
        h = AttnBlock(name="mid_attn_1")(h)
        h = ResnetBlock(block_in, self.dropout, name="mid_block_2")(h, train=train)
        # taming numbers up levels by resolution (up.0 is the finest) but runs them coarsest first.
        for level in reversed(range(num_levels)):
            for i in range(self.num_res_blocks + 1):
                h = ResnetBlock(self.ch * self.ch_mult[level], self.dropout,
                                name=f"up_{level}_block_{i}")(h, train=train)
                if curr_res in self.attn_resolutions:
                    h = AttnBlock(name=f"up_{level}_attn_{i}")(h)
            if level != 0:
                h = Upsample(name=f"up_{level}_upsample")(h)
                curr_res *= 2
        h = swish(normalize("norm_out")(h))
        self.sow("intermediates", "conv_out_input", h)
        return conv(self.out_ch, 3, "conv_out")(h)


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

    def setup(self):
        fields = dict(ch=self.ch, ch_mult=self.ch_mult, num_res_blocks=self.num_res_blocks,
                      attn_resolutions=self.attn_resolutions, resolution=self.resolution,
                      z_channels=self.z_channels, out_ch=self.out_ch, dropout=self.dropout,
                      in_channels=self.in_channels)
        self.encoder = Encoder(**fields)
        self.decoder = Decoder(**fields)
        self.quant_conv = nn.Conv(self.embed_dim, (1, 1), padding=0)
        self.post_quant_conv = nn.Conv(self.z_channels, (1, 1), padding=0)

    def encode(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Image [B,H,W,C] -> pre-quantisation latent [B,h,w,embed_dim]."""
        return self.quant_conv(self.encoder(x, train=train))

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
