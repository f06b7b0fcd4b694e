"""Flow matching with SiT's interpolants (Ma et al. 2024, "SiT"; willisma/SiT `transport/`).

TIME DIRECTION (SiT's, the opposite of DDPM's): t = 0 is pure noise, t = 1 is data.

    x_t = alpha_t * x1 + sigma_t * x0,     x1 = data,  x0 ~ N(0, I)

    "linear" (SiT's ICPlan):  alpha_t = t,             sigma_t = 1 - t
    "gvp"    (SiT's GVPCPlan): alpha_t = sin(pi t / 2), sigma_t = cos(pi t / 2)

Samplers start from N(0, I) at t = 0 and integrate forward to t = 1.

What the network predicts (`prediction`):
    "velocity": u_t = d_alpha_t * x1 + d_sigma_t * x0, the time derivative of x_t
    "score":    grad log p_t(x_t) = -E[x0 | x_t] / sigma_t; trained on -x0 / sigma_t
    "noise":    x0

With the posterior means E[x0 | x] = -sigma s and E[x1 | x] = (x + sigma^2 s) / alpha (s the
score) the three are exchangeable:
    v = (d_alpha / alpha) x + drift_var s,    drift_var = (d_alpha / alpha) sigma^2 - sigma d_sigma
    s = (r v - x) / (sigma^2 - r d_sigma sigma),       r = alpha / d_alpha
    noise = -sigma s = (r v - x) / (r d_sigma - sigma)
(SiT's get_velocity_from_score, get_score_from_velocity, get_noise_from_velocity.) From velocity
the score is written with r = alpha / d_alpha, which is 0 at t = 0, so it is finite there; it is
singular where sigma = 0 (t = 1). Velocity from score or noise divides by alpha, singular at
t = 0: that is why SiT keeps score and noise models away from the ends (`default_eps`).

Network outputs: `model_fn(x, t, labels) -> out`, x NHWC [B, h, w, C], t float [B] in [0, 1];
only out[..., :C] is used (SiT-LC's network has a 2C learned-sigma head whose second half SiT's
forward drops). Classifier-free guidance wraps `model_fn` beforehand (samplers/guidance.py).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

INTERPOLANTS = ("linear", "gvp")
PREDICTIONS = ("velocity", "score", "noise")
LOSS_WEIGHTS = (None, "velocity", "likelihood")
# SiT's eps for score and noise models, whose conversions blow up at the ends of [0, 1];
# velocity models are stable everywhere and get 0.
NON_VELOCITY_EPS = 1e-3


class Coefficients(NamedTuple):
    """The interpolant's coefficients at t, and their time derivatives."""
    alpha: jax.Array
    sigma: jax.Array
    d_alpha: jax.Array
    d_sigma: jax.Array


# ------------------------------------------------------------------------------ interpolants

def coefficients(interpolant: str, t) -> Coefficients:
    """alpha_t, sigma_t, d_alpha_t, d_sigma_t for t (any shape)."""
    t = jnp.asarray(t, jnp.float32)
    if interpolant == "linear":
        return Coefficients(t, 1.0 - t, jnp.ones_like(t), -jnp.ones_like(t))
    if interpolant == "gvp":
        half_pi = jnp.pi / 2
        return Coefficients(jnp.sin(half_pi * t), jnp.cos(half_pi * t),
                            half_pi * jnp.cos(half_pi * t), -half_pi * jnp.sin(half_pi * t))
    raise ValueError(f"interpolant={interpolant!r}; choose one of {INTERPOLANTS}.")


def interpolate(interpolant: str, t, x0, x1) -> jax.Array:
    """x_t = alpha_t x1 + sigma_t x0 (t per sample, or a scalar)."""
    c = expand_like(coefficients(interpolant, t), x1)
    return c.alpha * x1 + c.sigma * x0


