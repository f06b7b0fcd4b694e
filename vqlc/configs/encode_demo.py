"""The embedded demo photos through the demo tokenizer (vqlc/configs/default.py): a token dataset
for CPU-sized generator demos, class = which training photo a crop comes from.

    python -m vqlc.main --config=default --workdir=runs/demo
    python -m vqlc.main --config=encode_demo --workdir=runs/demo_tokens \\
        --config.tokenizer.workdir=runs/demo

10,000 random 32 px crops of the seven training photos (the tokenizer's training crop, drawn
from the seed and the image index, so a re-run gives the same crops), each with its mirror
image: 20,000 rows of int32 [8, 8] codes and float32 [8, 8, 8] latents, labels 0..6.

`:tiny` is the seconds-long version the tests run (for a tokenizer of vqlc/configs/default.py:tiny).
"""
from vqlc import config_base
from vqlc import encode_task


def get_config(arg: str = ""):
    c = encode_task.base_config()
    c.data.kind = "demo"
    c.data.image_size = 0  # the tokenizer's (32)
    c.data.resize_shorter = 0
    c.data.demo_photo_size = 160
    c.data.num_workers = 0
    c.encode.what = "both"
    c.encode.augment = "flip"
    c.encode.crop = "random"
    c.encode.split = "train"
    c.encode.images_per_shard = 2500
    c.encode.batch_size = 256
    c.encode.max_images = 0  # all 10,000 virtual records of the demo's train split
    return config_base.apply_named_variants(c, arg, {"tiny": _tiny})


def _tiny(c):
    c.data.demo_photo_size = 48
    c.encode.images_per_shard = 16
    c.encode.batch_size = 8
    c.encode.max_images = 40
    c.encode.progress = False
    return c
