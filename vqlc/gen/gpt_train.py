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
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vqlc import atomic_io, config_io, parallel, rundir, storage
from vqlc.gen import token_data, trainer
from vqlc.gen.networks import gpt as gpt_lib
from vqlc.gen.objectives import next_token
from vqlc.train import loop, reporting

GENERATOR_FILE = "generator.json"


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

    c.optim = trainer.optim_config(lr=4.5e-4, b2=0.95, weight_decay=0.01, schedule="linear")
    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 1024  # global, over all devices and processes
    c.train.num_steps = 100_000
    c.train.log_every = 100
    c.train.checkpoint_every = 5_000
    c.train.keep_checkpoints = 3
    c.train.progress_bar = True

    c.eval = ml_collections.ConfigDict()
    c.eval.at_end = True  # sample and score when training finishes (vqlc.gen.evaluation)
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
    trainer.check_optim(opt)
    loop.Cadence.from_config(config.train)
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


def init_params_fn(model):
    """key -> the model's initial parameters (for trainer.init_state)."""
    labels = jnp.zeros((1,), jnp.int32)
    codes = jnp.zeros((1, model.num_codes), jnp.int32)
    return lambda key: model.init(key, labels, codes)["params"]


def init_state(model, tx, *, seed: int, ema: bool, mesh, shard_params: bool = False
               ) -> trainer.TrainState:
    return trainer.init_state(init_params_fn(model), tx, seed=seed, ema=ema, mesh=mesh,
                              shard_params=shard_params)


def make_train_step(model, tx, config, codebook_size: int):
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

    return trainer.make_train_step(lambda *args: (loss_fn(*args), {}), tx, ema_decay,
                                   config.optim.ema_warmup)


def generator_record(config, tokenizer, num_codes: int, grid: tuple, images: int,
                     tokens: str) -> dict:
    return {"format": 1, "kind": "gpt", "network": config.network.to_dict(),
            "tokenizer": tokenizer.identity(), "codebook_size": int(
                tokenizer.config.quantizer.codebook_size),
            "token_grid": [int(g) for g in grid], "num_codes": int(num_codes),
            "image_size": int(tokenizer.config.data.image_size),
            "tokens": tokens, "num_images": int(images),
            "ema": bool(config.optim.ema_decay)}


def run(config, workdir: str) -> dict:
    """vqlc.main's `gpt` task."""
    from vqlc.tokenizer import Tokenizer
    check_config(config)
    workdir = rundir.absolute(workdir)
    config_io.check_compatible(config, workdir)
    mesh = parallel.make_mesh(config.mesh.data)
    parallel.check_batch_size(config.train.batch_size, mesh)
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
        token_data.check_labels(images, config.network.num_classes)
        grid = images.copy(0, 0)["codes"].shape
        tokens, num_images = rundir.absolute(images.rows.workdir), len(images)
        train_it = token_data.make_token_iterator(
            images, batch_size=local_batch, seed=config.seed, shard_index=jax.process_index(),
            shard_count=jax.process_count())
    model = make_model(config, codebook_size, int(np.prod(grid)))

    if config.eval.at_end:
        from vqlc.gen import evaluation
        evaluation.prepare_reference(config, workdir, tok)
    storage.makedirs(workdir)
    config_io.write_or_check(config, workdir)
    record = generator_record(config, tok, int(np.prod(grid)), grid, num_images, tokens)
    if jax.process_index() == 0:
        atomic_io.atomic_write_json(rundir.join(workdir, GENERATOR_FILE), record)
    num_steps = config.train.num_steps
    params_shape = jax.eval_shape(init_params_fn(model), jax.random.key(0))
    tx = trainer.make_optimizer(config.optim, num_steps, params_shape)
    state = init_state(model, tx, seed=config.seed, ema=bool(config.optim.ema_decay), mesh=mesh,
                       shard_params=config.mesh.shard_params)
    counts = gpt_lib.param_counts(model)
    logging.info("gpt: %s, %.2fM parameters (%.2fM without embeddings), %d codes of %d per "
                 "sequence, tokens from %s", config.network.kind, counts["total"] / 1e6,
                 counts["total_without_embeddings"] / 1e6, model.num_codes, codebook_size,
                 tokens)
    state, step, stopped = trainer.fit(
        config, workdir, state=state, train_step=make_train_step(model, tx, config, codebook_size),
        train_it=train_it, mesh=mesh)
    last = reporting.read_metrics(workdir)
    results = {"step": step, "stopped": stopped, "parameters": counts["total"],
               "loss": last[-1]["loss"] if last else None}
    if config.eval.at_end and step >= num_steps:
        from vqlc.gen import evaluation
        results.update(evaluation.evaluate(config, workdir, tok))
    return results


def tokens_workdir(config, workdir: str) -> str:
    """data.tokens, or <workdir>/tokens encoded now (resumably) by the nested encode task."""
    from vqlc import encode_task
    return encode_task.encoded_workdir(
        config.data.tokens, config.data.encode, tokenizer_workdir=config.tokenizer.workdir,
        mesh_data=config.mesh.data, directory=rundir.join(workdir, "tokens"))
