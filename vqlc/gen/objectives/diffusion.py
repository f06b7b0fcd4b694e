"""The DDPM objective, after DiT's `diffusion/gaussian_diffusion.py`: the noise schedule and its
respacing, the forward process, the model's reverse step, and the training loss.

Time. A `Schedule` is indexed by its own step index 0..n-1. `schedule.timesteps[i]` is the
ORIGINAL timestep (0..999 of the 1000-step training schedule) that index i stands for, and that
is what the network sees, on a respaced schedule too (DiT's `_WrappedModel`). On the full
schedule index and timestep agree.

Denoiser: `model_fn(x, t, labels) -> out`, x float [B, h, w, C] (NHWC), t int32 [B] original
timesteps, labels int32 [B]; `out` is [B, h, w, C] (epsilon) or [B, h, w, 2C] (epsilon, then
DiT's learned-variance value v in [-1, 1]).

Precision. Schedules are numpy float64, computed as DiT does; they become float32 only where a
value is read (`_take`), after every derived quantity was formed in float64.

Variance of the reverse step:
  learned (DiT's LEARNED_RANGE): log var = frac log(beta_t) + (1 - frac) log(posterior var_t),
    frac = (v + 1) / 2, with the posterior variance's log clipped at t = 0 (where it is 0) to
    its value at t = 1, as DiT does;
  fixed: the posterior variance ("fixed small", ADM/DiT's FIXED_SMALL). DiT's create_diffusion
    with learn_sigma=False and sigma_small=False would pick FIXED_LARGE (betas) instead; that is
    not offered.

Loss. DiT trains with create_diffusion's defaults: LossType.MSE (rescale_learned_sigmas=False,
use_kl=False), so the loss is mean_flat((noise - eps)^2) + vb, vb NOT multiplied by
num_timesteps / 1000 (that factor belongs to RESCALED_MSE, and is 1 at 1000 steps anyway),
averaged over the batch. vb is the hybrid term of Nichol & Dhariwal: in bits per dimension,
the KL between the true posterior and the model's reverse step, or at t = 0 the discretized
Gaussian decoder NLL; its mean comes from a stop-gradient epsilon, so only the variance half
learns from it.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("linear", "linear_sqrt")
TRAIN_STEPS = 1000  # the length DiT's linear betas are defined for (they scale by 1000 / n)


class Schedule(NamedTuple):
    """A noise schedule's coefficients, numpy float64 [n] (timesteps int64 [n]).

    A NamedTuple, so a copy converted to jax arrays can travel through jit as a pytree."""
    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    log_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray
    timesteps: np.ndarray  # schedule index -> original timestep

    @property
    def num_steps(self) -> int:
        return int(self.betas.shape[0])


# ----------------------------------------------------------------------------------- schedules

def make_schedule(kind: str = "linear", num_steps: int = TRAIN_STEPS,
                  beta_start: Optional[float] = None,
                  beta_end: Optional[float] = None) -> Schedule:
    """The full training schedule of `num_steps` steps.

    "linear": DiT's get_named_beta_schedule("linear"): betas evenly spaced from
      1000/n * 1e-4 to 1000/n * 0.02 (1e-4 .. 0.02 at n = 1000).
    "linear_sqrt": latent-diffusion's "linear" schedule (make_beta_schedule):
      betas = linspace(sqrt(beta_start), sqrt(beta_end), n)^2, by default 0.0015 .. 0.0195
      (LDM's class-conditional ImageNet config); not scaled with n.
    beta_start / beta_end override the defaults and are used as given.
    """
    if kind == "linear":
        scale = TRAIN_STEPS / num_steps
        start = scale * 1e-4 if beta_start is None else beta_start
        end = scale * 0.02 if beta_end is None else beta_end
        betas = np.linspace(start, end, num_steps, dtype=np.float64)
    elif kind == "linear_sqrt":
        start = 0.0015 if beta_start is None else beta_start
        end = 0.0195 if beta_end is None else beta_end
        betas = np.linspace(start ** 0.5, end ** 0.5, num_steps, dtype=np.float64) ** 2
    else:
        raise ValueError(f"unknown schedule kind {kind!r}; expected one of {KINDS}.")
    return schedule_from_betas(betas)


def schedule_from_betas(betas, timesteps=None) -> Schedule:
    """Every coefficient DiT's GaussianDiffusion derives from `betas`, in float64.
    timesteps: the original timestep of each index (default: the identity)."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size < 2 or not np.all((betas > 0) & (betas <= 1)):
        raise ValueError("betas must be a 1-D array of at least 2 values in (0, 1].")
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
    timesteps = np.arange(betas.size) if timesteps is None else np.asarray(timesteps)
    return Schedule(
        betas=betas,
        alphas_cumprod=ac,
        alphas_cumprod_prev=ac_prev,
        sqrt_alphas_cumprod=np.sqrt(ac),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
        log_one_minus_alphas_cumprod=np.log(1.0 - ac),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1.0),
        posterior_variance=posterior_variance,
        # The posterior variance is 0 at index 0: its log takes index 1's value there.
        posterior_log_variance_clipped=np.log(
            np.append(posterior_variance[1], posterior_variance[1:])),
        posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
        posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
        timesteps=timesteps.astype(np.int64),
    )


