"""The `diffusion` task: DiT (DDPM), SiT (flow matching) or LDM's UNet (DDPM) trained on the
continuous latents of an encode workdir, on the shared generator trainer (vqlc.gen.trainer).

    python -m vqlc.main --config=dit_demo --workdir=runs/dit_demo \\
        --config.tokenizer.workdir=runs/demo

The three parts meet here: the network (`network.kind`: `dit` / `sit`, vqlc.gen.networks.dit,
`network.size` "<size>/<patch>"; `unet`, vqlc.gen.networks.unet, `network.size` a variant:
f16 | f8 | Ti, epsilon output only, so ddpm with learn_sigma False), the objective
(`objective.kind`: `ddpm`, vqlc.gen.objectives.diffusion, or `flow`,
vqlc.gen.objectives.flow) and, for the evaluation at the end and the `sample` task, the sampler
(vqlc.gen.diffusion_generator).

Latents are the tokenizer's pre-quantisation latents (`encode.what='latents'`), as the release
trains DiT-LC, SiT-LC and LDM-LC; samples are snapped to the nearest code before decoding.
`objective.latent_norm='channel'` standardises each channel with the mean and standard deviation
measured over the training latents before training (recorded in generator.json); 'none' trains
on the raw latents, as the release does.

Class dropout (`network.class_dropout`, 0.1 for every network) replaces a label by the null
class (label `num_classes`) so classifier-free guidance has an unconditional branch; the
release's LDM never trains its null class, a flaw not copied.

<workdir>/generator.json records the tokenizer, the latent grid, the network, the objective
and the latent statistics: what the `sample` task and `Generator.load` need besides the
checkpoint.
"""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vqlc import atomic_io, config_io, parallel, rundir, storage
from vqlc.gen import diffusion_generator, token_data, trainer
from vqlc.gen.objectives import next_token
from vqlc.train import loop, reporting

GENERATOR_FILE = "generator.json"
NETWORKS = ("dit", "sit", "unet")
OBJECTIVES = ("ddpm", "flow")
LATENT_NORMS = ("none", "channel")
NORM_IMAGES = 1024  # images whose latents measure latent_norm='channel' statistics


def base_config() -> ml_collections.ConfigDict:
    """Defaults of every diffusion config; the named configs override what differs."""
    from vqlc import encode_task
    c = ml_collections.ConfigDict()
    c.task = "diffusion"
    c.seed = 0
    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.workdir = ""
    c.data = ml_collections.ConfigDict()
    c.data.tokens = ""  # an encode workdir with latents; "" = encode into <workdir>/latents
    # with data.encode first; "on_the_fly" = encode each step's random crops
    c.data.encode = encode_task.base_config()
    c.data.encode.encode.what = "latents"

    c.network = ml_collections.ConfigDict()
    c.network.kind = "dit"  # dit | sit (the same backbone) | unet (LDM's)
    c.network.size = "XL/2"  # dit/sit: S | B | L | XL, patch 2 | 4 | 8; unet: f16 | f8 | Ti
    c.network.num_classes = 1000  # 0: unconditional
    c.network.class_dropout = 0.1
    c.network.learn_sigma = True  # DiT's 2C output; SiT keeps the head and uses the first C

    c.model = ml_collections.ConfigDict()
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (parameters stay float32)
    c.model.remat = "none"  # none | blocks

    c.objective = ml_collections.ConfigDict()
    c.objective.kind = "ddpm"  # ddpm (DiT, LDM) | flow (SiT)
    c.objective.schedule = "linear"  # ddpm: linear (DiT) | linear_sqrt (LDM)
    c.objective.interpolant = "linear"  # flow: linear | gvp
    c.objective.prediction = "velocity"  # flow: velocity | score | noise
    c.objective.latent_norm = "none"  # none (the release) | channel

    c.optim = trainer.optim_config(lr=1e-4, ema_decay=0.9999)  # DiT: AdamW 1e-4, no decay

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 256
    c.train.num_steps = 400_000
    c.train.log_every = 100
    c.train.checkpoint_every = 10_000
    c.train.keep_checkpoints = 3
    c.train.progress_bar = True

    c.eval = ml_collections.ConfigDict()
    c.eval.at_end = True  # sample and score when training finishes (vqlc.gen.evaluation)
    c.eval.per_class = 50
    c.eval.batch_size = 64
    c.eval.sampler = diffusion_generator.sampler_config()

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.shard_params = False
    return c


