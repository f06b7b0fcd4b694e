"""ImageNet train through a trained tokenizer: tokens and latents for the generators.

    python -m vqlc.main --config=encode_imagenet --workdir=runs/in_tokens \\
        --config.tokenizer.workdir=runs/lc

tfds imagenet2012 train (prepared as array_record; see the README's data section), the
tokenizer's 256 px centre crop (shorter side resized to 256), each image and its mirror image
(aug 0 and 1), codes (int32 [16, 16] at f16) and pre-quantisation latents (float32 [16, 16, 8],
what LDM/DiT/SiT train on) from one encoder pass, 5,000 images per shard (~10 MB of codes and
~80 MB of latents each). Re-running the command resumes; read the result with
`vqlc.data.encoded.EncodedDataset(workdir, expect_tokenizer=tok.identity())`.

Variants: `:ten_crop` is LlamaGen's augmentation (shorter side to 281 px, 5 crops + mirrors).
"""
from vqlc import config_base
from vqlc import encode_task


def get_config(arg: str = ""):
    c = encode_task.base_config()
    c.data.kind = "tfds"
    c.data.name = "imagenet2012"
    c.data.train_split = "train"
    c.data.image_size = 0  # the tokenizer's (256)
    c.data.resize_shorter = 0  # = image_size: the evaluation transform
    c.data.num_workers = 8
    c.encode.what = "both"
    c.encode.augment = "flip"
    c.encode.split = "train"
    c.encode.images_per_shard = 5000
    c.encode.batch_size = 256
    return config_base.apply_named_variants(c, arg, {"ten_crop": _ten_crop})


def _ten_crop(c):
    c.encode.augment = "ten_crop"
    c.encode.crop_scale = 1.1
    c.encode.batch_size = 64  # x 10 crops per step
    return c