def spaced_timesteps(num_timesteps: int, counts: Union[int, str]) -> np.ndarray:
    """DiT's space_timesteps: the sorted indices of `num_timesteps` steps to keep.

    counts: n (int or "n"): n indices evenly spread over [0, num_timesteps - 1], both ends
      included, each rounded as Python's round() does (half to even), e.g. 250 of 1000 ->
      0, 4, 8, ..., 995, 999;
    "n1,n2,...": the steps split into equal sections, n_k spread within section k;
    "ddimN": the stride s for which range(0, num_timesteps, s) has exactly N entries (DiT's
      DDIM striding; not latent-diffusion's, see samplers.ddpm.ddim_indices).
    """
    counts = str(counts)
    if counts.startswith("ddim"):
        wanted = int(counts[len("ddim"):])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == wanted:
                return np.arange(0, num_timesteps, stride)
        raise ValueError(f"no integer stride gives exactly {wanted} of {num_timesteps} steps.")
    sections = [int(c) for c in counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(sections))
    kept, start = [], 0
    for i, count in enumerate(sections):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"cannot take {count} steps from a section of {size}.")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            # Accumulated, as DiT does, so the float ties round exactly as there.
            kept.append(start + round(position))
            position += stride
        start += size
    return np.array(sorted(set(kept)), dtype=np.int64)


def respace(schedule: Schedule, num_sample_steps: Union[int, str]) -> Schedule:
    """The schedule on DiT's spaced subset of its steps (`spaced_timesteps`): new betas
    1 - ac[t] / ac[t_prev] from the kept alphas_cumprod, so each kept step has the noise level
    it had; `timesteps` maps each new index to the original timestep."""
    kept = spaced_timesteps(schedule.num_steps, num_sample_steps)
    kept_ac = schedule.alphas_cumprod[kept]
    betas = 1.0 - kept_ac / np.append(1.0, kept_ac[:-1])
    return schedule_from_betas(betas, timesteps=schedule.timesteps[kept])


def as_jax(schedule: Schedule) -> Schedule:
    """The schedule as float32 / int32 jax arrays (to pass into a jitted function)."""
    return Schedule(*(jnp.asarray(a, jnp.int32 if np.issubdtype(np.asarray(a).dtype, np.integer)
                                  else jnp.float32) for a in schedule))


def _take(values, t_index, ndim: int) -> jax.Array:
    """values[t_index] as float32 [B, 1, ..., 1], to broadcast against [B, ...] arrays."""
    taken = jnp.asarray(values, jnp.float32)[t_index]
    return taken.reshape(taken.shape + (1,) * (ndim - 1))


def _log(values):
    """log in float64 while the schedule is numpy (before any cast), else in its own dtype."""
    return np.log(values) if isinstance(values, np.ndarray) else jnp.log(values)


