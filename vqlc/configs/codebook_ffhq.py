"""A 100,000-entry frozen codebook for FFHQ: CLIP ViT-L/14 features, one global k-means.

FFHQ has no classes, so the centres come from one k-means over all features (70,000 images x 16
pooled vectors = 1.12M vectors of 768-d, 3.4 GB as float32: clustered in memory).

    python -m vqlc.main --config=codebook_ffhq --workdir=runs/cb_ffhq \\
        --config.data.path=<folder of FFHQ images> --config.clip.path=<CLIP snapshot folder>
    # then: vqlc/configs/ffhq_lc.py --config.codebook.path=runs/cb_ffhq/codebook.npy
"""
from vqlc import config_base
from vqlc.codebook import task


def get_config(arg: str = ""):
    c = task.base_config()  # the release's recipe: CLIP ViT-L/14, 4x4 pooling, float16 shards
    c.data.kind = "folder"
    c.data.path = ""  # required: the FFHQ image folder
    c.data.num_workers = 8
    c.features.dim = 768
    c.kmeans.mode = "global"
    c.kmeans.init = "random"  # k-means++ seeding is sequential in K: too slow for 100K centres
    return config_base.apply_named_variants(c, arg, {})
