"""The `gpt` task: a GPT (vqlc.gen.networks.gpt) trained on the token maps of an encode
workdir, on the shared training loop (resume, NaN guard, SIGTERM, cadence).

    python -m vqlc.main --config=gpt_lc_imagenet --workdir=runs/gpt_lc \\
        --config.tokenizer.workdir=runs/lc --config.data.tokens=runs/lc_tokens

Each step: the class (or start) token and the codes go in, the next code is predicted at every
position; `mingpt` inputs are corrupted as the release does (`objective.pkeep`, replacement ids
drawn from the image codes only), targets stay clean; `llamagen` drops labels to its null class
(`network.class_dropout`) so classifier-free guidance has an unconditional branch. The loss is
the chunked cross-entropy (vqlc.gen.objectives.next_token): the [batch, tokens, vocab] logits
are never held at once. AdamW with linear warm-up and linear (or cosine) decay; optional
gradient clipping and an EMA of the weights (the default sampled model when kept).

<workdir>/generator.json records the tokenizer (its identity()), the token grid and the
network, which is what `Generator.load` / the `sample` task need besides the checkpoint.
"""
from __future__ import annotations

import logging
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vqlc import atomic_io, checkpoint, config_io, parallel, rundir, storage
from vqlc.gen import token_data
from vqlc.gen.networks import gpt as gpt_lib
from vqlc.gen.objectives import next_token
from vqlc.train import loop, reporting

GENERATOR_FILE = "generator.json"
SCHEDULES = ("linear", "cosine", "constant")
DECAY_ON = ("kernels", "matrices")


def base_config() -> ml_collections.ConfigDict:
    """Defaults of every GPT config; the named configs override what differs."""
    c = ml_collections.ConfigDict()
    c.task = "gpt"
    c.seed = 0
    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.workdir = ""  # the tokenizer whose tokens the GPT models
    c.data = ml_collections.ConfigDict()
    c.data.tokens = ""  # an encode workdir made by that tokenizer; "" = encode into
    # <workdir>/tokens first, with the nested encode-task config data.encode (its
    # tokenizer.workdir is this config's); "on_the_fly" = encode each step's random crops of
    # data.encode.data as training draws them (the release's way; see vqlc/gen/token_data.py)
    from vqlc import encode_task
    c.data.encode = encode_task.base_config()
    c.data.encode.encode.what = "codes"

    c.network = ml_collections.ConfigDict()
    c.network.kind = "mingpt"  # mingpt | llamagen
    c.network.num_layers = 24
    c.network.num_heads = 16
    c.network.width = 1024
    c.network.num_classes = 1000  # 0: unconditional (one start token)
    c.network.class_dropout = 0.0  # llamagen: 0.1; mingpt: > 0 adds a null class (ours)

    c.model = ml_collections.ConfigDict()
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (parameters stay float32)
    c.model.remat = "none"  # none | blocks

    c.objective = ml_collections.ConfigDict()
    c.objective.pkeep = 1.0  # mingpt: probability an input code is kept (the release: 0.8)
    c.objective.chunk_size = 32  # sequence positions per chunk of the cross-entropy
    c.objective.restrict_to_codes = False  # softmax over image codes only (release: all ids)

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 4.5e-4
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.01
    c.optim.decay_on = "kernels"  # kernels (minGPT: linear layers) | matrices (every >= 2-D)
    c.optim.warmup_steps = 0
    c.optim.schedule = "linear"  # after warm-up: linear | cosine (to 0), or constant
    c.optim.grad_clip = 0.0  # global-norm clip; 0 = none
    c.optim.ema_decay = 0.0  # EMA of the weights; 0 = none

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 1024  # global, over all devices and processes
    c.train.num_steps = 100_000
    c.train.log_every = 100
    c.train.checkpoint_every = 5_000
    c.train.keep_checkpoints = 3
    c.train.progress_bar = True

    c.eval = ml_collections.ConfigDict()
    c.eval.at_end = True  # sample and score when training finishes (vqlc.gen.gpt_eval)
    c.eval.per_class = 50  # class-balanced samples (and held-out reference crops) per class
    c.eval.batch_size = 64
    c.eval.sampler = ml_collections.ConfigDict()  # as the sample task's generator.gpt
    c.eval.sampler.use_ema = True
    c.eval.sampler.temperature = 1.0
    c.eval.sampler.top_k = 0  # 0 = all codes
    c.eval.sampler.top_p = 0.0
    c.eval.sampler.cfg_scale = 0.0
    c.eval.sampler.cfg_start = 0
    c.eval.sampler.cfg_end = 0

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.shard_params = False  # FSDP: split parameters and optimiser states over the devices
    return c


