"""The `classifier` task: a ViT (vqlc.cls.vit) fine-tuned on a tokenizer's token maps with MAE's
recipe (vqlc.cls.recipe), on the shared generator trainer (vqlc.gen.trainer: resume, NaN guard,
SIGTERM, cadence), then evaluated (top-1 / top-5) on held-out token maps.

    python -m vqlc.main --config=classifier_demo --workdir=runs/cls_demo \\
        --config.tokenizer.workdir=runs/demo

Data: the training maps of an encode workdir (`data.tokens`; "" = encode into <workdir>/tokens
with the nested encode config `data.encode`), one random augmented copy per image and epoch
(vqlc.gen.token_data); the evaluation maps likewise (`data.eval_tokens`, `data.eval_encode`,
first copy of each image).

Model: `network.size` ("B/16": MAE's ViT-B; "Ti/<patch>" a CPU toy), `network.stem` (how a token
map enters: see vqlc.cls.inputs), global pooling + fc_norm + head, drop path. `init.mae`: an MAE
checkpoint (mae_pretrain_vit_base.pth) converted at the start of a fresh run
(vqlc.cls.convert_mae: strict, the position table interpolated to the grid); "" trains from
timm's init. A run that resumes from a checkpoint in its workdir neither reads nor needs it.

Optimiser: AdamW with layer-wise lr decay (`optim.layer_decay`), weight decay on matrices,
lr = optim.blr x train.batch_size / 256, linear warm-up then half-cycle cosine to optim.min_lr
(MAE's util/lr_sched per step); mixup / cutmix on the token maps with label smoothing
(`mixup.*`).

Writes <workdir>/classifier.json (the tokenizer, the network, the grid: what Classifier.load
needs besides the checkpoint) and, at the end, <workdir>/eval/metrics.json: top1, top5 (percent),
loss (plain cross-entropy), num_images, stem, step.
"""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vqlc import atomic_io, checkpoint, config_io, parallel, rundir, storage
from vqlc.cls import inputs, recipe, vit as vit_lib
from vqlc.gen import token_data, trainer
from vqlc.train import loop, reporting

RECORD_FILE = "classifier.json"
EVAL_DIR = "eval"
TOP_K = (1, 5)


def base_config() -> ml_collections.ConfigDict:
    """Defaults of every classifier config (MAE's ViT-B fine-tuning); the named configs
    override what differs."""
    from vqlc import encode_task
    c = ml_collections.ConfigDict()
    c.task = "classifier"
    c.seed = 0
    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.workdir = ""  # the tokenizer whose token maps the classifier reads
    c.data = ml_collections.ConfigDict()
    c.data.tokens = ""  # an encode workdir of training maps; "" = encode into <workdir>/tokens
    c.data.encode = encode_task.base_config()
    c.data.encode.encode.what = "codes"
    c.data.eval_tokens = ""  # an encode workdir of evaluation maps; "" = <workdir>/eval_tokens
    c.data.eval_encode = encode_task.base_config()
    c.data.eval_encode.encode.what = "codes"
    c.data.eval_encode.encode.split = "eval"
    c.data.eval_encode.encode.augment = "none"

    c.network = ml_collections.ConfigDict()
    c.network.size = "B/16"  # <size>/<patch>: B | L | H (MAE's) | Ti (a toy); patch: pixels only
    c.network.stem = "projected"  # projected | codebook | embed | pixels (vqlc.cls.inputs)
    c.network.num_classes = 1000
    c.network.global_pool = True  # MAE's fine-tuning: mean of the patch tokens -> fc_norm
    c.network.drop_path = 0.1

    c.init = ml_collections.ConfigDict()
    c.init.mae = ""  # path of an MAE checkpoint to start from; "" = timm's initialisation

    c.model = ml_collections.ConfigDict()
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (parameters stay float32)
    c.model.remat = "none"  # none | blocks

    c.optim = ml_collections.ConfigDict()
    c.optim.blr = recipe.BASE_LR  # lr = blr x train.batch_size / 256
    c.optim.min_lr = recipe.MIN_LR
    c.optim.layer_decay = recipe.LAYER_DECAY
    c.optim.weight_decay = recipe.WEIGHT_DECAY
    c.optim.warmup_steps = 6_255  # MAE's 5 epochs of ImageNet at batch 1,024
    c.optim.grad_clip = 0.0  # MAE's --clip_grad (off)

    c.mixup = ml_collections.ConfigDict()
    c.mixup.mixup_alpha = 0.8
    c.mixup.cutmix_alpha = 1.0
    c.mixup.prob = 1.0
    c.mixup.switch_prob = 0.5
    c.mixup.label_smoothing = 0.1

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 1024  # global, over all devices and processes
    c.train.num_steps = 125_100  # MAE's 100 epochs of ImageNet at batch 1,024
    c.train.log_every = 100
    c.train.checkpoint_every = 5_000
    c.train.keep_checkpoints = 3
    c.train.progress_bar = True

    c.eval = ml_collections.ConfigDict()
    c.eval.at_end = True
    c.eval.batch_size = 256  # global

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.shard_params = False  # FSDP: split parameters and optimiser states over the devices
    return c


