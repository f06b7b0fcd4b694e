"""The frozen 100,000-entry codebook of VQGAN-LC on ImageNet-1K, as the authors' release makes it.

CLIP ViT-L/14 (224 px) patch features of every ImageNet train image: last layer, ln_post and the
projection (768-d), CLS dropped, 16x16 grid average-pooled 4x4 -> 16 vectors per image
(20.5M vectors, 31 GB as float16 shards); then k-means per class, 100 centres for each of the
1,000 classes, random init from data points, Lloyd until no centre moves by 1e-4.

    python -m vqlc.main --config=codebook_imagenet --workdir=runs/cb \\
        --config.clip.path=<folder of `huggingface-cli download openai/clip-vit-large-patch14`>
    # then: vqlc/configs/imagenet_lc.py --config.codebook.path=runs/cb/codebook.npy

Writes runs/cb/codebook.npy (float32 [100000, 768], 307 MB) and runs/cb/codebook.json. Re-running
resumes the extraction where it stopped. An image folder instead of tfds:
--config.data.kind=folder --config.data.path=<train root with one sub-folder per class>.
Paper Table 6 ablations: `:random_features` (K features drawn at random), `:random_init`
(standard normal codes), `:global` (one k-means over all features).
"""
from vqlc import config_base
from vqlc.codebook import task


def get_config(arg: str = ""):
    c = task.base_config()  # the release's recipe: CLIP ViT-L/14, 4x4 pooling, float16 shards
    c.data.kind = "tfds"
    c.data.name = "imagenet2012"
    c.data.train_split = "train"
    c.data.num_workers = 8
    c.features.dim = 768
    return config_base.apply_named_variants(c, arg, {
        "random_features": _mode("random_features"),
        "random_init": _mode("random_init"),
        "global": _mode("global"),
    })


def _mode(mode):
    def apply(c):
        c.kmeans.mode = mode
    return apply
