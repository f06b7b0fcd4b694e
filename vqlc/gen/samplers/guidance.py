"""Classifier-free guidance for the diffusion and flow samplers, written once.

`guided(model_fn, ...)` wraps a denoiser `model_fn(x, t, labels) -> out` (NHWC, `out` with the
latent channels first: epsilon, velocity or score, then e.g. DiT's learned-variance half) into
one of the same signature that runs the conditional and the null-class branch in one doubled
batch and returns

    out[..., :k] = u + scale * (c - u)      (k = guided_channels)
    out[..., k:] = c                        (the rest, e.g. the variance half, conditional)

Every latent channel is guided by default (k = the latent's channels). Upstream DiT, and the
release's DiT-LC and SiT-LC after it, guide only the first 3 channels (`guided_channels=3`),
a leftover of DiT's 4-channel SD latents that leaves 5 of LC's 8 channels unguided; it is
offered only to reproduce the release's numbers.

`interval=(lo, hi)` applies guidance only while lo <= t <= hi (in the sampler's own time: DDPM
timesteps, or flow time), plain conditional output elsewhere. Scale 1 (or no guidance) is
the conditional model exactly, with no doubled batch.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax.numpy as jnp


def guided(model_fn: Callable, *, scale: float, null_label: int, guided_channels: int,
           interval: Optional[Sequence[float]] = None) -> Callable:
    """`model_fn` with classifier-free guidance of strength `scale` (see the module doc)."""
    if scale == 1.0:
        return model_fn
    if guided_channels < 1:
        raise ValueError(f"guided_channels={guided_channels} must be >= 1.")

    def fn(x, t, labels):
        batch = x.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t), (batch,))
        out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                       jnp.concatenate([labels, jnp.full_like(labels, null_label)]))
        cond, uncond = out[:batch], out[batch:]
        k = guided_channels
        mixed = uncond[..., :k] + scale * (cond[..., :k] - uncond[..., :k])
        if interval is not None:
            lo, hi = interval
            inside = ((t >= lo) & (t <= hi)).reshape((batch,) + (1,) * (x.ndim - 1))
            mixed = jnp.where(inside, mixed, cond[..., :k])
        return jnp.concatenate([mixed, cond[..., k:]], axis=-1)
    return fn
