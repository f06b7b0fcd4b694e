"""The paper's classification experiment (its Figure 1(b)): MAE's ViT-B fine-tuned on ImageNet
images turned into VQGAN-LC token maps (75.7% top-1 in the paper; 74.1% on VQGAN-FC and 73.8%
on VQGAN-EMA tokens, 16,384 codes each).

    python -m vqlc.main --config=encode_imagenet --workdir=runs/lc_tokens \\
        --config.tokenizer.workdir=runs/lc --config.encode.what=codes
    python -m vqlc.main --config=classifier_lc_imagenet --workdir=runs/cls_lc \\
        --config.tokenizer.workdir=runs/lc --config.data.tokens=runs/lc_tokens \\
        --config.init.mae=mae_pretrain_vit_base.pth [--config.network.stem=pixels]
    # FC / EMA tokenizers: --config.tokenizer.workdir=runs/fc (or runs/ema), new --workdir
    # several hosts: launch/slurm.sh or launch/tpu_vm.sh with the same flags

What follows MAE's fine-tuning recipe (FINETUNE.md's ViT-B command, main_finetune.py): ViT-B/16
with global pooling + fc_norm, drop path 0.1; AdamW (0.9, 0.999), weight decay 0.05 (not on
biases, norms, cls_token, pos_embed), layer-wise lr decay 0.65, base lr 5e-4 (lr = 5e-4 x 1,024 /
256 = 2e-3), global batch 1,024, 100 epochs (125,100 steps) with 5 warm-up epochs (6,255 steps)
then a half-cycle cosine to 1e-6; mixup 0.8 / cutmix 1.0 (switch 0.5), label smoothing 0.1; top-1
and top-5 on the 50,000 validation images (centre crop). MAE's weights: mae_pretrain_vit_base.pth
from facebookresearch/mae's README, read without torch (vqlc.cls.convert_mae; the 14 x 14
position table interpolated to 16 x 16).

What differs, and why: the paper gives no code and does not say how a token map enters the ViT
(see vqlc.cls.inputs for the four readings). Its words are that "the encoder and quantizer
convert each image into a token map" and the ViT is trained "on all token maps": the quantizer's
output is each token's projected code proj(C)[id], the map the decoder reads, so the default
here is the `projected` stem (a linear map of the 8-d code vector to the width; MAE's patch
embedding is unused and the position table is interpolated 14 x 14 -> 16 x 16). `pixels`
(decode the map, feed the reconstruction through MAE's own patch embedding at 256 px, ViT-B/16's
16 x 16 grid) is the other close reading; `codebook` (the 768-d CLIP row, LC only) and `embed`
(a learned table over the ids) are offered for comparison.
Mixup and cutmix act on the token maps (blended code vectors, pasted token boxes) before
decoding, not on pixels; MAE's RandAugment, random erasing and random resized crops act on pixels
and have no counterpart on fixed token maps, so they are not applied: the training maps are the
tokenizer's 256 px centre crop and its mirror image (encode_imagenet's `flip`; its `:ten_crop`
gives ten crops per image).
"""
from vqlc import config_base
from vqlc.cls import train
from vqlc.configs import encode_imagenet

IMAGENET_TRAIN_IMAGES = 1_281_167


def get_config(arg: str = ""):
    c = train.base_config()
    c.tokenizer.workdir = "runs/lc"
    c.data.encode = encode_imagenet.get_config()
    c.data.encode.encode.what = "codes"
    c.data.eval_encode = encode_imagenet.get_config()
    c.data.eval_encode.encode.update(what="codes", split="eval", augment="none")
    c.network.size = "B/16"
    c.network.stem = "projected"
    c.network.num_classes = 1000
    c.network.drop_path = 0.1
    c.init.mae = "mae_pretrain_vit_base.pth"
    c.train.batch_size = 1024
    steps_per_epoch = IMAGENET_TRAIN_IMAGES // c.train.batch_size
    c.optim.warmup_steps = 5 * steps_per_epoch
    c.train.num_steps = 100 * steps_per_epoch
    c.train.checkpoint_every = 5 * steps_per_epoch
    c.eval.batch_size = 1000
    return config_base.apply_named_variants(c, arg, {})
