"""VQGAN-LC on ImageNet-1K, as the authors' release trains it (paper Table 2: 100K codes,
256 tokens, 99.9% utilisation, rFID 2.62).

Needs the frozen codebook (issue "Codebook initialisation": vqlc/configs/codebook_imagenet.py writes
it) and ImageNet prepared for tfds (`tfds build imagenet2012` after placing the tar files in
~/tensorflow_datasets/downloads/manual).

    python -m vqlc.main --config=imagenet_lc --workdir=runs/lc \\
        --config.codebook.path=runs/cb/codebook.npy
    python -m vqlc.main --config=imagenet_lc:eval --workdir=runs/lc
    # f8, 1024 tokens, projected dim 4 (paper: rFID 1.29):
    python -m vqlc.main --config=imagenet_lc:f8 --workdir=runs/lc_f8 \\
        --config.codebook.path=runs/cb/codebook.npy

100,000 steps at global batch 256 = 20 epochs (the release: 32 GPUs x 8 images).
"""
from vqlc import config_base


def get_config(arg: str = ""):
    c = config_base.get_base_config()
    c.quantizer.kind = "lc"
    c.quantizer.codebook_size = 100_000
    c.quantizer.dim = 8
    c.codebook.feature_dim = 768
    return config_base.apply_variants(c, arg, {"f8": _f8_dim4})


def _f8_dim4(c):
    config_base.f8(c)
    c.quantizer.dim = 4
    return c
