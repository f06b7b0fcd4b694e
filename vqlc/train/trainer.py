"""Tokenizer training: train_and_evaluate(config, workdir) -> (state, eval metrics).

The steps, checkpoints, logs, previews and preemption are the shared loop's
(vqlc.train.loop); this module supplies the tokenizer's step, batches and hooks.
"""
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vqlc import checkpoint, config_io, parallel, rundir, storage
from vqlc.codebook import frozen as frozen_codebook
from vqlc.codebook import task as codebook_task
from vqlc.eval import evaluator
from vqlc.eval import images as image_io
from vqlc.eval import metrics as eval_metrics
from vqlc.models import build
from vqlc.models import lpips as lpips_lib
from vqlc.train import loop, optim, reporting
from vqlc.train.state import TrainState, count_params, init_train_state
from vqlc.train.step import make_train_step


NONFINITE_HINT = "Try a lower optim.lr, or check the data and the codebook for NaN/Inf."


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
            lambda leaf: jax.device_put(codes, parallel.codebook_sharding(mesh)),
            frozen["frozen"])}
    return model, disc, g_tx, d_tx, state, frozen


def model_variables(state: TrainState, frozen: dict) -> dict:
    """What model.apply needs for inference."""
    return {"params": state.g_params, "ema": state.ema, **frozen}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
    """Trains (or resumes) the tokenizer in `workdir`; returns the end-of-training evaluation
    (None when config.eval.at_end is off or a SIGTERM stopped the run first)."""
    return train_and_evaluate(config, workdir)[1]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
    workdir = rundir.absolute(workdir)
    # Bad settings fail here, before anything is compiled or written to the workdir.
    config_io.check_compatible(config, workdir)
    cadence = loop.Cadence.from_config(config.train)
    build.precision(config.model)  # model.dtype / model.remat
    mesh = parallel.make_mesh(config.mesh.data, model=config.mesh.get("model", 1))
    parallel.check_batch_size(config.train.batch_size, mesh)
    if config.eval.at_end:
        parallel.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
    parallel.check_codebook_split(config.quantizer.codebook_size, mesh)
    frozen_codebook.check_codebook(config, workdir)
    storage.makedirs(workdir)
    config_io.write_or_check(config, workdir)
    model, disc, g_tx, d_tx, state, frozen = setup_model(config, workdir, mesh)  # k-means here
    # The context mesh tells the quantizer's search and lookups how the codebook is split.
    with jax.set_mesh(mesh):
        return _train_and_evaluate(config, workdir, mesh, cadence, model, disc, g_tx, d_tx,
                                   state, frozen)


def _train_and_evaluate(config, workdir, mesh, cadence, model, disc, g_tx, d_tx, state, frozen):
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
    state, start = loop.resume(manager, state, train_it)
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

    num_steps = config.train.num_steps
    reporter = reporting.Reporter(workdir, num_steps=num_steps, start_step=start,
                                  batch_size=config.train.batch_size,
                                  progress_bar=config.train.progress_bar)
    num_codes = config.quantizer.codebook_size
    lr_schedule = optim.learning_rate_schedule(config.optim, num_steps)

    def on_log(step, state, scalars):
        usage = np.asarray(state.usage)
        scalars["utilization"] = eval_metrics.utilization(usage)
        scalars["perplexity"] = float(eval_metrics.perplexity(usage))
        scalars["lr"] = float(lr_schedule(step))
        return state.replace(usage=state.usage * 0), scalars  # next window starts empty

    def on_preview(step, state):
        _write_preview(reporter, workdir, step, reconstruct(
            model_variables(state, frozen), jnp.asarray(preview["image"])), preview)

    state, step, _ = loop.run_loop(
        state, train_step=lambda s, batch: train_step(s, batch, frozen, lpips_params),
        next_batch=lambda: parallel.global_batch(next(train_it), mesh), num_steps=num_steps,
        cadence=cadence, manager=manager, reporter=reporter, data_iterator=train_it,
        on_log=on_log, on_preview=on_preview, start_step=start, nonfinite_hint=NONFINITE_HINT)
    reporter.close()
    manager.close()
    if jax.process_index() == 0:
        image_io.plot_utilization(reporting.read_metrics(workdir),
                                  rundir.utilization_plot(workdir),
                                  title=f"VQGAN-{config.quantizer.kind.upper()}, "
                                        f"K={num_codes}: codes used per log window")
    results = None
    if config.eval.at_end and step >= num_steps:
        results = evaluator.evaluate(config, workdir, model=model,
                                     variables=model_variables(state, frozen), mesh=mesh, step=step)
    return state, results


def _write_preview(reporter, workdir: str, step: int, x_rec, preview) -> None:
    if jax.process_index() != 0:
        return
    grid = image_io.comparison_grid(image_io.to_uint8(preview["image"]),
                                    image_io.to_uint8(x_rec))
    image_io.save_png(rundir.preview(workdir, step), grid)
    reporter.write_images(step, {"reconstructions": grid[None]})