def check_config(config) -> None:
    """Settings that cannot work fail here, before anything is read or compiled."""
    n, o = config.network, config.objective
    if n.kind not in NETWORKS:
        raise ValueError(f"network.kind={n.kind!r}; valid: {', '.join(NETWORKS)}.")
    if o.kind not in OBJECTIVES:
        raise ValueError(f"objective.kind={o.kind!r}; valid: {', '.join(OBJECTIVES)}.")
    if n.kind == "unet" and o.kind != "ddpm":
        raise ValueError(f"network.kind='unet' trains with objective.kind='ddpm' (LDM's "
                         f"epsilon objective), not {o.kind!r}.")
    if n.kind == "unet" and n.learn_sigma:
        raise ValueError("network.kind='unet' predicts epsilon only: set "
                         "network.learn_sigma=False.")
    if o.latent_norm not in LATENT_NORMS:
        raise ValueError(f"objective.latent_norm={o.latent_norm!r}; valid: "
                         f"{', '.join(LATENT_NORMS)}.")
    if not config.tokenizer.workdir:
        raise ValueError("config.tokenizer.workdir is empty: set it to the tokenizer whose "
                         "latents the generator models (a trained tokenizer workdir).")
    if not 0.0 <= n.class_dropout < 1.0:
        raise ValueError(f"network.class_dropout={n.class_dropout} must be in [0, 1).")
    if config.model.remat not in ("none", "blocks"):
        raise ValueError(f"model.remat={config.model.remat!r}; valid: none, blocks.")
    trainer.check_optim(config.optim)
    loop.Cadence.from_config(config.train)
    diffusion_generator.check_sampler(config.eval.sampler, o.kind, n.num_classes)
    if n.kind == "unet":  # an unknown size fails now
        from vqlc.gen.networks import unet
        unet.make_unet(n.size, input_size=1, in_channels=1)
    else:
        from vqlc.gen.networks import dit
        dit.make_dit(n.size, input_size=1, in_channels=1)


def make_model(network, model, latent_shape):
    """The network for latents [h, w, C]: DiT (dit, and sit: the same network) or LDM's UNet."""
    h, w, channels = latent_shape
    if h != w:
        raise ValueError(f"{network.kind} needs square latents; got {h}x{w}.")
    if network.kind == "unet":
        from vqlc.gen.networks import unet
        return unet.make_unet(network.size, input_size=h, in_channels=channels,
                              num_classes=network.num_classes, dtype=model.dtype,
                              remat=model.remat == "blocks")
    from vqlc.gen.networks import dit
    return dit.make_dit(network.size, input_size=h, in_channels=channels,
                        num_classes=network.num_classes, learn_sigma=network.learn_sigma,
                        dtype=model.dtype, remat=model.remat == "blocks")


def init_params_fn(model, latent_shape):
    x = jnp.zeros((1, *latent_shape), jnp.float32)
    t = jnp.zeros((1,), jnp.float32)
    labels = jnp.zeros((1,), jnp.int32)
    return lambda key: model.init(key, x, t, labels)["params"]


# ------------------------------------------------------------------------------ the objective

def make_loss_fn(model, config, stats: dict):
    """loss_fn(params, batch, key) -> (loss, aux) for trainer.make_train_step."""
    o, n = config.objective, config.network
    mean = jnp.asarray(stats["mean"], jnp.float32)
    std = jnp.asarray(stats["std"], jnp.float32)
    null_label = n.num_classes

    if o.kind == "ddpm":
        from vqlc.gen.objectives import diffusion
        schedule = diffusion.make_schedule(o.schedule)

    def loss_fn(params, batch, key):
        x = (batch["latents"].astype(jnp.float32) - mean) / std
        drop_key, objective_key = jax.random.split(key)
        labels = next_token.drop_labels(drop_key, batch["label"], n.class_dropout, null_label)

        def model_fn(x, t, y):
            return model.apply({"params": params}, x, t, y)

        if o.kind == "ddpm":
            return diffusion.training_loss(model_fn, schedule, objective_key, x, labels,
                                           learned_sigma=n.learn_sigma)
        from vqlc.gen.objectives import flow
        channels = x.shape[-1]
        return flow.training_loss(lambda x, t, y: model_fn(x, t, y)[..., :channels],
                                  objective_key, x, labels, interpolant=o.interpolant,
                                  prediction=o.prediction)
    return loss_fn


# ---------------------------------------------------------------------------------- the data

def latent_stats(config, sample_latents) -> dict:
    """Per-channel mean and std of the training latents ('channel'), or 0 / 1 ('none').
    sample_latents() -> float [N, h, w, C] latents to measure."""
    if config.objective.latent_norm == "none":
        return {"mean": 0.0, "std": 1.0}
    latents = np.asarray(sample_latents(), np.float64)
    axes = tuple(range(latents.ndim - 1))
    std = latents.std(axis=axes)
    if not np.all(np.isfinite(std)) or np.any(std <= 0):
        raise ValueError(f"The training latents have channels of zero or non-finite spread "
                         f"(std {std.tolist()}): latent_norm='channel' cannot standardise them.")
    return {"mean": latents.mean(axis=axes).tolist(), "std": std.tolist()}


