"""The paper's GPT-LC (Table 4): the release's minGPT over VQGAN-LC's 16x16 ImageNet token maps.

    python -m vqlc.main --config=encode_imagenet --workdir=runs/lc_tokens \\
        --config.tokenizer.workdir=runs/lc --config.encode.what=codes
    python -m vqlc.main --config=gpt_lc_imagenet --workdir=runs/gpt_lc \\
        --config.tokenizer.workdir=runs/lc --config.data.tokens=runs/lc_tokens
    # several hosts: launch/slurm.sh or launch/tpu_vm.sh with the same flags

24 layers, 16 heads, width 1024, learned positions, untied head over 100,000 codes + 1,000
class ids (509M parameters; 406M without embeddings, the paper's "404M"); pkeep 0.8 (replacement
ids from the image codes only, unlike the release's draw). The release's DeepSpeed schedule:
AdamW (0.9, 0.95), weight decay 0.01 on linear layers, lr 4.5e-4, global batch 1,024, 5 epochs
of linear warm-up then linear decay to 0 over 100 epochs (its script's second, overriding
schedule is not copied). At the end: 50 samples per class with top-k 10,000 (a tenth of the
vocabulary, the release's correct setting; its README's 100,000 gave FID 24.6 instead of 15.4).
Without --config.data.tokens the task first encodes ImageNet into <workdir>/tokens (flip).
Variant `:bf16` computes in bfloat16 with rematerialised blocks (parameters stay float32).
"""
from vqlc import config_base
from vqlc.configs import encode_imagenet
from vqlc.gen import gpt_train

IMAGENET_TRAIN_IMAGES = 1_281_167


def get_config(arg: str = ""):
    c = gpt_train.base_config()
    c.tokenizer.workdir = "runs/lc"
    c.data.encode = encode_imagenet.get_config()
    c.data.encode.encode.what = "codes"
    c.network.kind = "mingpt"
    c.network.num_layers = 24
    c.network.num_heads = 16
    c.network.width = 1024
    c.network.num_classes = 1000
    c.objective.pkeep = 0.8
    c.optim.lr = 4.5e-4
    c.optim.b1, c.optim.b2 = 0.9, 0.95
    c.optim.weight_decay = 0.01
    c.optim.decay_on = "kernels"
    c.optim.schedule = "linear"
    c.train.batch_size = 1024
    steps_per_epoch = IMAGENET_TRAIN_IMAGES // c.train.batch_size
    c.optim.warmup_steps = 5 * steps_per_epoch
    c.train.num_steps = 100 * steps_per_epoch
    c.train.log_every = 100
    c.train.checkpoint_every = 5 * steps_per_epoch
    c.eval.per_class = 50
    c.eval.batch_size = 500
    c.eval.sampler.top_k = 10_000
    return config_base.apply_named_variants(c, arg, {"bf16": _bf16})


def _bf16(c):
    c.model.dtype = "bfloat16"
    c.model.remat = "blocks"
    return c
