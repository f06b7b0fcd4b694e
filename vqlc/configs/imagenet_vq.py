"""Baseline VQGAN (trainable random codebook, taming) on ImageNet-1K; the
same encoder, decoder, loss and schedule as vqlc/configs/imagenet_lc.py (paper Table 2 at 16,384 codes: 3.4% utilisation).

    python -m vqlc.main --config=imagenet_vq --workdir=runs/vq
    python -m vqlc.main --config=imagenet_vq:eval --workdir=runs/vq
    # another codebook size (paper: 16,384 / 50,000 / 100,000):
    python -m vqlc.main --config=imagenet_vq --workdir=runs/vq_100k \\
        --config.quantizer.codebook_size=100000
"""
from vqlc import config_base


def get_config(arg: str = ""):
    c = config_base.get_base_config()
    c.quantizer.kind = "vq"
    c.quantizer.codebook_size = 16_384
    c.quantizer.dim = 8
    return config_base.apply_variants(c, arg)
