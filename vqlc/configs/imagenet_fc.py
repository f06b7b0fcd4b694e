"""Baseline VQGAN-FC (factorised, l2-normalised codes, ViT-VQGAN) on ImageNet-1K; the
same encoder, decoder, loss and schedule as vqlc/configs/imagenet_lc.py (paper Table 2 at 16,384 codes: 11.2% utilisation).

    python -m vqlc.main --config=imagenet_fc --workdir=runs/fc
    python -m vqlc.main --config=imagenet_fc:eval --workdir=runs/fc
    # another codebook size (paper: 16,384 / 50,000 / 100,000):
    python -m vqlc.main --config=imagenet_fc --workdir=runs/fc_100k \\
        --config.quantizer.codebook_size=100000
"""
from vqlc import config_base


def get_config(arg: str = ""):
    c = config_base.get_base_config()
    c.quantizer.kind = "fc"
    c.quantizer.codebook_size = 16_384
    c.quantizer.dim = 8
    return config_base.apply_variants(c, arg)
