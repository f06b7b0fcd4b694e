"""Sampling a flow model with SiT's SDE sampler: Euler–Maruyama, then one noiseless last step.

Time runs SiT's way (vqlc.gen.objectives.flow): noise at t = 0, data at t = 1, and the SDE
runs forward in t:

    dx = [v(x, t) + w(t) s(x, t)] dt + sqrt(2 w(t)) dW

v the velocity, s = grad log p_t the score (both from one network output, `flow`), w(t) >= 0
the diffusion coefficient. Why its marginals are the ODE's for any w: Fokker–Planck gives
dp/dt = -div((v + w s) p) + w lap(p), and s p = grad p, so the score term's -w div(grad p)
cancels the noise's +w lap(p), leaving the ODE's continuity equation dp/dt = -div(v p).
The score enters with a plus sign because t runs towards the data: the score pulls each point
to where density is gathering, the noise spreads it, and the two balance. (Written with
g^2 = 2 w this is dx = [v + g^2 s / 2] dt + g dW; a DDPM-style reverse SDE in a time that runs
data -> noise shows the same term as "- g^2 s" because its dt is negative.)

w(t), SiT's forms with norm = diffusion_norm: "constant" norm; "SBDM" norm drift_var(t) (the
score-based diffusion models' choice); "sigma" norm sigma_t (SiT's default); "linear"
norm (1 - t); "decreasing" 0.25 (norm cos(pi t) + 1)^2; "increasing-decreasing"
norm sin(pi t)^2.

Time grid, as SiT: t_k = linspace(t0, t1, num_steps) and an Euler–Maruyama step from each
of the first num_steps - 1 points (so the state reaches t1), then the last step over
[t1, 1], t1 = 1 - last_step_size:
  "Mean":    x + [v + w s](x, t1) * last_step_size, the drift without the noise (default);
  "Euler":   x + v(x, t1) * last_step_size, the ODE step;
  "Tweedie": E[x1 | x] = (x + sigma^2 s) / alpha at t1;
  None:      none, and t1 = 1 - sample_eps.
num_steps network evaluations in all (num_steps - 1 with no last step). t0 = sample_eps for
score and noise models and for "SBDM" (infinite at t = 0), else 0; sample_eps None = SiT's
(`flow.default_eps`: 0 for velocity, 1e-3 otherwise). SBDM with a velocity model therefore
needs an explicit sample_eps > 0 (SiT's defaults would start at an infinite w).

Randomness per sample: x at t0 from keys[i] (the ODE sampler's starting noise), step k's noise
from fold_in(keys[i], k); sample i never depends on the batch it shares.

Compilation: one jitted program per (model_fn, settings), the loop a lax.fori_loop; a
network's weights closed over by model_fn become constants of that program, so for a real
network call the sampler inside your own jit with the weights as an argument.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from vqlc.gen.objectives import flow
from vqlc.gen.samplers.ode import initial_noise

DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing",
                   "increasing-decreasing")
LAST_STEPS = ("Mean", "Euler", "Tweedie", None)


class Settings(NamedTuple):
    """Everything static about an SDE solve (hashable: a jit cache key)."""
    num_steps: int
    interpolant: str
    prediction: str
    diffusion_form: str
    diffusion_norm: float
    last_step: Optional[str]
    last_step_size: float
    t0: float
    t1: float
    shape: Tuple[int, ...]


def sample_sde(model_fn: Callable, keys, labels, shape: Sequence[int], *, num_steps: int = 250,
               interpolant: str = "linear", prediction: str = "velocity",
               diffusion_form: str = "sigma", diffusion_norm: float = 1.0,
               last_step: Optional[str] = "Mean", last_step_size: float = 0.04,
               sample_eps: Optional[float] = None):
    """Latents [B, *shape] at t = 1 (at 1 - sample_eps with no last step).

    model_fn(x, t, labels) -> out (guidance already wrapped in). keys: [B] key array, one per
    sample. labels: int [B]. shape: one sample's latent shape (h, w, C). The rest as in the
    module doc; the defaults are SiT's sample.py SDE defaults. The network runs num_steps times
    (num_steps - 1 with no last step).
    """
    settings = _settings(num_steps, interpolant, prediction, diffusion_form, diffusion_norm,
                         last_step, last_step_size, sample_eps, shape)
    return _solve(model_fn, settings, keys, labels)


def diffusion(form: str, norm: float, interpolant: str, t) -> jax.Array:
    """w(t) of the SDE (SiT's compute_diffusion)."""
    c = flow.coefficients(interpolant, t)
    t = jnp.asarray(t, jnp.float32)
    if form == "constant":
        return norm * jnp.ones_like(t)
    if form == "SBDM":
        return norm * flow.drift_var(c)
    if form == "sigma":
        return norm * c.sigma
    if form == "linear":
        return norm * (1.0 - t)
    if form == "decreasing":
        return 0.25 * (norm * jnp.cos(jnp.pi * t) + 1.0) ** 2
    if form == "increasing-decreasing":
        return norm * jnp.sin(jnp.pi * t) ** 2
    raise ValueError(f"diffusion_form={form!r}; choose one of {DIFFUSION_FORMS}.")


# ------------------------------------------------------------------------------------ solver

@functools.partial(jax.jit, static_argnums=(0, 1))
def _solve(model_fn: Callable, settings: Settings, keys, labels):
    interpolant, prediction = settings.interpolant, settings.prediction
    x = initial_noise(keys, settings.shape)
    dt = (settings.t1 - settings.t0) / (settings.num_steps - 1)

    def diffusion_at(t):
        return diffusion(settings.diffusion_form, settings.diffusion_norm, interpolant, t)

    def velocity_and_score(x, t):
        out = flow.network_prediction(model_fn, x, t, labels)
        return (flow.velocity_from_prediction(interpolant, prediction, out, x, t),
                flow.score_from_prediction(interpolant, prediction, out, x, t))

    def sde_drift(x, t):
        velocity, score = velocity_and_score(x, t)
        return velocity + diffusion_at(t) * score

    def euler_maruyama(k, x):
        t = settings.t0 + k * dt
        noise = jax.vmap(
            lambda key: jax.random.normal(jax.random.fold_in(key, k), settings.shape))(keys)
        return x + dt * sde_drift(x, t) + jnp.sqrt(2.0 * diffusion_at(t) * dt) * noise

    x = jax.lax.fori_loop(0, settings.num_steps - 1, euler_maruyama, x)
    return _last_step(settings, x, sde_drift, velocity_and_score)


def _last_step(settings: Settings, x, sde_drift: Callable,
               velocity_and_score: Callable) -> jax.Array:
    """The noiseless step from t1 to 1 (see the module doc)."""
    if settings.last_step == "Mean":
        return x + settings.last_step_size * sde_drift(x, settings.t1)
    if settings.last_step == "Euler":
        return x + settings.last_step_size * velocity_and_score(x, settings.t1)[0]
    if settings.last_step == "Tweedie":
        c = flow.coefficients(settings.interpolant, settings.t1)
        return (x + c.sigma ** 2 * velocity_and_score(x, settings.t1)[1]) / c.alpha
    return x


# ---------------------------------------------------------------------------------- checking

def _settings(num_steps, interpolant, prediction, diffusion_form, diffusion_norm, last_step,
              last_step_size, sample_eps, shape) -> Settings:
    if interpolant not in flow.INTERPOLANTS or prediction not in flow.PREDICTIONS:
        raise ValueError(f"interpolant={interpolant!r}, prediction={prediction!r}; choose from "
                         f"{flow.INTERPOLANTS} and {flow.PREDICTIONS}.")
    if diffusion_form not in DIFFUSION_FORMS:
        raise ValueError(f"diffusion_form={diffusion_form!r}; choose one of {DIFFUSION_FORMS}.")
    if last_step not in LAST_STEPS:
        raise ValueError(f"last_step={last_step!r}; choose one of {LAST_STEPS}.")
    if num_steps < 2:
        raise ValueError(f"num_steps={num_steps} must be >= 2 (one Euler–Maruyama step and "
                         "the last step).")
    if len(shape) != 3:
        raise ValueError(f"shape={tuple(shape)} must be one sample's (h, w, C); the batch size "
                         "is len(keys).")
    eps = flow.default_eps(prediction) if sample_eps is None else float(sample_eps)
    t0 = eps if diffusion_form == "SBDM" or prediction != "velocity" else 0.0
    if diffusion_form == "SBDM" and t0 <= 0.0:
        raise ValueError("diffusion_form='SBDM' is infinite at t = 0: pass sample_eps > 0.")
    if last_step is None or last_step_size == 0:
        last_step, last_step_size = None, 0.0
        t1 = 1.0 - eps
    else:
        t1 = 1.0 - float(last_step_size)
    if not 0.0 <= t0 < t1 <= 1.0:
        raise ValueError(f"the Euler–Maruyama interval [{t0}, {t1}] is empty or outside [0, 1];"
                         " check sample_eps and last_step_size.")
    return Settings(int(num_steps), interpolant, prediction, diffusion_form,
                    float(diffusion_norm), last_step, float(last_step_size), t0, t1,
                    tuple(int(d) for d in shape))