def check_config(config) -> None:
    """Settings that cannot work fail here, before anything is read or compiled."""
    n, o, opt = config.network, config.objective, config.optim
    if n.kind not in gpt_lib.KINDS:
        raise ValueError(f"network.kind={n.kind!r}; valid: {', '.join(gpt_lib.KINDS)}.")
    if not config.tokenizer.workdir:
        raise ValueError("config.tokenizer.workdir is empty: set it to the tokenizer whose "
                         "tokens the GPT models (a trained tokenizer workdir).")
    if not 0.0 < o.pkeep <= 1.0:
        raise ValueError(f"objective.pkeep={o.pkeep} must be in (0, 1].")
    if o.pkeep < 1.0 and n.kind != "mingpt":
        raise ValueError("objective.pkeep < 1 is the release's minGPT corruption; llamagen "
                         "trains on clean inputs.")
    if o.chunk_size < 1:
        raise ValueError(f"objective.chunk_size={o.chunk_size} must be >= 1.")
    if opt.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule={opt.schedule!r}; valid: {', '.join(SCHEDULES)}.")
    if opt.decay_on not in DECAY_ON:
        raise ValueError(f"optim.decay_on={opt.decay_on!r}; valid: {', '.join(DECAY_ON)}.")
    if not 0.0 <= opt.ema_decay < 1.0:
        raise ValueError(f"optim.ema_decay={opt.ema_decay} must be in [0, 1).")
    if not 0.0 <= n.class_dropout < 1.0:
        raise ValueError(f"network.class_dropout={n.class_dropout} must be in [0, 1).")
    if config.model.remat not in ("none", "blocks"):
        raise ValueError(f"model.remat={config.model.remat!r}; valid: none, blocks.")


def make_model(config, codebook_size: int, num_codes: int) -> gpt_lib._GPT:
    n = config.network
    fields = dict(codebook_size=codebook_size, num_classes=n.num_classes,
                  num_layers=n.num_layers, width=n.width,
                  block_size=gpt_lib.CONDITION_TOKENS + num_codes,
                  class_dropout=n.class_dropout, dtype=config.model.dtype,
                  remat=config.model.remat == "blocks")
    if n.get("num_heads"):
        fields["num_heads"] = n.num_heads
    return gpt_lib.make_gpt(n.kind, **fields)


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
class GPTState:
    step: jax.Array  # int32: optimiser steps taken
    params: Any
    opt_state: Any
    ema_params: Any  # the EMA of params (an empty dict when optim.ema_decay = 0)
    rng: jax.Array  # uint32 key data; each step folds in its step number


# What mesh.shard_params splits over the devices (the step and RNG stay replicated).
SHARDED_FIELDS = ("params", "opt_state", "ema_params")


def init_state(model, tx, *, seed: int, ema: bool, mesh, shard_params: bool = False
               ) -> GPTState:
    """The initial state, created straight into its placement: replicated, or with
    `shard_params` each large parameter and optimiser array split over the data axis."""
    labels = jnp.zeros((1,), jnp.int32)
    codes = jnp.zeros((1, model.num_codes), jnp.int32)

    def init():
        key = jax.random.key(seed)
        params = model.init(key, labels, codes)["params"]
        return GPTState(step=jnp.zeros((), jnp.int32), params=params,
                        opt_state=tx.init(params), ema_params=params if ema else {},
                        rng=jax.random.key_data(jax.random.fold_in(key, 1)))
    shardings = parallel.state_shardings(mesh, jax.eval_shape(init), shard_params,
                                         SHARDED_FIELDS)
    return jax.jit(init, out_shardings=shardings)()


def make_train_step(model, tx, config, codebook_size: int):
    import optax
    o, ema_decay = config.objective, config.optim.ema_decay
    restrict = codebook_size if o.restrict_to_codes else None

    def loss_fn(params, batch, key):
        codes = batch["codes"].reshape(batch["codes"].shape[0], -1)
        corrupt_key, dropout_key = jax.random.split(key)
        inputs = next_token.corrupt_tokens(corrupt_key, codes, o.pkeep, codebook_size)
        hidden = model.apply({"params": params}, batch["label"], inputs, train=True,
                             method=model.hidden_states, rngs={"dropout": dropout_key})
        return next_token.chunked_cross_entropy(
            hidden, gpt_lib.head_kernel({"params": params}), codes,
            chunk_size=o.chunk_size, restrict_to=restrict)

    def train_step(state: GPTState, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, key)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = (optax.incremental_update(params, state.ema_params, 1.0 - ema_decay)
               if ema_decay else state.ema_params)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            ema_params=ema)
        finite = jnp.isfinite(loss)
        # A non-finite step leaves the state as it was (the loop then stops with an error).
        new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
        return new, {"loss": loss, "finite": finite.astype(jnp.float32),
                     "grad_norm": optax.global_norm(grads)}
    return train_step


def generator_record(config, tokenizer, num_codes: int, grid: tuple, images: int,
                     tokens: str) -> dict:
    return {"format": 1, "kind": "gpt", "network": config.network.to_dict(),
            "tokenizer": tokenizer.identity(), "codebook_size": int(
                tokenizer.config.quantizer.codebook_size),
            "token_grid": [int(g) for g in grid], "num_codes": int(num_codes),
            "image_size": int(tokenizer.config.data.image_size),
            "tokens": tokens, "num_images": int(images),
            "ema": bool(config.optim.ema_decay)}


