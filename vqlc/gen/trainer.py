"""What the generator trainers (GPT, diffusion, flow) share: AdamW with warm-up and decay, one
train state (parameters, optimiser state, EMA, RNG), one train step around a loss, and the run
on the shared loop (vqlc.train.loop: resume, NaN guard, SIGTERM, cadence).

A family supplies its loss, `loss_fn(params, batch, key) -> (loss, aux)`, with `aux` a dict of
scalars to log, and a function that initialises its parameters from a key.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections

from vqlc import checkpoint, parallel
from vqlc.train import loop, reporting

SCHEDULES = ("linear", "cosine", "constant")
DECAY_ON = ("kernels", "matrices")


def optim_config(**overrides) -> ml_collections.ConfigDict:
    """config.optim of a generator: AdamW and its schedule (the families override defaults)."""
    c = ml_collections.ConfigDict()
    c.lr = 1e-4
    c.b1 = 0.9
    c.b2 = 0.999
    c.eps = 1e-8
    c.weight_decay = 0.0
    c.decay_on = "kernels"  # kernels (linear layers' weights) | matrices (every >= 2-D array)
    c.warmup_steps = 0
    c.schedule = "constant"  # after warm-up: linear | cosine (to 0), or constant
    c.grad_clip = 0.0  # global-norm clip; 0 = none
    c.ema_decay = 0.0  # EMA of the weights; 0 = none
    # The EMA's decay at step n is min(ema_decay, (1 + n) / (10 + n)) (latent-diffusion's
    # LitEma): the average forgets the initial weights within the first few hundred steps,
    # where a fixed 0.999 would still hold a fifth of them after 1,500 (short runs' EMA is
    # then worse than the weights). False = the fixed decay from step 0 (DiT's).
    c.ema_warmup = True
    c.update(overrides)
    return c


def check_optim(optim) -> None:
    if optim.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule={optim.schedule!r}; valid: {', '.join(SCHEDULES)}.")
    if optim.decay_on not in DECAY_ON:
        raise ValueError(f"optim.decay_on={optim.decay_on!r}; valid: {', '.join(DECAY_ON)}.")
    if not 0.0 <= optim.ema_decay < 1.0:
        raise ValueError(f"optim.ema_decay={optim.ema_decay} must be in [0, 1).")


def learning_rate_schedule(optim, num_steps: int):
    import optax
    warmup = min(optim.warmup_steps, num_steps)
    decay_steps = max(num_steps - warmup, 1)
    after = {"linear": optax.linear_schedule(optim.lr, 0.0, decay_steps),
             "cosine": optax.cosine_decay_schedule(optim.lr, decay_steps),
             "constant": optax.constant_schedule(optim.lr)}[optim.schedule]
    if not warmup:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), after], [warmup])


def weight_decay_mask(params, decay_on: str):
    """Which parameters AdamW decays: minGPT decays its linear layers' weights only (no
    biases, norms, embeddings); LlamaGen every parameter of two or more dimensions."""
    def decayed(path, leaf):
        if decay_on == "matrices":
            return len(leaf.shape) >= 2
        return getattr(path[-1], "key", None) == "kernel"
    return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(optim, num_steps: int, params):
    import optax
    adamw = optax.adamw(learning_rate_schedule(optim, num_steps), b1=optim.b1, b2=optim.b2,
                        eps=optim.eps, weight_decay=optim.weight_decay,
                        mask=weight_decay_mask(params, optim.decay_on))
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip), adamw) \
        if optim.grad_clip > 0 else adamw


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32: optimiser steps taken
    params: Any
    opt_state: Any
    ema_params: Any  # the EMA of params (an empty dict when optim.ema_decay = 0)
    rng: jax.Array  # uint32 key data; each step folds in its step number


# What mesh.shard_params splits over the devices (the step and RNG stay replicated).
SHARDED_FIELDS = ("params", "opt_state", "ema_params")


def fresh_state(params, tx, *, seed: int, ema: bool, step: int = 0) -> TrainState:
    """A state around `params`: fresh optimiser state, EMA = params, the seed's step RNG."""
    key = jax.random.key(seed)
    return TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                      opt_state=tx.init(params), ema_params=params if ema else {},
                      rng=jax.random.key_data(jax.random.fold_in(key, 1)))