def original_timesteps(schedule: Schedule, t_index) -> jax.Array:
    """int32 [B]: the timesteps the network sees for schedule indices `t_index`."""
    return jnp.asarray(schedule.timesteps, jnp.int32)[t_index]


# ---------------------------------------------------------------- forward process and posterior

def q_sample(schedule: Schedule, x0, t_index, noise) -> jax.Array:
    """x_t = sqrt(ac_t) x0 + sqrt(1 - ac_t) noise."""
    return (_take(schedule.sqrt_alphas_cumprod, t_index, x0.ndim) * x0
            + _take(schedule.sqrt_one_minus_alphas_cumprod, t_index, x0.ndim) * noise)


def q_posterior_mean_variance(schedule: Schedule, x0, xt, t_index
                              ) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """q(x_{t-1} | x_t, x0): (mean, variance, clipped log variance), each [B, ...]."""
    ndim = xt.ndim
    mean = (_take(schedule.posterior_mean_coef1, t_index, ndim) * x0
            + _take(schedule.posterior_mean_coef2, t_index, ndim) * xt)
    return (mean,) + _posterior_variance(schedule, t_index, xt.shape)


def _posterior_variance(schedule: Schedule, t_index, shape) -> Tuple[jax.Array, jax.Array]:
    """(variance, clipped log variance) of q(x_{t-1} | x_t, x0), broadcast to `shape`."""
    ndim = len(shape)
    return (jnp.broadcast_to(_take(schedule.posterior_variance, t_index, ndim), shape),
            jnp.broadcast_to(_take(schedule.posterior_log_variance_clipped, t_index, ndim),
                             shape))


def predict_x0_from_eps(schedule: Schedule, xt, t_index, eps) -> jax.Array:
    """x0 = x_t / sqrt(ac_t) - sqrt(1 / ac_t - 1) eps."""
    return (_take(schedule.sqrt_recip_alphas_cumprod, t_index, xt.ndim) * xt
            - _take(schedule.sqrt_recipm1_alphas_cumprod, t_index, xt.ndim) * eps)


# --------------------------------------------------------------------------------- reverse step

class ReverseStep(NamedTuple):
    """The model's p(x_{t-1} | x_t), each float32 [B, h, w, C]."""
    mean: jax.Array
    variance: jax.Array
    log_variance: jax.Array
    pred_x0: jax.Array


def split_output(out, channels: int, learned_sigma: bool) -> Tuple[jax.Array, jax.Array]:
    """out [..., C or 2C] -> (epsilon [..., C], the variance value v [..., C] or None)."""
    expected = 2 * channels if learned_sigma else channels
    if out.shape[-1] != expected:
        raise ValueError(f"the denoiser returned {out.shape[-1]} channels; with "
                         f"learned_sigma={learned_sigma} and {channels} latent channels it "
                         f"must return {expected}.")
    return out[..., :channels], (out[..., channels:] if learned_sigma else None)


def p_mean_variance(schedule: Schedule, out, xt, t_index, learned_sigma: bool,
                    clip_x0: bool = False) -> ReverseStep:
    """The reverse step the denoiser's output `out` implies at schedule indices t_index [B].

    Mean: the posterior mean around the predicted x0 (clipped to [-1, 1] with clip_x0, DiT's
    clip_denoised). Variance: learned (DiT's interpolation) or fixed small (see the module doc).
    """
    eps, v = split_output(out, xt.shape[-1], learned_sigma)
    if learned_sigma:
        min_log = _take(schedule.posterior_log_variance_clipped, t_index, xt.ndim)
        max_log = _take(_log(schedule.betas), t_index, xt.ndim)
        frac = (v + 1.0) / 2.0
        log_variance = frac * max_log + (1.0 - frac) * min_log
        variance = jnp.exp(log_variance)
    else:
        variance, log_variance = _posterior_variance(schedule, t_index, xt.shape)
    pred_x0 = predict_x0_from_eps(schedule, xt, t_index, eps)
    if clip_x0:
        pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
    mean, _, _ = q_posterior_mean_variance(schedule, pred_x0, xt, t_index)
    return ReverseStep(mean=mean, variance=variance, log_variance=log_variance, pred_x0=pred_x0)


