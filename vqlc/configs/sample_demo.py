"""Samples of the `replay` generator on the demo tokenizer: the `sample` task end to end.

    python -m vqlc.main --config=default --workdir=runs/demo        # the tokenizer
    python -m vqlc.main --config=sample_demo --workdir=runs/sample_demo \\
        --config.tokenizer.workdir=runs/demo

`replay` returns the demo tokenizer's codes of real 32 px training crops of the seven demo
photographs (class = photograph), 16 crops per class; 50 samples per class = 350 samples,
class-balanced, written to <workdir>/samples.npz (ADM layout), samples.json (utilisation,
images/s) and samples_grid.png (one row per photograph). Swap the generator with
--config.generator.kind=... once a trained one exists. `:tiny` is the seconds-long
configuration the tests run on tests/tiny_tokenizer.py's workdir (16 px crops).
"""
from vqlc import config_base
from vqlc.gen import sample


def get_config(arg: str = ""):
    c = sample.base_config()
    c.generator.kind = "replay"
    c.generator.replay.per_class = 16
    c.tokenizer.workdir = "runs/demo"
    c.sample.num_classes = 7  # the demo's training photographs
    c.sample.labels = "balanced"
    c.sample.per_class = 50
    c.sample.batch_size = 64
    c.sample.seed = 0
    c.sample.grid_classes = 7
    c.sample.grid_per_class = 10
    return config_base.apply_named_variants(c, arg, {"tiny": _tiny})


def _tiny(c):
    c.tokenizer.workdir = ""  # a tests/tiny_tokenizer.py workdir, given on the command line
    c.generator.replay.per_class = 3
    c.sample.per_class = 6  # 42 samples: 6 batches of 8, the last one partial
    c.sample.batch_size = 8
    c.sample.grid_per_class = 4
    c.sample.progress_bar = False
    return c
