"""A drop-in for ``lax.conv_general_dilated`` that avoids XLA:CPU's slow path for convolutions
whose output is only a pixel or two across.

XLA:CPU runs a 3x3 convolution on a 2x2 map with hundreds of channels (VGG16's block 4-5 at
low resolution, a PatchGAN's last layers) through a generic loop far slower than the same
arithmetic as one matrix product. For such outputs the convolution is written as that product
over the gathered window taps (im2col); its gradient is then slicing and matrix products too.
Larger outputs, and layouts this rewrite does not cover, go to ``lax.conv_general_dilated``.

Use it through ``Conv`` (``nn.Conv`` with this function): same parameters, same names.
"""
import functools
from typing import Sequence, Tuple, Union

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

# Largest output side written as a matrix product; from 3x3 on the library path is fast.
MAX_OUTPUT_SIDE = 2


def conv_general_dilated(lhs, rhs, window_strides: Sequence[int],
                         padding: Union[str, Sequence[Tuple[int, int]]], lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                         precision=None, **kwargs):
    """``lax.conv_general_dilated``; 2-D NHWC/HWIO convolutions with tiny outputs as im2col."""
    def library():
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, precision=precision, **kwargs)

    nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
    dilated = any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
    if (lhs.ndim != 4 or kwargs or dilated or feature_group_count != 1
            or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != nhwc):
        return library()
    kh, kw = rhs.shape[:2]
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), window_strides, padding)
    (pt, pb), (pl, pr) = padding
    sh, sw = window_strides
    out_h = (lhs.shape[1] + pt + pb - kh) // sh + 1
    out_w = (lhs.shape[2] + pl + pr - kw) // sw + 1
    if max(out_h, out_w) > MAX_OUTPUT_SIDE or out_h < 1 or out_w < 1:
        return library()
    return _im2col_conv(lhs, rhs, (sh, sw), ((pt, pb), (pl, pr)), (out_h, out_w), precision)


def _im2col_conv(x, kernel, strides, padding, out_size, precision):
    kh, kw, cin, cout = kernel.shape
    (pt, pb), (pl, pr) = padding
    # lax.pad takes negative padding too (a crop), as lax.conv does.
    x = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
    (sh, sw), (out_h, out_w) = strides, out_size
    taps = [x[:, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw, :]
            for i in range(kh) for j in range(kw)]
    patches = jnp.concatenate(taps, axis=-1)  # [N, Ho, Wo, kh*kw*cin], (i, j, c) order
    return jnp.einsum("nhwk,ko->nhwo", patches, kernel.reshape(kh * kw * cin, cout),
                      precision=precision)


Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
