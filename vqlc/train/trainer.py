"""Tokenizer training: train_and_evaluate(config, workdir) -> (state, eval metrics)."""
import logging
import os
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vqlc import checkpoint, config_io, parallel
from vqlc.codebook import frozen as frozen_codebook
from vqlc.codebook import task as codebook_task
from vqlc.eval import evaluator
from vqlc.eval import images as image_io
from vqlc.eval import metrics as eval_metrics
from vqlc.models import build
from vqlc.models import lpips as lpips_lib
from vqlc.train import optim, reporting
from vqlc.train.state import TrainState, count_params, init_train_state
from vqlc.train.step import make_train_step


class _StopRequested:
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


def setup_model(config: ml_collections.ConfigDict, workdir: str, mesh, abstract: bool = False):
    """Model, discriminator, optimisers, a fresh state and the frozen variables on `mesh`.

    `abstract=True`: the state is shapes and shardings only (a restore target; no compile)."""
    model = build.tokenizer_from_config(config)
    disc = build.discriminator_from_config(config)
    g_tx = optim.make_optimizer(config.optim, config.train.num_steps)
    d_tx = optim.make_optimizer(config.optim, config.train.num_steps)
    state, frozen = init_train_state(model, disc, g_tx, d_tx, image_size=config.data.image_size,
                                     seed=config.seed, mesh=mesh, abstract=abstract,
                                     shard_params=config.mesh.get("shard_params", False))
    if config.quantizer.kind == "lc":
        codes = codebook_task.prepare_tokenizer_codebook(config, workdir)
        frozen = {"frozen": jax.tree.map(
            lambda leaf: jax.device_put(codes, parallel.replicated(mesh)), frozen["frozen"])}
    return model, disc, g_tx, d_tx, state, frozen


def model_variables(state: TrainState, frozen: dict) -> dict:
    """What model.apply needs for inference."""
    return {"params": state.g_params, "ema": state.ema, **frozen}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
    workdir = os.path.abspath(workdir)
    # Bad settings fail here, before anything is compiled or written to the workdir.
    config_io.check_compatible(config, workdir)
    mesh = parallel.make_mesh(config.mesh.data)
    parallel.check_batch_size(config.train.batch_size, mesh)
    if config.eval.at_end:
        parallel.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
    frozen_codebook.check_codebook(config, workdir)
    os.makedirs(workdir, exist_ok=True)
    config_io.write_or_check(config, workdir)
    model, disc, g_tx, d_tx, state, frozen = setup_model(config, workdir, mesh)
    logging.info("process %d/%d, %d local / %d global devices; generator %.2fM params, "
                 "discriminator %.2fM params", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count(),
                 count_params(state.g_params) / 1e6, count_params(state.d_params) / 1e6)

    from vqlc.data import make_eval_iterator, make_train_iterator
    local_batch = parallel.local_batch_size(config.train.batch_size)
    train_it = make_train_iterator(config.data, batch_size=local_batch, seed=config.seed,
                                   shard_index=jax.process_index(),
                                   shard_count=jax.process_count())
    manager = checkpoint.make_manager(workdir, keep=config.train.keep_checkpoints)
    restored = checkpoint.restore_latest(manager, state, train_it)
    if restored is not None:
        state = restored
    lpips_params = jax.device_put(lpips_lib.load_vgg16_lpips_params(), parallel.replicated(mesh))

    step_fn = make_train_step(model, disc, g_tx, d_tx, config.loss,
                              lambda p, x, y: lpips_lib.lpips(x, y, params=p))
    # The new state keeps the old one's placement (replicated, or FSDP-sharded parameters).
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    train_step = jax.jit(step_fn, donate_argnums=(0,),
                         out_shardings=(state_sharding, parallel.replicated(mesh)))
    reconstruct = jax.jit(lambda variables, x: model.apply(variables, x, train=False)[0])
    # A fixed preview batch, read in-process: worker processes for one batch would outlive it.
    preview_data = ml_collections.ConfigDict(config.data.to_dict())
    preview_data.num_workers = 0
    preview = next(iter(make_eval_iterator(preview_data, batch_size=config.eval.num_grid_images)))

    num_steps, start = config.train.num_steps, int(state.step)
    reporter = reporting.Reporter(workdir, num_steps=num_steps, start_step=start,
                                  batch_size=config.train.batch_size,
                                  progress_bar=config.train.progress_bar)
    num_codes = config.quantizer.codebook_size
    nonfinite = jnp.zeros((), jnp.float32)  # stays on device: no per-step host sync
    step = start
    with _StopRequested() as stop:
        while step < num_steps:
            batch = parallel.global_batch(next(train_it), mesh)
            state, metrics = train_step(state, batch, frozen, lpips_params)
            nonfinite = nonfinite + (1.0 - metrics["finite"])
            step += 1
            stop_now = stop.agreed(step, config.train.log_every)
            last = step == num_steps or stop_now
            save_now = last or step % config.train.checkpoint_every == 0
            if step % config.train.log_every == 0 or save_now:
                _raise_if_nonfinite(nonfinite, step, metrics)
                usage = np.asarray(state.usage)
                scalars = {k: v for k, v in jax.device_get(metrics).items() if k != "finite"}
                scalars["utilization"] = eval_metrics.utilization(usage)
                scalars["perplexity"] = float(eval_metrics.perplexity(usage))
                scalars["lr"] = float(optim.learning_rate_schedule(config.optim, num_steps)(step))
                reporter.write(step, scalars)
                state = state.replace(usage=state.usage * 0)  # next window starts empty
            if step % config.train.image_every == 0 or last:
                _write_preview(reporter, workdir, step, reconstruct(
                    model_variables(state, frozen), jnp.asarray(preview["image"])), preview)
            if save_now:
                checkpoint.save(manager, step, state, train_it, force=True)
            reporter.advance(step)
            if stop_now:
                logging.warning("Stopped at step %d of %d (SIGTERM); checkpoint saved in %s. "
                                "Re-run the same command to resume.", step, num_steps,
                                manager.directory)
                break
    reporter.close()
    manager.close()
    if jax.process_index() == 0:
        image_io.plot_utilization(reporting.read_metrics(workdir),
                                  os.path.join(workdir, "plots", "utilization.png"),
                                  title=f"VQGAN-{config.quantizer.kind.upper()}, "
                                        f"K={num_codes}: codes used per log window")
    results = None
    if config.eval.at_end and step >= num_steps:
        results = evaluator.evaluate(config, workdir, model=model,
                                     variables=model_variables(state, frozen), mesh=mesh, step=step)
    return state, results


def _raise_if_nonfinite(nonfinite, step: int, metrics) -> None:
    if float(nonfinite) > 0:
        raise FloatingPointError(
            f"Non-finite loss in {int(float(nonfinite))} step(s) up to step {step} (last "
            f"loss={float(metrics['loss'])}). Training stopped; the last checkpoint predates "
            "it. Try a lower optim.lr, or check the data and the codebook for NaN/Inf.")


def _write_preview(reporter, workdir: str, step: int, x_rec, preview) -> None:
    if jax.process_index() != 0:
        return
    grid = image_io.comparison_grid(image_io.to_uint8(preview["image"]),
                                    image_io.to_uint8(x_rec))
    image_io.save_png(os.path.join(workdir, "images", f"step_{step:08d}.png"), grid)
    reporter.write_images(step, {"reconstructions": grid[None]})


def run(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
    """vqlc.main's `tokenizer` task: the evaluation metrics (None when stopped early)."""
    return train_and_evaluate(config, workdir)[1]
