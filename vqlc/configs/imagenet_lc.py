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

`:1m`: 1,000,000 codes (beyond the paper; the codebook task clusters that many centres), split
along K over `mesh.model = 8` devices, the batch over all of them:

    python -m vqlc.main --config=imagenet_lc:1m --workdir=runs/lc_1m \
        --config.codebook.path=runs/cb_1m/codebook.npy

Memory per device at 8 devices (float32), from the shardings:
  frozen codebook C [1,000,000, 768]: 3.07 GB whole, 384 MB per device (8-way split);
  projected codes proj(C) [1,000,000, 8] and their gradient: 32 MB each whole, 4 MB per device;
  code-usage counts [1,000,000] int32, replicated: 4 MB;
  the search: each device gathers its group's rows (32 images x 256 tokens x 8 devices x 8
  floats = 2 MB) and searches them against its 125,000 codes in tiles (the same FLOPs as its own
  8,192 rows against all 1,000,000 codes), then two all-reduces of 65,536 minima.
Replicated instead, C alone would take 3.07 GB of every device. Token ids stay int32.
"""
from vqlc import config_base


def get_config(arg: str = ""):
    c = config_base.get_base_config()
    c.quantizer.kind = "lc"
    c.quantizer.codebook_size = 100_000
    c.quantizer.dim = 8
    c.codebook.feature_dim = 768
    return config_base.apply_variants(c, arg, {"f8": _f8_dim4, "1m": _one_million})


def _f8_dim4(c):
    config_base.f8(c)
    c.quantizer.dim = 4
    return c


def _one_million(c):
    c.quantizer.codebook_size = 1_000_000
    c.mesh.model = 8  # the codebook split 8 ways along K; needs a multiple of 8 devices
    return c