def check_config(config, *, resuming: bool = False) -> None:
    """Settings that cannot work fail here, before anything is read or compiled. `resuming`:
    the workdir has a checkpoint, so init.mae is not read (and need not exist)."""
    n = config.network
    if not config.tokenizer.workdir:
        raise ValueError("config.tokenizer.workdir is empty: set it to the tokenizer whose "
                         "token maps the classifier reads (a trained tokenizer workdir).")
    if n.stem not in vit_lib.STEMS:
        raise ValueError(f"network.stem={n.stem!r}; valid: {', '.join(vit_lib.STEMS)}.")
    vit_lib.make_vit(n.size, grid_size=1)  # the size name
    if n.num_classes < 2:
        raise ValueError(f"network.num_classes={n.num_classes} must be >= 2.")
    if not 0.0 <= n.drop_path < 1.0:
        raise ValueError(f"network.drop_path={n.drop_path} must be in [0, 1).")
    if config.model.remat not in ("none", "blocks"):
        raise ValueError(f"model.remat={config.model.remat!r}; valid: none, blocks.")
    o = config.optim
    if o.blr <= 0 or o.min_lr < 0 or not 0.0 < o.layer_decay <= 1.0 or o.weight_decay < 0:
        raise ValueError("optim: blr must be > 0, min_lr >= 0, layer_decay in (0, 1], "
                         f"weight_decay >= 0 (got {o.to_dict()}).")
    if o.warmup_steps < 0:
        raise ValueError(f"optim.warmup_steps={o.warmup_steps} must be >= 0.")
    mixing(config)  # the mixup settings
    loop.Cadence.from_config(config.train)
    if config.eval.batch_size < 1:
        raise ValueError(f"eval.batch_size={config.eval.batch_size} must be >= 1.")
    if config.init.mae and not resuming and not storage.exists(config.init.mae):
        raise FileNotFoundError(f"init.mae={config.init.mae!r} not found: give the path of "
                                "MAE's mae_pretrain_vit_base.pth (or '' to train from scratch).")


def mixing(config) -> recipe.MixupConfig:
    m = config.mixup
    return recipe.MixupConfig(config.network.num_classes, mixup_alpha=m.mixup_alpha,
                              cutmix_alpha=m.cutmix_alpha, prob=m.prob,
                              switch_prob=m.switch_prob, label_smoothing=m.label_smoothing)


def learning_rate(config) -> float:
    """MAE's absolute lr: blr x global batch / 256."""
    return config.optim.blr * config.train.batch_size / 256