# ---------------------------------------------------------------------------------------- loss

def _normal_kl(mean1, log_var1, mean2, log_var2) -> jax.Array:
    """KL(N(mean1, var1) || N(mean2, var2)) per element, in nats."""
    return 0.5 * (-1.0 + log_var2 - log_var1 + jnp.exp(log_var1 - log_var2)
                  + (mean1 - mean2) ** 2 * jnp.exp(-log_var2))


def _approx_standard_normal_cdf(x) -> jax.Array:
    # The tanh approximation ADM and DiT use, kept so the decoder NLL matches theirs.
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _discretized_gaussian_log_likelihood(x, mean, log_scale) -> jax.Array:
    """log P(x) per element for data on a 256-level grid over [-1, 1] (bins 2/255 wide), the
    outermost bins reaching to -inf / +inf; in nats. DiT applies it to latents as they are."""
    centered = x - mean
    inv_std = jnp.exp(-log_scale)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus,
                     jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def _mean_over_sample(x) -> jax.Array:
    """[B, ...] -> [B]: DiT's mean_flat."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def variational_bound_bits(schedule: Schedule, out, x0, xt, t_index, *,
                           learned_sigma: bool) -> jax.Array:
    """float32 [B]: DiT's _vb_terms_bpd, in bits per dimension. At index 0 the decoder NLL
    -log p(x0 | x_1) on the 256-level grid; elsewhere KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)).
    Gradients flow through all of `out`; the training loss stops the epsilon half first."""
    true_mean, _, true_log_variance = q_posterior_mean_variance(schedule, x0, xt, t_index)
    model = p_mean_variance(schedule, out, xt, t_index, learned_sigma)
    kl = _mean_over_sample(_normal_kl(true_mean, true_log_variance, model.mean,
                                      model.log_variance)) / math.log(2.0)
    decoder_nll = -_mean_over_sample(_discretized_gaussian_log_likelihood(
        x0, model.mean, 0.5 * model.log_variance)) / math.log(2.0)
    return jnp.where(t_index == 0, decoder_nll, kl)


def training_loss(model_fn: Callable, schedule: Schedule, key, x0, labels, *,
                  learned_sigma: bool) -> Tuple[jax.Array, dict]:
    """DiT's training loss on a batch x0 [B, h, w, C] with labels int32 [B].

    Draws index t uniform over [0, n) per sample and noise N(0, I), both from `key`; the network
    sees x_t and the original timestep. loss = mean((noise - eps)^2) over every element, plus,
    with learned_sigma, the batch mean of `variational_bound_bits` with the epsilon half
    stopped (DiT's LossType.MSE; see the module doc).
    Returns (float32 loss, {"mse": ..., "vb": ...}), vb 0 without learned_sigma.
    """
    x0 = jnp.asarray(x0, jnp.float32)
    t_key, noise_key = jax.random.split(key)
    t_index = jax.random.randint(t_key, (x0.shape[0],), 0, schedule.num_steps)
    noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
    xt = q_sample(schedule, x0, t_index, noise)
    out = jnp.asarray(model_fn(xt, original_timesteps(schedule, t_index), labels), jnp.float32)
    eps, v = split_output(out, x0.shape[-1], learned_sigma)
    mse = jnp.mean((noise - eps) ** 2)
    if learned_sigma:
        # The VLB trains the variance only: the mean it sees comes from a frozen epsilon.
        frozen = jnp.concatenate([jax.lax.stop_gradient(eps), v], axis=-1)
        vb = jnp.mean(variational_bound_bits(schedule, frozen, x0, xt, t_index,
                                             learned_sigma=True))
    else:
        vb = jnp.zeros((), jnp.float32)
    return mse + vb, {"mse": mse, "vb": vb}
