"""Resizing a ViT's learned position embedding to another token grid, as MAE's fine-tuning does
(util/pos_embed.py interpolate_pos_embed, from DeiT): the class token's row is kept as it is,
the grid rows are reshaped to [side, side, D] and resized with PyTorch's bicubic interpolation
(F.interpolate(mode="bicubic", align_corners=False), no antialias), then flattened row-major.

PyTorch's bicubic is not jax.image.resize's "cubic": torch uses the Keys cubic-convolution
kernel with a = -0.75 (upsample_bicubic2d's cubic_convolution1/2), jax a = -0.5; and torch reads
the source coordinate as scale * (i + 0.5) - 0.5 with scale = in / out, unclamped, taking the
four taps at floor(x) - 1 .. floor(x) + 2 with their indices clamped to [0, in - 1] (border
replication). The same rule holds when shrinking (torch's bicubic does not antialias), and equal
sizes are the identity. Here the 2-D resize is separable: one [out, in] weight matrix per axis
(the source coordinates computed in float32 as torch does), applied in float64 and returned as
float32. Against torch's float32 kernel on a standard-normal [1, 1 + 14*14, 8] table the largest
difference is 2.4e-7 for 14 -> 16 and 7, 2.6e-6 for 14 -> 20 (torch's float32 accumulation);
tests/test_classifier_parts.py checks 1e-5.

This is a one-off conversion step (numpy, no jax): MAE's 224 px checkpoint has a 14 x 14 grid,
a 16 x 16 token map (256 px through an f16 tokenizer) needs 16 x 16.
"""
from __future__ import annotations

import math

import numpy as np

TORCH_BICUBIC_A = -0.75  # PyTorch's cubic-convolution coefficient (jax.image.resize: -0.5)


def _cubic_weights(t: np.ndarray, a: float = TORCH_BICUBIC_A) -> np.ndarray:
    """The four Keys-kernel weights [..., 4] of taps at offsets -1, 0, 1, 2 for a fractional
    position t in [0, 1)."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """float64 [out_size, in_size]: PyTorch's 1-D bicubic resize (align_corners=False) as a
    matrix, so resized = M @ x along that axis."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"bicubic resize needs positive sizes, got {in_size} -> {out_size}.")
    # torch computes the scale and the source coordinate in float32 (opmath of a float
    # tensor); doing the same puts the taps' fractions where torch puts them.
    scale = np.float32(in_size) / np.float32(out_size)
    source = scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    floor = np.floor(source)
    weights = _cubic_weights((source - floor).astype(np.float64))
    taps = np.clip(floor[:, None].astype(np.int64) + np.arange(-1, 3)[None], 0, in_size - 1)
    matrix = np.zeros((out_size, in_size), np.float64)
    np.add.at(matrix, (np.repeat(np.arange(out_size), 4), taps.reshape(-1)), weights.reshape(-1))
    return matrix


def resize_bicubic(grid: np.ndarray, out_hw) -> np.ndarray:
    """[h, w, D] -> float32 [out_h, out_w, D], as torch's F.interpolate(mode='bicubic',
    align_corners=False) on the [1, D, h, w] layout."""
    grid = np.asarray(grid, np.float64)
    if grid.ndim != 3:
        raise ValueError(f"resize_bicubic takes a [h, w, D] grid, got shape {grid.shape}.")
    rows = bicubic_matrix(grid.shape[0], out_hw[0])
    cols = bicubic_matrix(grid.shape[1], out_hw[1])
    return np.einsum("ih,hwd,jw->ijd", rows, grid, cols).astype(np.float32)


def grid_side(num_positions: int, num_extra_tokens: int = 1) -> int:
    """The square grid's side of a [1, extra + side**2, D] table; a clear error otherwise."""
    side = math.isqrt(max(num_positions - num_extra_tokens, 0))
    if side < 1 or side * side != num_positions - num_extra_tokens:
        raise ValueError(f"A position embedding of {num_positions} rows is not {num_extra_tokens} "
                         "extra token(s) + a square grid.")
    return side


def interpolate_pos_embed(pos_embed: np.ndarray, new_side: int,
                          num_extra_tokens: int = 1) -> np.ndarray:
    """MAE's interpolate_pos_embed on an array: [1, extra + s*s, D] -> float32
    [1, extra + new_side**2, D]; the extra (class) token rows are kept, the grid is resized
    bicubically (PyTorch's kernel). Equal sides return the table unchanged (as float32)."""
    pos_embed = np.asarray(pos_embed)
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must be [1, positions, D], got shape {pos_embed.shape}.")
    side = grid_side(pos_embed.shape[1], num_extra_tokens)
    if side == new_side:
        return pos_embed.astype(np.float32)
    extra = pos_embed[:, :num_extra_tokens].astype(np.float32)
    grid = pos_embed[0, num_extra_tokens:].reshape(side, side, -1)
    resized = resize_bicubic(grid, (new_side, new_side)).reshape(1, new_side * new_side, -1)
    return np.concatenate([extra, resized], axis=1)