def _check_labels(images: token_data.ImageCopies, num_classes: int) -> None:
    labels = images.rows.column("labels")
    if num_classes == 0:
        return
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"{images.rows.workdir}: labels span [{labels.min()}, {labels.max()}] "
                         f"but network.num_classes={num_classes}; set it to at least "
                         f"{labels.max() + 1}.")


def run(config, workdir: str) -> dict:
    """vqlc.main's `gpt` task."""
    from vqlc.tokenizer import Tokenizer
    check_config(config)
    workdir = rundir.absolute(workdir)
    config_io.check_compatible(config, workdir)
    mesh = parallel.make_mesh(config.mesh.data)
    parallel.check_batch_size(config.train.batch_size, mesh)
    cadence = loop.Cadence.from_config(config.train)
    tok = Tokenizer.load(config.tokenizer.workdir)
    codebook_size = int(tok.config.quantizer.codebook_size)
    local_batch = parallel.local_batch_size(config.train.batch_size)
    if config.data.tokens == token_data.ON_THE_FLY:
        from vqlc import encode_task
        data = encode_task.data_config(config.data.encode, tok.image_size)
        side = tok.image_size // tok.downsample_factor
        grid, tokens, num_images = (side, side), token_data.ON_THE_FLY, 0
        train_it = token_data.make_encoding_iterator(
            tok, data, num_classes=config.network.num_classes, batch_size=local_batch,
            seed=config.seed, shard_index=jax.process_index(), shard_count=jax.process_count())
    else:
        images = token_data.ImageCopies(tokens_workdir(config, workdir), expect_tokenizer=tok)
        _check_labels(images, config.network.num_classes)
        grid = images.copy(0, 0)["codes"].shape
        tokens, num_images = rundir.absolute(images.rows.workdir), len(images)
        train_it = token_data.make_token_iterator(
            images, batch_size=local_batch, seed=config.seed, shard_index=jax.process_index(),
            shard_count=jax.process_count())
    model = make_model(config, codebook_size, int(np.prod(grid)))

    if config.eval.at_end:
        from vqlc.gen import gpt_eval
        gpt_eval.prepare_reference(config, workdir, tok)
    storage.makedirs(workdir)
    config_io.write_or_check(config, workdir)
    record = generator_record(config, tok, int(np.prod(grid)), grid, num_images, tokens)
    if jax.process_index() == 0:
        atomic_io.atomic_write_json(rundir.join(workdir, GENERATOR_FILE), record)
    num_steps = config.train.num_steps
    params_shape = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1,), jnp.int32),
        jnp.zeros((1, model.num_codes), jnp.int32))["params"])
    tx = make_optimizer(config.optim, num_steps, params_shape)
    state = init_state(model, tx, seed=config.seed, ema=bool(config.optim.ema_decay), mesh=mesh,
                       shard_params=config.mesh.shard_params)
    counts = gpt_lib.param_counts(model)
    logging.info("gpt: %s, %.2fM parameters (%.2fM without embeddings), %d codes of %d per "
                 "sequence, tokens from %s", config.network.kind, counts["total"] / 1e6,
                 counts["total_without_embeddings"] / 1e6, model.num_codes, codebook_size,
                 tokens)
    manager = checkpoint.make_manager(workdir, keep=config.train.keep_checkpoints)
    state, start = loop.resume(manager, state, train_it)
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    train_step = jax.jit(make_train_step(model, tx, config, codebook_size), donate_argnums=(0,),
                         out_shardings=(state_sharding, parallel.replicated(mesh)))
    reporter = reporting.Reporter(workdir, num_steps=num_steps, start_step=start,
                                  batch_size=config.train.batch_size,
                                  progress_bar=config.train.progress_bar)
    schedule = learning_rate_schedule(config.optim, num_steps)

    def on_log(step, state, scalars):
        scalars["lr"] = float(schedule(step))
        return state, scalars

    state, step, stopped = loop.run_loop(
        state, train_step=train_step,
        next_batch=lambda: parallel.global_batch(next(train_it), mesh), num_steps=num_steps,
        cadence=cadence, manager=manager, reporter=reporter, data_iterator=train_it,
        on_log=on_log, start_step=start)
    reporter.close()
    manager.close()
    last = reporting.read_metrics(workdir)
    results = {"step": step, "stopped": stopped, "parameters": counts["total"],
               "loss": last[-1]["loss"] if last else None}
    if config.eval.at_end and step >= num_steps:
        from vqlc.gen import gpt_eval
        results.update(gpt_eval.evaluate(config, workdir, tok))
    return results


def tokens_workdir(config, workdir: str) -> str:
    """data.tokens, or <workdir>/tokens encoded now (resumably) by the nested encode task."""
    if config.data.tokens:
        return config.data.tokens
    from vqlc import encode_task
    c = ml_collections.ConfigDict(config.data.encode.to_dict())
    c.tokenizer.workdir = config.tokenizer.workdir
    c.mesh.data = config.mesh.data
    directory = rundir.join(workdir, "tokens")
    encode_task.run(c, directory)
    return directory