def training_data(config, workdir: str, tok, local_batch: int):
    """(iterator of {'latents', 'label'} batches, latent shape, source, images, stats)."""
    shard = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
    num_classes = config.network.num_classes
    if config.data.tokens == token_data.ON_THE_FLY:
        from vqlc import encode_task
        data = encode_task.data_config(config.data.encode, tok.image_size)
        side = tok.image_size // tok.downsample_factor
        shape = (side, side, tok.latent_dim)

        def measured():
            it = token_data.make_encoding_iterator(
                tok, data, num_classes=num_classes, batch_size=min(local_batch, NORM_IMAGES),
                seed=config.seed + 1, field="latents")
            batches = -(-NORM_IMAGES // min(local_batch, NORM_IMAGES))
            return np.concatenate([next(it)["latents"] for _ in range(batches)])
        it = token_data.make_encoding_iterator(
            tok, data, num_classes=num_classes, batch_size=local_batch, seed=config.seed,
            field="latents", **shard)
        return it, shape, token_data.ON_THE_FLY, 0, latent_stats(config, measured)

    images = token_data.ImageCopies(latents_workdir(config, workdir), expect_tokenizer=tok,
                                    field="latents")
    token_data.check_labels(images, num_classes)
    shape = images.copy(0, 0)["latents"].shape
    it = token_data.make_token_iterator(images, batch_size=local_batch, seed=config.seed,
                                        **shard)

    def measured():  # evenly spaced images, copy 0: a bounded read of any dataset
        picks = np.linspace(0, len(images) - 1, min(len(images), NORM_IMAGES)).astype(int)
        return np.stack([images.copy(int(i), 0)["latents"] for i in picks])
    stats = latent_stats(config, measured)
    return it, shape, rundir.absolute(images.rows.workdir), len(images), stats


def latents_workdir(config, workdir: str) -> str:
    """data.tokens, or <workdir>/latents encoded now (resumably) by the nested encode task."""
    from vqlc import encode_task
    return encode_task.encoded_workdir(
        config.data.tokens, config.data.encode, tokenizer_workdir=config.tokenizer.workdir,
        mesh_data=config.mesh.data, directory=rundir.join(workdir, "latents"))


def generator_record(config, tokenizer, shape, images: int, tokens: str, stats: dict) -> dict:
    return {"format": 1, "kind": "diffusion", "network": config.network.to_dict(),
            "objective": config.objective.to_dict(), "tokenizer": tokenizer.identity(),
            "codebook_size": int(tokenizer.config.quantizer.codebook_size),
            "latent_shape": [int(s) for s in shape],
            "image_size": int(tokenizer.config.data.image_size), "tokens": tokens,
            "num_images": int(images), "latent_stats": stats,
            "ema": bool(config.optim.ema_decay)}


# ---------------------------------------------------------------------------------- the task

def run(config, workdir: str) -> dict:
    """vqlc.main's `diffusion` task."""
    from vqlc.tokenizer import Tokenizer
    check_config(config)
    workdir = rundir.absolute(workdir)
    config_io.check_compatible(config, workdir)
    mesh = parallel.make_mesh(config.mesh.data)
    parallel.check_batch_size(config.train.batch_size, mesh)
    tok = Tokenizer.load(config.tokenizer.workdir)
    if config.eval.at_end:
        from vqlc.gen import evaluation
        evaluation.prepare_reference(config, workdir, tok)
    local_batch = parallel.local_batch_size(config.train.batch_size)
    record_path = rundir.join(workdir, GENERATOR_FILE)
    train_it, shape, tokens, num_images, stats = training_data(config, workdir, tok, local_batch)
    if storage.exists(record_path):  # a resumed run keeps the statistics it trained with
        stats = storage.read_json(record_path)["latent_stats"]
    model = make_model(config.network, config.model, shape)

    storage.makedirs(workdir)
    config_io.write_or_check(config, workdir)
    record = generator_record(config, tok, shape, num_images, tokens, stats)
    if jax.process_index() == 0:
        atomic_io.atomic_write_json(record_path, record)
    init_params = init_params_fn(model, shape)
    tx = trainer.make_optimizer(config.optim, config.train.num_steps,
                                jax.eval_shape(init_params, jax.random.key(0)))
    state = trainer.init_state(init_params, tx, seed=config.seed,
                               ema=bool(config.optim.ema_decay), mesh=mesh,
                               shard_params=config.mesh.shard_params)
    parameters = int(sum(x.size for x in jax.tree.leaves(state.params)))
    logging.info("diffusion: %s-%s, %s objective, %.2fM parameters, latents %s from %s",
                 config.network.kind, config.network.size, config.objective.kind,
                 parameters / 1e6, shape, tokens)
    train_step = trainer.make_train_step(make_loss_fn(model, config, stats), tx,
                                         config.optim.ema_decay, config.optim.ema_warmup)
    state, step, stopped = trainer.fit(config, workdir, state=state, train_step=train_step,
                                       train_it=train_it, mesh=mesh)
    last = reporting.read_metrics(workdir)
    results = {"step": step, "stopped": stopped, "parameters": parameters,
               "loss": last[-1]["loss"] if last else None}
    if config.eval.at_end and step >= config.train.num_steps:
        from vqlc.gen import evaluation
        results.update(evaluation.evaluate(config, workdir, tok))
    return results