def init_state(init_params: Callable, tx, *, seed: int, ema: bool, mesh,
               shard_params: bool = False) -> TrainState:
    """The initial state, created straight into its placement: replicated, or with
    `shard_params` each large parameter and optimiser array split over the data axis.
    init_params(key) -> params; it gets key(seed)."""
    def init():
        return fresh_state(init_params(jax.random.key(seed)), tx, seed=seed, ema=ema)
    shardings = parallel.state_shardings(mesh, jax.eval_shape(init), shard_params,
                                         SHARDED_FIELDS)
    return jax.jit(init, out_shardings=shardings)()


def ema_decay_at(step, ema_decay: float, warmup: bool):
    """The EMA decay of the update after `step` optimiser steps (see optim_config)."""
    if not warmup:
        return jnp.float32(ema_decay)
    n = step.astype(jnp.float32)
    return jnp.minimum(jnp.float32(ema_decay), (1.0 + n) / (10.0 + n))


def make_train_step(loss_fn: Callable, tx, ema_decay: float, ema_warmup: bool = False
                    ) -> Callable:
    """train_step(state, batch) -> (state, metrics) around loss_fn(params, batch, key) ->
    (loss, aux); the key is fold_in(state.rng, step), so a resumed run draws the same."""
    import optax

    def train_step(state: TrainState, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if ema_decay:
            decay = ema_decay_at(state.step, ema_decay, ema_warmup)
            ema = optax.incremental_update(params, state.ema_params, 1.0 - decay)
        else:
            ema = state.ema_params
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            ema_params=ema)
        finite = jnp.isfinite(loss)
        # A non-finite step leaves the state as it was (the loop then stops with an error).
        new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
        return new, {"loss": loss, "finite": finite.astype(jnp.float32),
                     "grad_norm": optax.global_norm(grads), **aux}
    return train_step


def fit(config, workdir: str, *, state: TrainState, train_step: Callable, train_it, mesh,
        schedule: Callable | None = None, frozen=None):
    """Resume from the newest checkpoint, then train to config.train.num_steps on the shared
    loop; returns (state, step reached, stopped early).

    schedule: step -> learning rate, for the logs (default: config.optim's AdamW schedule).
    frozen: a pytree of arrays already on the mesh that every step reads and nothing trains
    (e.g. a tokenizer's codebook), handed to train_step as batch["frozen"]: an argument of the
    compiled step, not a constant baked into it, and never checkpointed."""
    num_steps = config.train.num_steps
    manager = checkpoint.make_manager(workdir, keep=config.train.keep_checkpoints)
    state, start = loop.resume(manager, state, train_it)
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    step_fn = jax.jit(train_step, donate_argnums=(0,),
                      out_shardings=(state_sharding, parallel.replicated(mesh)))
    reporter = reporting.Reporter(workdir, num_steps=num_steps, start_step=start,
                                  batch_size=config.train.batch_size,
                                  progress_bar=config.train.progress_bar)
    schedule = schedule or learning_rate_schedule(config.optim, num_steps)

    def next_batch():
        batch = parallel.global_batch(next(train_it), mesh)
        return batch if frozen is None else {**batch, "frozen": frozen}

    def on_log(step, state, scalars):
        scalars["lr"] = float(schedule(step))
        return state, scalars

    try:
        return loop.run_loop(
            state, train_step=step_fn,
            next_batch=next_batch, num_steps=num_steps,
            cadence=loop.Cadence.from_config(config.train), manager=manager, reporter=reporter,
            data_iterator=train_it, on_log=on_log, start_step=start)
    finally:
        reporter.close()
        manager.close()
