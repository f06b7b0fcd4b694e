"""Sampling a flow model by integrating its probability-flow ODE, as SiT's ODE sampler does.

Time runs SiT's way (vqlc.gen.objectives.flow): x ~ N(0, I) at t = 0 is integrated forward
to data at t = 1 along dx/dt = v(x, t), v from `flow.drift` (any prediction type).

Methods:
  "euler": x += dt v(x, t), `num_steps` equal steps.
  "heun":  Heun's second-order (explicit trapezoidal) step, 2 evaluations a step: torchdiffeq's
           "heun2", which SiT reaches through torchdiffeq, and EDM's deterministic Heun step.
           EDM takes a plain Euler last step because its field is singular at sigma = 0; the
           velocity is finite at t = 1, so every step here is corrected.
  "dopri5": diffrax's Dopri5 with a PIDController(rtol, atol): SiT's default (torchdiffeq
           dopri5, atol 1e-6, rtol 1e-3). `num_steps` is unused (SiT's is the number of saved
           points, of which it keeps only the last).

`num_steps` counts steps taken. SiT builds `linspace(t0, t1, num_steps)`, i.e. num_steps - 1
steps: its 250 is our 249.

Time interval: SiT integrates velocity models over [0, 1] and keeps score and noise models,
whose velocity divides by alpha_t = 0 at t = 0, on [eps, 1 - eps] with eps = 1e-3 (its
sample_eps). t0 = t1 = None chooses that; the samples are then x at 1 - eps, returned as they
are, as SiT does.

Batch independence: `keys` holds one key per sample and sample i's starting noise comes from
keys[i] alone. Fixed-step methods evaluate the batch together; each sample's result depends
only on its own noise and label as long as the network treats samples independently. Dopri5
is vmapped over samples, so each sample gets its own adaptive steps (SiT's torchdiffeq solve
shares one step size and error norm across the batch). Under vmap the batched loop runs until
the slowest sample is done: the batch costs the largest per-sample count.

stats["nfe"]: int32 [B], network evaluations per sample. Dopri5's: 1 for the first step's first
stage, then 6 per step attempted, accepted or rejected (the seventh stage is the next step's
first). diffrax 0.7's first-step guess evaluates nothing: its wrapped ODE term skips the
Hairer–Wanner guess that torchdiffeq spends 2 evaluations on, and starts with a step of 0.01.

Compilation: one jitted program per (model_fn, settings); a network's weights closed over by
model_fn become constants of that program, so for a real network call the sampler inside your
own jit with the weights as an argument.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import diffrax
import jax
import jax.numpy as jnp

from vqlc.gen.objectives import flow

METHODS = ("euler", "heun", "dopri5")
# Dopri5's evaluations: the first stage once, then the new stages of every attempted step.
DOPRI5_START_EVALS = 1
DOPRI5_EVALS_PER_STEP = 6


class Settings(NamedTuple):
    """Everything static about an ODE solve (hashable: a jit cache key)."""
    method: str
    num_steps: int
    atol: float
    rtol: float
    t0: float
    t1: float
    interpolant: str
    prediction: str
    shape: Tuple[int, ...]
    max_steps: int


def sample_ode(model_fn: Callable, keys, labels, shape: Sequence[int], *,
               method: str = "dopri5", num_steps: int = 50, atol: float = 1e-6,
               rtol: float = 1e-3, t0: Optional[float] = None, t1: Optional[float] = None,
               interpolant: str = "linear", prediction: str = "velocity",
               max_steps: int = 4096):
    """Latents [B, *shape] at t1 and stats {"nfe": int32 [B]}.

    model_fn(x, t, labels) -> out (guidance already wrapped in). keys: [B] key array, one per
    sample (B = len(keys)). labels: int [B]. shape: one sample's latent shape (h, w, C).
    method: "euler", "heun" or "dopri5". num_steps: steps for euler and heun.
    atol, rtol: dopri5's tolerances. t0, t1: the interval (None: SiT's, see the module doc).
    max_steps: dopri5's step budget (an error if a sample needs more).

    The same model_fn object reuses the compiled sampler.
    """
    settings = _settings(method, num_steps, atol, rtol, t0, t1, interpolant, prediction, shape,
                         max_steps)
    if method == "dopri5":
        return _solve_adaptive(model_fn, settings, keys, labels)
    return _solve_fixed(model_fn, settings, keys, labels)


def default_interval(prediction: str) -> Tuple[float, float]:
    """SiT's ODE interval for the linear and GVP paths."""
    eps = flow.default_eps(prediction)
    return eps, 1.0 - eps


