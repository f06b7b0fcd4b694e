"""A LlamaGen-class GPT over VQGAN-LC's 16x16 ImageNet token maps, the modern baseline.

    python -m vqlc.main --config=llamagen_imagenet:B --workdir=runs/llamagen_b \\
        --config.tokenizer.workdir=runs/lc --config.data.tokens=runs/lc_tokens

Sizes `:B` (12 layers, width 768), `:L` (24 / 1024), `:XL` (36 / 1280), heads of 64 channels;
RMSNorm, SwiGLU, 2-D rotary positions, bias-free linears, a zero-initialised output layer, a
label embedder with a null class and class dropout 0.1 (so classifier-free guidance works).
LlamaGen's recipe: AdamW (0.9, 0.95), weight decay 0.05 on every matrix, lr 1e-4 per 256
images of batch (constant, no warm-up), gradient clipping at 1.0, 300 epochs, global batch 256.
Sampling at the end: top-k 0 (all codes), temperature 1.0, guidance scale 2.0 (LlamaGen's c2i
setting; tune per size). Token maps from encode_imagenet (`:ten_crop` is LlamaGen's
augmentation).
"""
from vqlc import config_base
from vqlc.configs import encode_imagenet
from vqlc.gen import gpt_train
from vqlc.gen.networks import gpt as gpt_lib

IMAGENET_TRAIN_IMAGES = 1_281_167


def get_config(arg: str = "B"):
    c = gpt_train.base_config()
    c.tokenizer.workdir = "runs/lc"
    c.data.encode = encode_imagenet.get_config()
    c.data.encode.encode.what = "codes"
    c.network.kind = "llamagen"
    c.network.num_heads = 0  # 0 = width / 64, LlamaGen's head size
    c.network.num_classes = 1000
    c.network.class_dropout = 0.1
    c.train.batch_size = 256
    c.optim.lr = 1e-4 * c.train.batch_size / 256
    c.optim.b1, c.optim.b2 = 0.9, 0.95
    c.optim.weight_decay = 0.05
    c.optim.decay_on = "matrices"
    c.optim.schedule = "constant"
    c.optim.warmup_steps = 0
    c.optim.grad_clip = 1.0
    steps_per_epoch = IMAGENET_TRAIN_IMAGES // c.train.batch_size
    c.train.num_steps = 300 * steps_per_epoch
    c.train.checkpoint_every = 5 * steps_per_epoch
    c.eval.per_class = 50
    c.eval.batch_size = 500
    c.eval.sampler.cfg_scale = 2.0
    sizes = {name: _size(name) for name in gpt_lib.LLAMAGEN_SIZES}
    return config_base.apply_named_variants(c, arg or "B", sizes)


def _size(name: str):
    def apply(c):
        c.network.num_layers, c.network.width = gpt_lib.LLAMAGEN_SIZES[name]
        return c
    return apply
