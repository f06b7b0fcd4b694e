"""VQGAN-LC on FFHQ at 256 px (paper Table 3), 800 epochs as the release.

FFHQ is not in the tfds catalogue: point the folder loader at the images, split as the release
(the first 60,000 images for training, the last 10,000 for evaluation), e.g. ffhq/train and
ffhq/val. The release builds the FFHQ codebook from FFHQ's own CLIP features.

    python -m vqlc.main --config=ffhq_lc --workdir=runs/ffhq_lc \\
        --config.data.path=ffhq/train --config.data.eval_path=ffhq/val \\
        --config.codebook.path=runs/cb_ffhq/codebook.npy
    python -m vqlc.main --config=ffhq_lc:eval --workdir=runs/ffhq_lc \\
        --config.data.path=ffhq/train --config.data.eval_path=ffhq/val
"""
from vqlc import config_base

FFHQ_TRAIN_IMAGES = 60_000  # the release's split: 60K train / 10K validation


def get_config(arg: str = ""):
    c = config_base.get_base_config()
    c.quantizer.kind = "lc"
    c.quantizer.codebook_size = 100_000
    c.quantizer.dim = 8
    c.data.kind = "folder"
    c.data.name = "ffhq"
    steps_per_epoch = FFHQ_TRAIN_IMAGES // c.train.batch_size
    c.train.num_steps = 800 * steps_per_epoch
    c.optim.warmup_steps = 5 * steps_per_epoch
    return config_base.apply_variants(c, arg)
