"""A small GPT on the demo tokenizer's tokens, conditioned on which photograph a crop comes from.

    python -m vqlc.main --config=default --workdir=runs/demo              # the tokenizer
    python -m vqlc.main --config=gpt_demo --workdir=runs/gpt_demo \\
        --config.tokenizer.workdir=runs/demo

encodes the demo's training crops (each with its mirror image) into <workdir>/tokens, trains,
then samples 20 per class and scores them (<workdir>/eval/metrics.json, eval/samples.png; see
vqlc/gen/evaluation.py). --config.data.tokens=<an encode workdir> skips the encoding.

The release's minGPT at toy size (4 layers, width 192, 4 heads) over the demo's 8x8 token maps
of 512 codes, 7 classes (the photographs), pkeep 0.8 as the release; AdamW (0.9, 0.95), weight
decay 0.01 on linear layers, lr 1e-3 with a short warm-up and linear decay. `:tiny` is the
seconds-long version the tests run (a tests/tiny_tokenizer.py tokenizer: 8x8 maps of
32 codes).
"""
from vqlc import config_base
from vqlc.configs import encode_demo
from vqlc.gen import gpt_train


def get_config(arg: str = ""):
    c = gpt_train.base_config()
    c.tokenizer.workdir = "runs/demo"
    c.data.tokens = ""  # encoded into <workdir>/tokens first, as configs/encode_demo.py does
    c.data.encode = encode_demo.get_config()
    c.data.encode.encode.what = "codes"
    c.network.kind = "mingpt"
    c.network.num_layers = 4
    c.network.num_heads = 4
    c.network.width = 192
    c.network.num_classes = 7
    c.objective.pkeep = 0.8
    c.objective.chunk_size = 16
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100
    c.train.batch_size = 32
    c.train.num_steps = 800
    c.train.log_every = 50
    c.train.checkpoint_every = 400
    c.train.keep_checkpoints = 1
    c.eval.per_class = 20  # 140 samples: Inception on 2 CPU cores takes ~0.3 s an image
    c.eval.batch_size = 70
    return config_base.apply_named_variants(c, arg, {"tiny": _tiny})


def _tiny(c):
    c.tokenizer.workdir = ""  # given by the test
    c.data.encode = encode_demo.get_config("tiny")
    c.data.encode.encode.what = "codes"
    c.data.encode.encode.max_images = 32
    c.network.num_layers = 2
    c.network.num_heads = 2
    c.network.width = 32
    c.network.num_classes = 7
    c.objective.chunk_size = 4
    c.optim.warmup_steps = 5
    c.train.batch_size = 8
    c.train.num_steps = 60
    c.train.log_every = 10
    c.train.checkpoint_every = 30
    c.train.progress_bar = False
    c.eval.per_class = 2
    c.eval.batch_size = 8
    return c