def initial_noise(keys, shape: Sequence[int]) -> jax.Array:
    """x at t = 0, [B, *shape]: sample i's noise from keys[i] alone."""
    return jax.vmap(lambda key: jax.random.normal(key, tuple(shape), jnp.float32))(keys)


# ---------------------------------------------------------------------------------- solvers

@functools.partial(jax.jit, static_argnums=(0, 1))
def _solve_fixed(model_fn: Callable, settings: Settings, keys, labels):
    velocity = _velocity(model_fn, settings)
    x = initial_noise(keys, settings.shape)
    dt = (settings.t1 - settings.t0) / settings.num_steps

    def euler(i, x):
        t = settings.t0 + i * dt
        return x + dt * velocity(x, t, labels)

    def heun(i, x):
        t = settings.t0 + i * dt
        slope = velocity(x, t, labels)
        slope_next = velocity(x + dt * slope, t + dt, labels)
        return x + 0.5 * dt * (slope + slope_next)

    step = euler if settings.method == "euler" else heun
    x = jax.lax.fori_loop(0, settings.num_steps, step, x)
    evals_per_step = 1 if settings.method == "euler" else 2
    nfe = jnp.full((x.shape[0],), evals_per_step * settings.num_steps, jnp.int32)
    return x, {"nfe": nfe}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _solve_adaptive(model_fn: Callable, settings: Settings, keys, labels):
    velocity = _velocity(model_fn, settings)

    def solve_one(key, label):
        def field(t, x, args):
            return velocity(x[None], t, label[None])[0]

        solution = diffrax.diffeqsolve(
            diffrax.ODETerm(field), diffrax.Dopri5(), t0=settings.t0, t1=settings.t1,
            dt0=None, y0=initial_noise(key[None], settings.shape)[0],
            stepsize_controller=diffrax.PIDController(rtol=settings.rtol, atol=settings.atol),
            saveat=diffrax.SaveAt(t1=True), max_steps=settings.max_steps)
        attempts = solution.stats["num_steps"]
        return solution.ys[0], DOPRI5_START_EVALS + DOPRI5_EVALS_PER_STEP * attempts

    x, nfe = jax.vmap(solve_one)(keys, labels)
    return x, {"nfe": nfe.astype(jnp.int32)}


def _velocity(model_fn: Callable, settings: Settings) -> Callable:
    return flow.drift(model_fn, interpolant=settings.interpolant, prediction=settings.prediction)


# ---------------------------------------------------------------------------------- checking

def _settings(method, num_steps, atol, rtol, t0, t1, interpolant, prediction, shape,
              max_steps) -> Settings:
    if method not in METHODS:
        raise ValueError(f"method={method!r}; choose one of {METHODS}.")
    if interpolant not in flow.INTERPOLANTS or prediction not in flow.PREDICTIONS:
        raise ValueError(f"interpolant={interpolant!r}, prediction={prediction!r}; choose from "
                         f"{flow.INTERPOLANTS} and {flow.PREDICTIONS}.")
    if method != "dopri5" and num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1.")
    if len(shape) != 3:
        raise ValueError(f"shape={tuple(shape)} must be one sample's (h, w, C); the batch size "
                         "is len(keys).")
    default_t0, default_t1 = default_interval(prediction)
    t0 = default_t0 if t0 is None else float(t0)
    t1 = default_t1 if t1 is None else float(t1)
    if not 0.0 <= t0 < t1 <= 1.0:
        raise ValueError(f"need 0 <= t0 < t1 <= 1 (noise at 0, data at 1); got {t0}, {t1}.")
    num_steps = 0 if method == "dopri5" else int(num_steps)  # unused: no needless recompiles
    return Settings(method, num_steps, float(atol), float(rtol), t0, t1, interpolant,
                    prediction, tuple(int(d) for d in shape), int(max_steps))
