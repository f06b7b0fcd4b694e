"""A small ViT that tells the demo's seven training photographs apart from their token maps,
tested on a strip of each photograph it never trains on.

    python -m vqlc.main --config=default --workdir=runs/demo               # the tokenizer
    python -m vqlc.main --config=classifier_demo --workdir=runs/cls_demo \\
        --config.tokenizer.workdir=runs/demo [--config.network.stem=embed]

Data (`data.demo_holdout = 0.3`, vqlc.data.sources.DemoPhotos): training maps are 10,000 random
32 px crops of the left 70% of each photograph (each with its mirror image), encoded into
<workdir>/tokens; evaluation maps are a grid of crops of the right 30% (476 crops), encoded
into <workdir>/eval_tokens. Label = photograph. Results in <workdir>/eval/metrics.json.

The model is MAE's fine-tuning recipe at toy size and from scratch (no MAE weights exist for
it): ViT-Ti (4 blocks, width 128, 4 heads) over the 8 x 8 token map (`pixels`: the decoded 32 px
image in 4 px patches, the same grid), mixup 0.8 / cutmix 1.0 on the map, label smoothing 0.1,
drop path 0.1, AdamW with weight decay 0.05 and a cosine schedule. Two settings differ from
MAE's because nothing here is pretrained: no layer-wise decay (1.0: MAE's 0.65 protects
pretrained lower blocks) and a higher base lr (8e-3 x 32 / 256 = 1e-3), at batch 32 for
1,000 steps.
`:tiny` is the seconds-long version the tests run (a tests/tiny_tokenizer.py tokenizer).
"""
from vqlc import config_base
from vqlc.cls import train
from vqlc.configs import encode_demo

HOLDOUT = 0.3  # the right-hand strip of each photograph the classifier never trains on


def _encode(split: str, arg: str = ""):
    c = encode_demo.get_config(arg)
    c.data.demo_holdout = HOLDOUT
    c.encode.what = "codes"
    c.encode.split = split
    if split == "eval":  # the held-out strip's crop grid, as it is
        c.encode.augment = "none"
        c.encode.crop = "center"
        c.encode.max_images = 0
    return c


def get_config(arg: str = ""):
    c = train.base_config()
    c.tokenizer.workdir = "runs/demo"
    c.data.encode = _encode("train")
    c.data.eval_encode = _encode("eval")
    c.network.size = "Ti/4"
    c.network.stem = "projected"
    c.network.num_classes = 7
    c.optim.blr = 8e-3
    c.optim.layer_decay = 1.0
    c.optim.warmup_steps = 100
    c.train.batch_size = 32
    c.train.num_steps = 1000
    c.train.log_every = 100
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 1
    c.train.progress_bar = False
    c.eval.batch_size = 256
    return config_base.apply_named_variants(c, arg, {"tiny": _tiny})


def _tiny(c):
    c.tokenizer.workdir = ""  # given by the test
    c.data.encode = _encode("train", "tiny")
    c.data.encode.data.demo_holdout = 0.4  # 48 px photos: a strip wide enough for 16 px crops
    c.data.encode.encode.max_images = 64
    c.data.eval_encode = _encode("eval", "tiny")
    c.data.eval_encode.data.demo_holdout = 0.4
    c.network.size = "Ti/2"
    c.network.drop_path = 0.1
    c.optim.warmup_steps = 5
    c.train.batch_size = 16
    c.train.num_steps = 40
    c.train.log_every = 10
    c.train.checkpoint_every = 20
    c.eval.batch_size = 32
    return c
