"""Baseline VQGAN-EMA (codebook by exponential moving average, decay 0.99) on ImageNet-1K; the
same encoder, decoder, loss and schedule as vqlc/configs/imagenet_lc.py (paper Table 2 at 16,384 codes: 83.2% utilisation).

    python -m vqlc.main --config=imagenet_ema --workdir=runs/ema
    python -m vqlc.main --config=imagenet_ema:eval --workdir=runs/ema
    # another codebook size (paper: 16,384 / 50,000 / 100,000):
    python -m vqlc.main --config=imagenet_ema --workdir=runs/ema_100k \\
        --config.quantizer.codebook_size=100000
"""
from vqlc import config_base


def get_config(arg: str = ""):
    c = config_base.get_base_config()
    c.quantizer.kind = "ema"
    c.quantizer.codebook_size = 16_384
    c.quantizer.dim = 8
    return config_base.apply_variants(c, arg)
