"""VQGAN-LC on FFHQ at 256 px (paper Table 3), 800 epochs as the release.

FFHQ must be prepared for tfds (`tfds build ffhq`, 256 px), or point the folder loader at the
images: --config.data.kind=folder --config.data.path=<train dir> --config.data.eval_path=<val dir>.
The release builds the FFHQ codebook from FFHQ's own CLIP features (configs/codebook_ffhq.py).

    python -m vqlc.main --config=configs/ffhq_lc.py --workdir=runs/ffhq_lc \\
        --config.codebook.path=runs/cb_ffhq/codebook.npy
    python -m vqlc.main --config=configs/ffhq_lc.py:eval --workdir=runs/ffhq_lc
"""
from vqlc import config_base

FFHQ_TRAIN_IMAGES = 60_000  # the release's split: 60K train / 10K validation


def get_config(arg: str = ""):
    c = config_base.get_base_config()
    c.quantizer.kind = "lc"
    c.quantizer.codebook_size = 100_000
    c.quantizer.dim = 8
    c.data.name = "ffhq"
    c.data.train_split = "train[:60000]"
    c.data.eval_split = "train[60000:]"
    steps_per_epoch = FFHQ_TRAIN_IMAGES // c.train.batch_size
    c.train.num_steps = 800 * steps_per_epoch
    c.optim.warmup_steps = 5 * steps_per_epoch
    return config_base.apply_variants(c, arg)
