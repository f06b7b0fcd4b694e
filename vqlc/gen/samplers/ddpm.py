"""Sampling latents from a DDPM denoiser: DiT's ancestral sampler and latent-diffusion's DDIM.

Both take `model_fn(x, t, labels) -> out` (vqlc.gen.objectives.diffusion's convention; the
network always sees original 0..999 timesteps) already wrapped for classifier-free guidance by
the caller (samplers.guidance.guided), and the full training `Schedule`.

`sample_ddpm`: DiT's p_sample_loop on the schedule respaced to `num_steps` (DiT's
  space_timesteps): x_T ~ N(0, I), then x_{t-1} = mean + exp(log_var / 2) z at every index but
  the last, which returns the mean.
`sample_ddim`: latent-diffusion's DDIMSampler, on LDM's 'uniform' DDIM timesteps
  (`ddim_indices`): eps = out[..., :C];
    x0 = (x - sqrt(1 - a) eps) / sqrt(a)
    x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z
    sigma = eta sqrt((1 - a_prev) / (1 - a) (1 - a / a_prev)),
  noise added at every step, the last included, as LDM does. LDM's a_prev of the last step is
  ac[0], not 1, so the result sits at the noise level of timestep 0 (also LDM's behaviour).
  eta = 1 is LDM-LC's setting, eta = 0 the deterministic sampler.

Determinism. keys is a [B] key array (or raw [B, 2] keys), one per sample: sample i draws x_T
and every step's noise from keys[i] alone (fold_in of the step index), so it depends only on
keys[i] and labels[i], never on the batch it shares.

The loop is one jitted lax.fori_loop, compiled once per (model_fn, shape, step count); a
network's weights closed over by model_fn become constants of that program, so for a real
network call the sampler inside your own jit with the weights as an argument.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vqlc.gen.objectives.diffusion import (Schedule, as_jax, original_timesteps,
                                           p_mean_variance, respace, split_output)


def sample_ddpm(model_fn: Callable, schedule: Schedule, keys, labels, shape: Sequence[int], *,
                learned_sigma: bool, num_steps: int = 250, clip_x0: bool = False) -> jax.Array:
    """Ancestral sampling on `schedule` respaced to `num_steps` steps -> float32 [B, *shape].

    shape: one sample's latent shape (h, w, C). learned_sigma: out has 2C channels and the
    variance is DiT's learned interpolation; else C channels and the fixed small variance.
    clip_x0: clip the predicted x0 to [-1, 1] (DiT's clip_denoised; DiT samples without).
    """
    shape, labels = _check_inputs(keys, labels, shape)
    spaced = as_jax(respace(schedule, num_steps))
    return _ddpm_loop(model_fn, spaced, keys, labels, shape, learned_sigma, clip_x0)


@functools.partial(jax.jit, static_argnames=("model_fn", "shape", "learned_sigma", "clip_x0"))
def _ddpm_loop(model_fn, schedule, keys, labels, shape, learned_sigma, clip_x0):
    start_keys, step_keys = _split_per_sample(keys)
    num_steps = schedule.betas.shape[0]

    def step(i, x):
        index = num_steps - 1 - i
        t_index = jnp.full((x.shape[0],), index, jnp.int32)
        out = model_fn(x, original_timesteps(schedule, t_index), labels)
        reverse = p_mean_variance(schedule, jnp.asarray(out, jnp.float32), x, t_index,
                                  learned_sigma, clip_x0)
        # No noise on the last step: its mean is the sample.
        scale = jnp.where(index > 0, jnp.exp(0.5 * reverse.log_variance), 0.0)
        return reverse.mean + scale * _normal_per_sample(step_keys, index, shape)

    return jax.lax.fori_loop(0, num_steps, step, _normal_per_sample(start_keys, 0, shape))


# ------------------------------------------------------------------------------------- DDIM

class DdimSteps(NamedTuple):
    """DDIM's per-step numbers, float32 [S] (timesteps int32), index 0 the last step taken."""
    timesteps: jax.Array
    sqrt_alpha: jax.Array
    sqrt_one_minus_alpha: jax.Array
    sqrt_alpha_prev: jax.Array
    direction_scale: jax.Array  # sqrt(1 - a_prev - sigma^2)
    sigma: jax.Array


def ddim_indices(num_schedule_steps: int, num_steps: int) -> np.ndarray:
    """latent-diffusion's make_ddim_timesteps('uniform'): range(0, T, T // num_steps) + 1.

    The +1 is LDM's (so the last step is timestep 1, not 0). As in LDM, when num_steps does
    not divide T there are more than num_steps entries (T=1000, 300 -> 334)."""
    stride = num_schedule_steps // num_steps if num_steps > 0 else 0
    if stride < 2:
        # LDM's +1 would then index past the schedule's last step.
        raise ValueError(f"DDIM needs 1 <= num_steps <= {num_schedule_steps // 2} on a "
                         f"{num_schedule_steps}-step schedule, got {num_steps}.")
    return np.arange(0, num_schedule_steps, stride) + 1


def ddim_steps(schedule: Schedule, num_steps: int, eta: float) -> DdimSteps:
    """The DDIM numbers of LDM's make_ddim_sampling_parameters, formed in float64."""
    indices = ddim_indices(schedule.num_steps, num_steps)
    ac = schedule.alphas_cumprod
    alpha = ac[indices]
    alpha_prev = np.append(ac[0], ac[indices[:-1]])  # LDM's: ac[0] before the first index
    sigma = eta * np.sqrt((1.0 - alpha_prev) / (1.0 - alpha) * (1.0 - alpha / alpha_prev))
    direction = np.sqrt(np.maximum(1.0 - alpha_prev - sigma ** 2, 0.0))
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    return DdimSteps(timesteps=jnp.asarray(schedule.timesteps[indices], jnp.int32),
                     sqrt_alpha=f32(np.sqrt(alpha)), sqrt_one_minus_alpha=f32(np.sqrt(1 - alpha)),
                     sqrt_alpha_prev=f32(np.sqrt(alpha_prev)), direction_scale=f32(direction),
                     sigma=f32(sigma))


def sample_ddim(model_fn: Callable, schedule: Schedule, keys, labels, shape: Sequence[int], *,
                num_steps: int = 200, eta: float = 1.0,
                learned_sigma: bool = False) -> jax.Array:
    """LDM's DDIM sampler on the full `schedule` -> float32 [B, *shape] (shape = (h, w, C)).

    eta in [0, 1] (0: deterministic; 1: LDM-LC's setting). learned_sigma only says that out has
    2C channels; DDIM reads the epsilon half and ignores the variance.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta={eta} must be in [0, 1].")
    shape, labels = _check_inputs(keys, labels, shape)
    return _ddim_loop(model_fn, ddim_steps(schedule, num_steps, eta), keys, labels, shape,
                      learned_sigma)


@functools.partial(jax.jit, static_argnames=("model_fn", "shape", "learned_sigma"))
def _ddim_loop(model_fn, steps, keys, labels, shape, learned_sigma):
    start_keys, step_keys = _split_per_sample(keys)
    num_steps = steps.timesteps.shape[0]

    def step(i, x):
        index = num_steps - 1 - i
        at = lambda values: values[index]  # noqa: E731
        t = jnp.full((x.shape[0],), at(steps.timesteps), jnp.int32)
        eps, _ = split_output(jnp.asarray(model_fn(x, t, labels), jnp.float32), x.shape[-1],
                              learned_sigma)
        pred_x0 = (x - at(steps.sqrt_one_minus_alpha) * eps) / at(steps.sqrt_alpha)
        noise = _normal_per_sample(step_keys, index, shape)
        return (at(steps.sqrt_alpha_prev) * pred_x0 + at(steps.direction_scale) * eps
                + at(steps.sigma) * noise)

    return jax.lax.fori_loop(0, num_steps, step, _normal_per_sample(start_keys, 0, shape))


# ---------------------------------------------------------------------------------- helpers

def _check_inputs(keys, labels, shape):
    """(shape as a tuple, labels as int32 [B]) after checking they agree with keys [B]."""
    shape = tuple(int(d) for d in shape)
    if len(shape) != 3:
        raise ValueError(f"shape={shape} must be one sample's latent shape (h, w, C); the "
                         f"batch size comes from keys.")
    labels = jnp.asarray(labels, jnp.int32)
    if labels.shape != (keys.shape[0],):
        raise ValueError(f"labels {labels.shape} must be [B] for keys of batch {keys.shape[0]}.")
    return shape, labels


def _split_per_sample(keys):
    """Each sample's key -> (its x_T key, its step-noise key)."""
    pairs = jax.vmap(jax.random.split)(keys)
    return pairs[:, 0], pairs[:, 1]


def _normal_per_sample(keys, step, shape) -> jax.Array:
    """float32 [B, *shape], row i drawn from fold_in(keys[i], step) only."""
    return jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, step), shape))(keys)