def target(interpolant: str, prediction: str, t, x0, x1) -> jax.Array:
    """What a perfect network of this prediction type outputs for this (x0, x1) pair."""
    c = expand_like(coefficients(interpolant, t), x1)
    if prediction == "velocity":
        return c.d_alpha * x1 + c.d_sigma * x0
    if prediction == "score":
        return -x0 / c.sigma
    if prediction == "noise":
        return x0
    raise ValueError(f"prediction={prediction!r}; choose one of {PREDICTIONS}.")


def drift_var(c: Coefficients) -> jax.Array:
    """The score's coefficient in the velocity: (d_alpha / alpha) sigma^2 - sigma d_sigma."""
    return c.d_alpha / c.alpha * c.sigma ** 2 - c.sigma * c.d_sigma


# ------------------------------------------------------------------------------- conversions

def velocity_from_score(interpolant: str, score, x, t) -> jax.Array:
    c = expand_like(coefficients(interpolant, t), x)
    return c.d_alpha / c.alpha * x + drift_var(c) * score


def score_from_velocity(interpolant: str, velocity, x, t) -> jax.Array:
    c = expand_like(coefficients(interpolant, t), x)
    ratio = c.alpha / c.d_alpha  # this way round it is 0, not infinite, at t = 0
    return (ratio * velocity - x) / (c.sigma ** 2 - ratio * c.d_sigma * c.sigma)


def noise_from_velocity(interpolant: str, velocity, x, t) -> jax.Array:
    c = expand_like(coefficients(interpolant, t), x)
    ratio = c.alpha / c.d_alpha
    return (ratio * velocity - x) / (ratio * c.d_sigma - c.sigma)


def velocity_from_noise(interpolant: str, noise, x, t) -> jax.Array:
    """v = d_alpha x1 + d_sigma x0 with x1 = (x - sigma x0) / alpha."""
    c = expand_like(coefficients(interpolant, t), x)
    return c.d_alpha / c.alpha * (x - c.sigma * noise) + c.d_sigma * noise


def score_from_noise(interpolant: str, noise, x, t) -> jax.Array:
    c = expand_like(coefficients(interpolant, t), x)
    return -noise / c.sigma


# -------------------------------------------------------------------- network -> vector fields

def drift(model_fn: Callable, *, interpolant: str = "linear",
          prediction: str = "velocity") -> Callable:
    """`(x, t, labels) -> velocity`: the probability-flow ODE's vector field from the network."""
    _check(interpolant, prediction)

    def fn(x, t, labels):
        out = network_prediction(model_fn, x, t, labels)
        return velocity_from_prediction(interpolant, prediction, out, x, t)
    return fn


def score_function(model_fn: Callable, *, interpolant: str = "linear",
                   prediction: str = "velocity") -> Callable:
    """`(x, t, labels) -> score of p_t at x` from the network."""
    _check(interpolant, prediction)

    def fn(x, t, labels):
        out = network_prediction(model_fn, x, t, labels)
        return score_from_prediction(interpolant, prediction, out, x, t)
    return fn


def velocity_from_prediction(interpolant: str, prediction: str, out, x, t) -> jax.Array:
    """The velocity at (x, t) given the network's prediction `out` of type `prediction`."""
    if prediction == "velocity":
        return out
    if prediction == "score":
        return velocity_from_score(interpolant, out, x, t)
    return velocity_from_noise(interpolant, out, x, t)


def score_from_prediction(interpolant: str, prediction: str, out, x, t) -> jax.Array:
    """The score at (x, t) given the network's prediction `out` of type `prediction`."""
    if prediction == "velocity":
        return score_from_velocity(interpolant, out, x, t)
    if prediction == "score":
        return out
    return score_from_noise(interpolant, out, x, t)


def network_prediction(model_fn: Callable, x, t, labels) -> jax.Array:
    """The network's prediction for x: its first C output channels (a learned-sigma half, if
    any, is dropped as SiT's forward does). t: a scalar or [B]."""
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
    return model_fn(x, t, labels)[..., :x.shape[-1]]


