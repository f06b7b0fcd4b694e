"""The diffusion workdir a converted release checkpoint becomes (vqlc.gen.convert_dit for DiT-LC
/ SiT-LC, vqlc.gen.convert_ldm for LDM-LC): the one the `diffusion` task writes.

  config.json      the config (tokenizer.workdir: the tokenizer the generator models)
  generator.json   diffusion_train.generator_record: latent_shape from the tokenizer,
                   latent_stats mean 0 / std 1 (the releases train on raw latents), plus a
                   `release` entry (what was converted, from where: the converter's record)
  checkpoints/<config.train.num_steps>/
                   a TrainState (vqlc.gen.trainer) whose `params` and `ema_params` both hold
                   the converted weights (as trainer.fresh_state starts a run), so the sampler
                   reads them with either use_ema; the optimiser state is fresh.
"""
from __future__ import annotations

import os

from vqlc import atomic_io, convert, rundir


def diffusion_state(config, model, latent_shape, flat_params: dict):
    """A TrainState holding the params (and, with EMA, the same as its ema_params), checked
    against the diffusion task's own init_state structure, shapes and dtypes, so resuming and
    DiffusionGenerator.load restore into it. `flat_params` ({path tuple: numpy array}) is
    emptied leaf by leaf as the arrays move to the device, so that a full-size model is not
    held twice."""
    import jax
    import jax.numpy as jnp
    from flax import traverse_util

    from vqlc import parallel
    from vqlc.gen import diffusion_train, trainer
    moved = {path: None for path in flat_params}
    for path in list(flat_params):
        moved[path] = jnp.asarray(flat_params.pop(path))
    params = traverse_util.unflatten_dict(moved)
    del moved
    init_params = diffusion_train.init_params_fn(model, latent_shape)
    tx = trainer.make_optimizer(config.optim, config.train.num_steps,
                                jax.eval_shape(init_params, jax.random.key(0)))
    ema = bool(config.optim.ema_decay)
    mesh = parallel.make_mesh(1)
    expected = jax.eval_shape(lambda: trainer.fresh_state(init_params(jax.random.key(0)), tx,
                                                          seed=config.seed, ema=ema))
    state = trainer.fresh_state(params, tx, seed=config.seed, ema=ema,
                                step=config.train.num_steps)
    convert._check_like(state, expected)
    return jax.device_put(state, parallel.replicated(mesh))


def write_diffusion_workdir(config, dst: str, tokenizer, latent_shape, model, flat_params: dict,
                            release: dict) -> int:
    """Writes config.json, generator.json (with `release` recorded) and the checkpoint at
    config.train.num_steps into `dst` (config.tokenizer.workdir already set to `tokenizer`'s
    workdir); returns that step. `flat_params` is emptied (diffusion_state)."""
    from vqlc import checkpoint, config_io
    from vqlc.gen import diffusion_train
    os.makedirs(dst, exist_ok=True)
    config_io.write_or_check(config, dst)
    stats = {"mean": 0.0, "std": 1.0}  # the releases' raw latents
    record = diffusion_train.generator_record(config, tokenizer, latent_shape, 0, "", stats)
    record["release"] = release
    atomic_io.atomic_write_json(rundir.join(dst, diffusion_train.GENERATOR_FILE), record)
    step = int(config.train.num_steps)
    state = diffusion_state(config, model, latent_shape, flat_params)
    manager = checkpoint.make_manager(dst, keep=config.train.keep_checkpoints)
    checkpoint.save(manager, step, state, None, force=True)
    manager.close()
    return step
