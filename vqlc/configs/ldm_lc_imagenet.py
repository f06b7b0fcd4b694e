"""The paper's LDM-LC (Table 4): latent-diffusion's class-conditional UNet over VQGAN-LC's
pre-quantisation latents, as the release's ldm-lc/ configures it.

    # f16 (default): 16x16x8 latents of the f16 tokenizer (imagenet_lc)
    python -m vqlc.main --config=encode_imagenet --workdir=runs/lc_latents \\
        --config.tokenizer.workdir=runs/lc --config.encode.what=latents
    python -m vqlc.main --config=ldm_lc_imagenet --workdir=runs/ldm_lc \\
        --config.tokenizer.workdir=runs/lc --config.data.tokens=runs/lc_latents
    # f8: 32x32x4 latents of the f8 tokenizer (imagenet_lc:f8)
    python -m vqlc.main --config=ldm_lc_imagenet:f8 --workdir=runs/ldm_lc_f8 \\
        --config.tokenizer.workdir=runs/lc_f8 --config.data.tokens=runs/lc_f8_latents
    # several hosts: launch/slurm.sh or launch/tpu_vm.sh with the same flags

Without --config.data.tokens the task first encodes ImageNet into <workdir>/latents (flip).

From the release (ldm-lc/configs/imagenet-f{16,8}-vqgan-lc-100K.yaml, ldm-lc/main.py,
ldm-lc/runTrainLDM.sh, ldm-lc/runTestLDM.sh, ldm-lc/run_evaluations.py,
ldm/models/diffusion/ddpm.py, the README):
  network (vqlc.gen.networks.unet): UNetModel, model_channels 256, num_head_channels 32,
    SpatialTransformer depth 1 cross-attending to a ClassEmbedder context of width 512
    (1,001 x 512 table); f16: channel_mult (1, 4), 3 res blocks, attention_resolutions
    (4, 1) (so attention at 16x16 and in the middle block; rate 4 is never reached),
    270.3M parameters + the 0.5M table; f8: channel_mult (1, 2, 4), 2 res blocks, attention
    at rates 1, 2, 4 (32, 16, 8 px), 395.0M + 0.5M (latent-diffusion's own
    cin-ldm-vq-f8.yaml UNet, unchanged).
  objective: epsilon prediction, plain MSE (l2, l_simple_weight 1, original_elbo_weight 0,
    no learned variance), 1,000 steps, betas linspace(sqrt 0.0015, sqrt 0.0195)^2
    (`linear_sqrt`); scale_factor 1 (no scale_by_std): latent_norm 'none'.
  optimiser: torch AdamW with its defaults (betas 0.9 / 0.999, eps 1e-8, weight decay
    0.01), constant learning rate, no warm-up, no clipping; EMA 0.9999 (LitEma), its decay
    warmed up as min(0.9999, (1 + n) / (10 + n)) (optim.ema_warmup, vqlc's default). The learning
    rate is main.py's scale_lr (on by default): base_learning_rate x per-GPU batch x 8 GPUs
    (runTrainLDM.sh: --gpus 0,...,7), f16 4.5e-5 x 56 x 8 = 2.016e-2 at global batch 448, f8
    1.0e-5 x 32 x 8 = 2.56e-3 at global batch 256. Both are kept as the release's files give
    them; f16's 2e-2 is very high for AdamW (its base rate looks taken from taming's VQGAN
    config, and runTrainLDM.sh names configs/imagenet-f16-ours-100K.yaml, a file the release
    does not ship): lower --config.optim.lr if the loss diverges.
  length: 100 epochs (the README: its LDM-LC checkpoints are "training for 100 epoches"; the
    yaml sets no max_steps), 1,281,167 // batch steps each: f16 2,859 x 100 = 285,900 steps,
    f8 5,004 x 100 = 500,400.
  sampling at the end: DDIM, 200 steps, eta 1, classifier-free guidance 1.6 (f16) / 1.4
    (f8) with row 1000 of the table as the unconditional context, 50 images per class
    (runTestLDM.sh: --times 2 --n_sample 25), guidance on every latent channel. (The release's
    f8 evaluation command passes --edim 8 --resolution 16, the f16 shape; f8's is 32x32x4.)
Ours, differing:
  class dropout 0.1 (network.class_dropout) trains the null class; the release never trains
    its row 1000, so its guidance extrapolates from an untrained context.
  weight decay 0.01 on every parameter of two or more dimensions (conv kernels, linears, the
    class table), not on biases and norm scales as torch's AdamW also does.
Variant `:bf16` computes in bfloat16 with rematerialised blocks (parameters stay float32).
"""
from vqlc import config_base
from vqlc.configs import encode_imagenet
from vqlc.configs.gpt_lc_imagenet import IMAGENET_TRAIN_IMAGES
from vqlc.gen import diffusion_train

RELEASE_GPUS = 8  # runTrainLDM.sh: --gpus 0,1,2,3,4,5,6,7
RELEASE_EPOCHS = 100  # the README's LDM-LC checkpoints


def get_config(arg: str = ""):
    c = diffusion_train.base_config()
    c.tokenizer.workdir = "runs/lc"
    c.data.encode = encode_imagenet.get_config()
    c.data.encode.encode.what = "latents"
    c.network.kind = "unet"
    c.network.num_classes = 1000
    c.network.class_dropout = 0.1
    c.network.learn_sigma = False
    c.objective.kind = "ddpm"
    c.objective.schedule = "linear_sqrt"
    c.objective.latent_norm = "none"
    c.optim.weight_decay = 0.01
    c.optim.decay_on = "matrices"
    c.optim.ema_decay = 0.9999
    c.eval.per_class = 50
    c.eval.sampler.kind = "ddim"
    c.eval.sampler.num_steps = 200
    c.eval.sampler.eta = 1.0
    c.eval.sampler.guided_channels = 0
    _f16(c)
    return config_base.apply_named_variants(c, arg, {"f16": _f16, "f8": _f8, "bf16": _bf16})


def _release_optim(c, base_learning_rate: float, per_gpu_batch: int):
    """LDM's main.py scale_lr: lr = base_learning_rate x GPUs x per-GPU batch; 100 epochs."""
    c.train.batch_size = RELEASE_GPUS * per_gpu_batch
    c.optim.lr = base_learning_rate * c.train.batch_size
    c.train.num_steps = RELEASE_EPOCHS * (IMAGENET_TRAIN_IMAGES // c.train.batch_size)


def _f16(c):
    c.tokenizer.workdir = "runs/lc"
    c.network.size = "f16"
    _release_optim(c, 4.5e-5, 56)
    c.eval.sampler.cfg_scale = 1.6
    c.eval.batch_size = 500
    return c


def _f8(c):
    c.tokenizer.workdir = "runs/lc_f8"
    c.network.size = "f8"
    _release_optim(c, 1.0e-5, 32)
    c.eval.sampler.cfg_scale = 1.4
    c.eval.batch_size = 250
    return c


def _bf16(c):
    c.model.dtype = "bfloat16"
    c.model.remat = "blocks"
    return c