# ---------------------------------------------------------------------------------- training

def default_eps(prediction: str) -> float:
    """SiT's train_eps and sample_eps for the linear and GVP paths: 0 for velocity models."""
    return 0.0 if prediction == "velocity" else NON_VELOCITY_EPS


def training_loss(model_fn: Callable, key, x1, labels, *, interpolant: str = "linear",
                  prediction: str = "velocity", train_eps: Optional[float] = None,
                  loss_weight: Optional[str] = None):
    """SiT's flow-matching loss on a batch of data latents x1 [B, h, w, C] -> (loss, aux).

    t ~ U[train_eps, 1 - train_eps] per sample, x0 ~ N(0, I), x_t on the interpolant; the loss
    is the squared error against `target`, averaged over every element (SiT's mean_flat, then
    the batch mean). train_eps None = SiT's default (`default_eps`: 0 for velocity; SiT forces
    0 for velocity whatever is passed, here an explicit value is honoured).

    Score models use SiT's scaled residual (sigma_t * out + x0)^2, i.e. the error against
    -x0 / sigma_t weighted by sigma_t^2, finite at sigma_t = 0. `loss_weight` (score and noise
    only, as in SiT): None; "velocity" = (drift_var / sigma_t)^2, the error measured in
    velocity; "likelihood" = drift_var / sigma_t^2.

    aux: {"mse": the same mean without loss_weight} (scalars, for logging). Label dropout for
    guidance is the caller's job.
    """
    _check(interpolant, prediction)
    if loss_weight not in LOSS_WEIGHTS:
        raise ValueError(f"loss_weight={loss_weight!r}; choose one of {LOSS_WEIGHTS}.")
    eps = default_eps(prediction) if train_eps is None else float(train_eps)
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"train_eps={eps} must be in [0, 0.5).")
    time_key, noise_key = jax.random.split(key)
    batch = x1.shape[0]
    t = jax.random.uniform(time_key, (batch,), jnp.float32, eps, 1.0 - eps)
    x0 = jax.random.normal(noise_key, x1.shape, x1.dtype)
    out = network_prediction(model_fn, interpolate(interpolant, t, x0, x1), t, labels)
    squared = _squared_error(interpolant, prediction, t, x0, x1, out)
    # SiT's mean_flat then the batch mean: one mean, as every sample has as many elements.
    loss = jnp.mean(_loss_weight(interpolant, prediction, loss_weight, t, x1) * squared)
    return loss, {"mse": jnp.mean(squared)}


def _squared_error(interpolant, prediction, t, x0, x1, out) -> jax.Array:
    if prediction == "score":  # sigma^2 (out + x0 / sigma)^2, finite where sigma = 0
        c = expand_like(coefficients(interpolant, t), x1)
        return (c.sigma * out + x0) ** 2
    return (out - target(interpolant, prediction, t, x0, x1)) ** 2


def _loss_weight(interpolant, prediction, loss_weight, t, x1):
    if prediction == "velocity" or loss_weight is None:
        return 1.0
    c = expand_like(coefficients(interpolant, t), x1)
    if loss_weight == "velocity":
        return (drift_var(c) / c.sigma) ** 2
    return drift_var(c) / c.sigma ** 2


# ----------------------------------------------------------------------------------- helpers

def expand_like(c: Coefficients, x) -> Coefficients:
    """Coefficients of per-sample t [B] reshaped to broadcast against x [B, ...]."""
    extra = jnp.ndim(x) - jnp.ndim(c.alpha)
    return Coefficients(*(jnp.reshape(a, jnp.shape(a) + (1,) * max(extra, 0)) for a in c))


def _check(interpolant: str, prediction: str) -> None:
    if interpolant not in INTERPOLANTS:
        raise ValueError(f"interpolant={interpolant!r}; choose one of {INTERPOLANTS}.")
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction={prediction!r}; choose one of {PREDICTIONS}.")
