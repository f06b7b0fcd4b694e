"""A small DiT on the demo tokenizer's latents, conditioned on which photograph a crop comes from.

    python -m vqlc.main --config=default --workdir=runs/demo              # the tokenizer
    python -m vqlc.main --config=dit_demo --workdir=runs/dit_demo \\
        --config.tokenizer.workdir=runs/demo

encodes the demo's training crops (each with its mirror image) into <workdir>/latents, trains a
DiT with DiT's objective (linear betas, epsilon prediction, learned variance, hybrid loss,
class dropout 0.1, EMA of the weights), then samples 20 per class with DDPM (respaced) and
scores them (<workdir>/eval/metrics.json, eval/samples.png; see vqlc/gen/evaluation.py): the
latents are snapped to the nearest of the tokenizer's codes and decoded, as the release does.

Toy scale: DiT-Ti/1 (ours: 4 blocks of width 128, patch 1 over the 8x8x8 latents), 7 classes.
`:tiny` is the seconds-long version the tests run.
"""
from vqlc import config_base
from vqlc.configs import encode_demo
from vqlc.gen import diffusion_train


def get_config(arg: str = ""):
    c = diffusion_train.base_config()
    c.tokenizer.workdir = "runs/demo"
    c.data.encode = encode_demo.get_config()
    c.data.encode.encode.what = "latents"
    c.network.kind = "dit"
    c.network.size = "Ti/1"
    c.network.num_classes = 7
    c.objective.kind = "ddpm"
    c.objective.schedule = "linear"
    c.objective.latent_norm = "channel"
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100
    c.optim.ema_decay = 0.999
    c.train.batch_size = 32
    c.train.num_steps = 1500
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 1
    c.eval.per_class = 20
    c.eval.batch_size = 70
    c.eval.sampler.kind = "ddpm"
    c.eval.sampler.num_steps = 100
    return config_base.apply_named_variants(c, arg, {"tiny": tiny})


def tiny(c):
    """The tests' version (a tests/tiny_tokenizer.py tokenizer, given by the test)."""
    c.tokenizer.workdir = ""
    c.data.encode = encode_demo.get_config("tiny")
    c.data.encode.encode.what = "latents"
    c.network.size = "Ti/2"
    c.optim.warmup_steps = 5
    c.train.batch_size = 8
    c.train.num_steps = 40
    c.train.log_every = 10
    c.train.checkpoint_every = 20
    c.train.progress_bar = False
    c.eval.per_class = 2
    c.eval.batch_size = 8
    c.eval.sampler.num_steps = 10
    return c