def make_model(config, tokenizer) -> inputs.TokenClassifier:
    """The ViT for `tokenizer`'s token maps: the token grid (or, for `pixels`, the decoded
    image's patch grid), the stem's input size, the codebook size."""
    n = config.network
    stem = n.stem
    fields = dict(num_classes=n.num_classes, stem=stem, global_pool=n.global_pool,
                  drop_path=n.drop_path, dtype=config.model.dtype,
                  remat=config.model.remat == "blocks")
    side = tokenizer.image_size // tokenizer.downsample_factor
    if stem == "pixels":
        patch = vit_lib.make_vit(n.size, grid_size=1).patch_size
        if tokenizer.image_size % patch:
            raise ValueError(f"network.size={n.size!r}: patch {patch} does not divide the "
                             f"tokenizer's {tokenizer.image_size} px images.")
        fields.update(grid_size=tokenizer.image_size // patch, in_channels=3)
    elif stem == "projected":
        fields.update(grid_size=side, in_channels=tokenizer.latent_dim)
    elif stem == "codebook":
        if tokenizer.config.quantizer.kind != "lc":
            raise ValueError(f"network.stem='codebook' reads VQGAN-LC's frozen codebook; this "
                             f"tokenizer's quantizer is {tokenizer.config.quantizer.kind!r}: "
                             "use stem 'projected', 'embed' or 'pixels'.")
        fields.update(grid_size=side, in_channels=int(tokenizer.config.codebook.feature_dim))
    else:
        fields.update(grid_size=side, vocab_size=tokenizer.codebook_size)
    return inputs.TokenClassifier(vit_lib.make_vit(n.size, **fields), tokenizer.model)


def make_train_step(clf: inputs.TokenClassifier, tx, config):
    mix = mixing(config)

    def loss_fn(params, batch, key):
        return clf.loss(params, batch["frozen"], batch["codes"], batch["label"], key, mix), {}
    return trainer.make_train_step(loss_fn, tx, 0.0)


def record(config, tokenizer, clf: inputs.TokenClassifier, tokens: str, eval_tokens: str) -> dict:
    return {"format": 1, "kind": "classifier", "network": config.network.to_dict(),
            "tokenizer": tokenizer.identity(), "codebook_size": int(tokenizer.codebook_size),
            "grid_size": int(clf.vit.grid_size), "image_size": int(tokenizer.image_size),
            "tokens": tokens, "eval_tokens": eval_tokens, "init": config.init.mae or None}


def read_record(workdir: str) -> dict:
    path = rundir.join(workdir, RECORD_FILE)
    if not storage.exists(path):
        raise FileNotFoundError(f"{path!r} not found: is {workdir!r} a workdir of the "
                                "classifier task?")
    return storage.read_json(path)


def initial_state(clf, tx, config, mesh, *, resume_from: int | None = None
                  ) -> trainer.TrainState:
    """timm's initialisation, or MAE's weights (init.mae) where the checkpoint has them.
    `resume_from`: the step of the checkpoint that will replace this state
    (checkpoint.latest_step); MAE's checkpoint is then neither converted nor read."""
    model = clf.vit
    state = trainer.init_state(lambda key: vit_lib.init_params(model, key), tx,
                               seed=config.seed, ema=False, mesh=mesh,
                               shard_params=config.mesh.shard_params)
    if config.init.mae and resume_from is not None:
        logging.info("classifier: MAE weights (init.mae=%s) skipped: resuming from the "
                     "checkpoint at step %d", config.init.mae, resume_from)
    elif config.init.mae:
        from vqlc.cls import convert_mae
        params, report = convert_mae.convert_mae_file(config.init.mae, model, seed=config.seed)
        logging.info("classifier: MAE weights from %s: %d tensors loaded, fresh: %s, skipped: "
                     "%s, pos_embed %s", config.init.mae, len(report["loaded"]),
                     report["fresh"], sorted(report["skipped"]), report.get("pos_embed"))
        shardings = jax.tree.map(lambda x: x.sharding, state.params)
        state = state.replace(params=jax.device_put(params, shardings))
    return state


def run(config, workdir: str) -> dict:
    """vqlc.main's `classifier` task."""
    from vqlc.tokenizer import Tokenizer
    workdir = rundir.absolute(workdir)
    resume_from = checkpoint.latest_step(workdir)
    check_config(config, resuming=resume_from is not None)
    config_io.check_compatible(config, workdir)
    mesh = parallel.make_mesh(config.mesh.data)
    parallel.check_batch_size(config.train.batch_size, mesh)
    parallel.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
    tok = Tokenizer.load(config.tokenizer.workdir, mesh=mesh)
    clf = make_model(config, tok)
    from vqlc import encode_task
    tokens = encode_task.encoded_workdir(
        config.data.tokens, config.data.encode, tokenizer_workdir=config.tokenizer.workdir,
        mesh_data=config.mesh.data, directory=rundir.join(workdir, "tokens"))
    eval_tokens = ""
    if config.eval.at_end:
        eval_tokens = encode_task.encoded_workdir(
            config.data.eval_tokens, config.data.eval_encode,
            tokenizer_workdir=config.tokenizer.workdir, mesh_data=config.mesh.data,
            directory=rundir.join(workdir, "eval_tokens"))
        token_data.check_labels(token_data.ImageCopies(eval_tokens, expect_tokenizer=tok),
                      config.network.num_classes)
    images = token_data.ImageCopies(tokens, expect_tokenizer=tok)
    token_data.check_labels(images, config.network.num_classes)
    train_it = token_data.make_token_iterator(
        images, batch_size=parallel.local_batch_size(config.train.batch_size), seed=config.seed,
        shard_index=jax.process_index(), shard_count=jax.process_count())

    storage.makedirs(workdir)
    config_io.write_or_check(config, workdir)
    if jax.process_index() == 0:
        atomic_io.atomic_write_json(rundir.join(workdir, RECORD_FILE), record(
            config, tok, clf, rundir.absolute(tokens), eval_tokens and rundir.absolute(eval_tokens)))
    num_steps = config.train.num_steps
    schedule = recipe.mae_lr_schedule(learning_rate(config), config.optim.warmup_steps,
                                      num_steps, config.optim.min_lr)
    shapes = vit_lib.param_shapes(clf.vit)
    tx = recipe.make_optimizer(shapes, schedule, depth=clf.vit.depth,
                               layer_decay=config.optim.layer_decay,
                               weight_decay=config.optim.weight_decay,
                               grad_clip=config.optim.grad_clip)
    parameters = int(sum(np.prod(s.shape) for s in jax.tree.leaves(shapes)))
    logging.info("classifier: ViT-%s, stem %s, %d x %d tokens, %.2fM parameters, %d training "
                 "images from %s, lr %.3g", config.network.size, clf.stem, clf.vit.grid_size,
                 clf.vit.grid_size, parameters / 1e6, len(images), tokens, learning_rate(config))
    state = initial_state(clf, tx, config, mesh, resume_from=resume_from)
    tables = clf.tables(tok)
    state, step, stopped = trainer.fit(
        config, workdir, state=state, train_step=make_train_step(clf, tx, config),
        train_it=train_it, mesh=mesh, schedule=schedule, frozen=tables)
    last = reporting.read_metrics(workdir)
    results = {"step": step, "stopped": stopped, "parameters": parameters,
               "loss": last[-1]["loss"] if last else None}
    if config.eval.at_end and step >= num_steps:
        metrics = evaluate(clf, state.params, tables, token_data.ImageCopies(eval_tokens, tok),
                           batch_size=config.eval.batch_size, mesh=mesh)
        metrics.update(stem=clf.stem, step=int(step), tokens=rundir.absolute(eval_tokens))
        if jax.process_index() == 0:
            atomic_io.atomic_write_json(rundir.join(workdir, EVAL_DIR, "metrics.json"), metrics)
        logging.info("classifier eval: top-1 %.2f%%, top-5 %.2f%% on %d images",
                     metrics["top1"], metrics["top5"], metrics["num_images"])
        results.update(metrics)
    return results


def evaluation_maps(images: token_data.ImageCopies) -> tuple:
    """(codes int32 [N, h, w], labels int32 [N]): the first copy of every image."""
    copies = images.copies
    codes = images.rows.column("codes")[::copies]
    labels = images.rows.column("labels")[::copies]
    return np.asarray(codes, np.int32), np.asarray(labels, np.int32)


def evaluate(clf: inputs.TokenClassifier, params, tables: dict,
             images: token_data.ImageCopies, *, batch_size: int, mesh) -> dict:
    """top-1 / top-5 accuracy (percent) and mean cross-entropy over every evaluation map.
    Every process holds the maps; each global batch is split into per-process blocks
    (the tail padded and masked), so all processes run the same steps."""
    codes, labels = evaluation_maps(images)
    count = len(labels)
    if not count:
        raise ValueError(f"{images.rows.workdir} holds no evaluation images.")

    @jax.jit
    def scores(params, tables, batch):
        logits = clf.logits(params, tables, batch["codes"])
        mask = batch["mask"]
        ranked = jax.lax.top_k(logits, max(TOP_K))[1]
        hits = ranked == batch["label"][:, None]
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["label"][:, None], 1)[:, 0]
        out = {f"top{k}": jnp.sum(jnp.any(hits[:, :k], axis=1) & mask) for k in TOP_K}
        return {**out, "loss": jnp.sum(jnp.where(mask, nll, 0.0))}

    per_process = parallel.local_batch_size(batch_size)
    totals = {f"top{k}": 0.0 for k in TOP_K} | {"loss": 0.0}
    for start in range(0, count, batch_size):
        lo = min(start + jax.process_index() * per_process, count)
        hi = min(lo + per_process, count)
        pad = per_process - (hi - lo)
        local = {"codes": np.concatenate([codes[lo:hi], np.zeros((pad,) + codes.shape[1:],
                                                                   np.int32)]),
                 "label": np.concatenate([labels[lo:hi], np.zeros(pad, np.int32)]),
                 "mask": np.arange(per_process) < hi - lo}
        out = jax.device_get(scores(params, tables, parallel.global_batch(local, mesh)))
        for key in totals:
            totals[key] += float(out[key])
    metrics = {k: 100.0 * v / count for k, v in totals.items() if k != "loss"}
    return {**metrics, "loss": totals["loss"] / count, "num_images": count}

