"""The training loop every trainer shares: resume, steps, NaN guard, cadence, preemption.

A trainer supplies its jitted step, its batches and optional hooks; the loop owns what must be
right the same way everywhere:

  * resume: `resume(manager, state, data_iterator)` restores the newest complete checkpoint
    (state and data position) and says which step it holds;
  * non-finite guard: the step reports `metrics["finite"]` (else the loop looks at
    `metrics["loss"]`); the count stays on the device (no per-step host sync) and is checked
    at every log and before every save, so a non-finite step raises FloatingPointError before
    anything after it reaches a checkpoint;
  * cadence: metrics every `log_every` steps, a checkpoint every `checkpoint_every` steps,
    a preview every `image_every` steps, and all three at the last step;
  * preemption: SIGTERM sets a flag; the loop saves the current step and returns. With several
    processes they agree (every `log_every` steps) on the step to stop at, since the save is
    a collective;
  * progress bar and metrics.jsonl / TensorBoard through `vqlc.train.reporting.Reporter`.

    state, start = loop.resume(manager, state, train_it)
    reporter = reporting.Reporter(workdir, num_steps=n, start_step=start, batch_size=b)
    state, step, stopped = loop.run_loop(
        state, train_step=jitted_step, next_batch=lambda: parallel.global_batch(next(it), mesh),
        num_steps=n, cadence=loop.Cadence(log_every=100, checkpoint_every=5000),
        manager=manager, data_iterator=train_it, reporter=reporter)
"""
import dataclasses
import logging
import signal
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vqlc import checkpoint

DEFAULT_NONFINITE_HINT = "Try a lower optim.lr, or check the data for NaN/Inf."


@dataclasses.dataclass(frozen=True)
class Cadence:
    """Every how many steps to log metrics, save a checkpoint and write a preview (0: only at
    the last step). The last step (or the step a SIGTERM stops at) does all three."""
    log_every: int
    checkpoint_every: int
    image_every: int = 0

    def __post_init__(self):
        for name in ("log_every", "checkpoint_every", "image_every"):
            value = getattr(self, name)
            if value < 0 or (name != "image_every" and value == 0):
                raise ValueError(f"train.{name}={value} must be a positive number of steps.")

    @classmethod
    def from_config(cls, train_config) -> "Cadence":
        """From a config's `train` section (log_every, checkpoint_every, image_every)."""
        return cls(log_every=train_config.log_every,
                   checkpoint_every=train_config.checkpoint_every,
                   image_every=train_config.get("image_every", 0))


class LoopResult(NamedTuple):
    state: Any
    step: int  # the last step taken (== num_steps unless stopped)
    stopped: bool  # True when a SIGTERM stopped the run early (a checkpoint of `step` exists)


class StopRequested:
    """SIGTERM (preemption) sets a flag; the loop then saves a checkpoint and returns."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and stopping.")
        self.requested = True

    def agreed(self, step: int, every: int) -> bool:
        """Whether to stop after `step`. With several processes the signal reaches each at its
        own time, but all must save (a collective) at the same step: they agree every `every`
        steps (a host sync, so not every step) on whether any of them was signalled."""
        if jax.process_count() == 1:
            return self.requested
        if step % every:
            return False
        from jax.experimental import multihost_utils
        return bool(np.any(multihost_utils.process_allgather(np.int32(self.requested))))

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def resume(manager, state, data_iterator=None, *, step_of: Callable = None):
    """(state, start step): the newest complete checkpoint restored into `state`'s shapes and
    shardings (and the data iterator moved to its position), or `state` itself and its step
    when the workdir has none. `step_of(state)` reads the step (default: `int(state.step)`)."""
    restored = checkpoint.restore_latest(manager, state, data_iterator)
    if restored is not None:
        state = restored
    return state, (step_of or _state_step)(state)


def _state_step(state) -> int:
    return int(state.step)


def raise_if_nonfinite(nonfinite, step: int, metrics, hint: str = DEFAULT_NONFINITE_HINT) -> None:
    if float(nonfinite) > 0:
        raise FloatingPointError(
            f"Non-finite loss in {int(float(nonfinite))} step(s) up to step {step} (last "
            f"loss={float(metrics['loss'])}). Training stopped; the last checkpoint predates "
            f"it. {hint}")


def _finite(metrics):
    if "finite" in metrics:
        return jnp.asarray(metrics["finite"], jnp.float32)
    return jnp.isfinite(metrics["loss"]).astype(jnp.float32)


def run_loop(state, *, train_step: Callable, next_batch: Callable, num_steps: int,
             cadence: Cadence, manager, reporter, data_iterator=None,
             on_log: Optional[Callable] = None, on_preview: Optional[Callable] = None,
             start_step: Optional[int] = None,
             nonfinite_hint: str = DEFAULT_NONFINITE_HINT) -> LoopResult:
    """Runs `train_step` from `start_step` (default `int(state.step)`) to `num_steps`.

    train_step(state, batch) -> (state, metrics): metrics is a dict of scalars holding "loss"
        and, optionally, "finite" (1.0 when the step's losses were finite; a step should then
        also leave its state unchanged, as vqlc.train.step does).
    next_batch() -> batch: called once before each step.
    on_log(step, state, scalars) -> (state, scalars): at each log step, with the metrics as
        host floats ("finite" dropped); may add scalars and reset per-window state.
    on_preview(step, state): at each preview step (cadence.image_every, and the last).
    data_iterator: saved in each checkpoint when it has grain's get_state/set_state.
    Returns LoopResult(state, step, stopped). The caller closes `reporter` and `manager`.
    """
    step = _state_step(state) if start_step is None else int(start_step)
    nonfinite = jnp.zeros((), jnp.float32)  # stays on device: no per-step host sync
    stopped = False
    with StopRequested() as stop:
        while step < num_steps:
            batch = next_batch()
            state, metrics = train_step(state, batch)
            nonfinite = nonfinite + (1.0 - _finite(metrics))
            step += 1
            stop_now = stop.agreed(step, cadence.log_every)
            last = step == num_steps or stop_now
            save_now = last or step % cadence.checkpoint_every == 0
            if step % cadence.log_every == 0 or save_now:
                raise_if_nonfinite(nonfinite, step, metrics, nonfinite_hint)
                scalars = {k: v for k, v in jax.device_get(metrics).items() if k != "finite"}
                if on_log is not None:
                    state, scalars = on_log(step, state, scalars)
                reporter.write(step, scalars)
            if on_preview is not None and (
                    (cadence.image_every and step % cadence.image_every == 0) or last):
                on_preview(step, state)
            if save_now:
                checkpoint.save(manager, step, state, data_iterator, force=True)
            reporter.advance(step)
            if stop_now:
                logging.warning("Stopped at step %d of %d (SIGTERM); checkpoint saved in %s. "
                                "Re-run the same command to resume.", step, num_steps,
                                manager.directory)
                stopped = True
                break
    return LoopResult(state, step, stopped)
