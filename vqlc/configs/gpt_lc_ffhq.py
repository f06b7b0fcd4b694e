"""GPT-LC on FFHQ, unconditional: the release's minGPT over an FFHQ VQGAN-LC's token maps.

    python -m vqlc.main --config=gpt_lc_ffhq --workdir=runs/gpt_ffhq \\
        --config.tokenizer.workdir=runs/ffhq_lc --config.data.encode.data.path=ffhq/train

The same network and schedule as gpt_lc_imagenet but unconditional: one start token (id
100,000, after the codes, so it never collides with code 0) instead of a class token. Without
--config.data.tokens the task first encodes the image folder data.encode.data.path (centre crop
plus mirror image) into <workdir>/tokens.
"""
from vqlc import config_base
from vqlc.configs import gpt_lc_imagenet
from vqlc.configs.ffhq_lc import FFHQ_TRAIN_IMAGES


def get_config(arg: str = ""):
    c = gpt_lc_imagenet.get_config()
    c.tokenizer.workdir = "runs/ffhq_lc"
    c.data.encode.data.kind = "folder"
    c.data.encode.data.name = "ffhq"
    c.data.encode.data.path = ""  # the FFHQ training folder
    c.data.encode.data.num_workers = 8
    c.network.num_classes = 0
    c.train.batch_size = 256
    steps_per_epoch = FFHQ_TRAIN_IMAGES // c.train.batch_size
    c.optim.warmup_steps = 5 * steps_per_epoch
    c.train.num_steps = 100 * steps_per_epoch
    c.train.checkpoint_every = 10 * steps_per_epoch
    c.eval.per_class = 1000  # 1,000 unconditional samples
    c.eval.sampler.top_k = 10_000
    return config_base.apply_named_variants(c, arg, {})
