"""LDM-LC on FFHQ, unconditional: the f16 UNet of ldm_lc_imagenet over an FFHQ VQGAN-LC's
16x16x8 latents.

    python -m vqlc.main --config=ldm_lc_ffhq --workdir=runs/ldm_ffhq \\
        --config.tokenizer.workdir=runs/ffhq_lc --config.data.encode.data.path=ffhq/train

The release ships no FFHQ LDM config (ldm-lc/configs holds the two ImageNet ones only), so
this is ours: the ImageNet f16 network, objective and optimiser (ldm_lc_imagenet's docstring
gives their provenance) with num_classes 0. The cross-attention context is then the one row of
the class table (the null class), a learned token every sample attends to; LDM's own
unconditional FFHQ model (latent-diffusion's configs/latent-diffusion/ffhq-ldm-vq-4.yaml)
drops the context and uses plain self-attention blocks instead. No class dropout (there is
only the null class). Length: 100 epochs of FFHQ's 60,000 training images, as the release's
ImageNet LDMs (13,300 steps at batch 448). Sampling: DDIM 200 steps, eta 1, no guidance,
1,000 samples. Without --config.data.tokens the task first encodes the
image folder data.encode.data.path (centre crop plus mirror image) into <workdir>/latents.
"""
from vqlc import config_base
from vqlc.configs import ldm_lc_imagenet
from vqlc.configs.ffhq_lc import FFHQ_TRAIN_IMAGES


def get_config(arg: str = ""):
    c = ldm_lc_imagenet.get_config()
    c.tokenizer.workdir = "runs/ffhq_lc"
    c.data.encode.data.kind = "folder"
    c.data.encode.data.name = "ffhq"
    c.data.encode.data.path = ""  # the FFHQ training folder
    c.data.encode.data.num_workers = 8
    c.network.num_classes = 0
    c.network.class_dropout = 0.0
    c.eval.sampler.cfg_scale = 1.0
    c.eval.per_class = 1000  # 1,000 unconditional samples
    steps_per_epoch = FFHQ_TRAIN_IMAGES // c.train.batch_size
    c.train.num_steps = ldm_lc_imagenet.RELEASE_EPOCHS * steps_per_epoch
    c.train.checkpoint_every = 10 * steps_per_epoch
    return config_base.apply_named_variants(c, arg, {"bf16": ldm_lc_imagenet._bf16})
