"""The paper's DiT-LC (Table 4): DiT-XL/2 over VQGAN-LC's 16x16x8 pre-quantisation latents of
ImageNet (the f16 tokenizer, imagenet_lc), as the release's dit-lc/ trains and samples it.

    python -m vqlc.main --config=encode_imagenet --workdir=runs/lc_latents \\
        --config.tokenizer.workdir=runs/lc --config.encode.what=latents
    python -m vqlc.main --config=dit_lc_imagenet --workdir=runs/dit_lc \\
        --config.tokenizer.workdir=runs/lc --config.data.tokens=runs/lc_latents
    # several hosts: launch/slurm.sh or launch/tpu_vm.sh with the same flags
    # or the release's weights (dit-lc-100K-f16.pth), over the release's converted tokenizer:
    python -m vqlc.convert --config=imagenet_lc --src=vqgan-lc-100K-f16-dim8.pth \\
        --dst=runs/lc_release
    python -m vqlc.convert --config=dit_lc_imagenet --src=dit-lc-100K-f16.pth \\
        --dst=runs/dit_lc_release --tokenizer=runs/lc_release [--weights=ema|model]

Without --config.data.tokens the task first encodes ImageNet into <workdir>/latents (flip).

From the release (dit-lc/train.py, runTrainDiT.sh, evaluation.py, runTestDiT.sh, README) and
DiT (its models.py and train.py, which the release copies):
  network: DiT-XL/2 (28 blocks, width 1152, 16 heads, patch 2) over 16x16x8 latents, 1,000
    classes + the null class (class dropout 0.1, DiT's), learned sigma (2 x 8 outputs):
    674,963,776 parameters as DiT counts them (its frozen pos_embed included; 674,890,048
    without it, ours).
  objective: DDPM, 1,000 linear-beta steps, epsilon prediction with DiT's hybrid loss (learned
    variance); raw latents (no scaling: latent_norm 'none').
  optimiser: AdamW lr 1e-4 constant, no weight decay, no warm-up, no clipping; global batch
    256; EMA 0.9999; 400K steps (the README's "trained for 400K iterations"; train.py itself
    runs --epochs, default 1,400, until stopped).
  sampling at the end: DDPM respaced to 250 steps, classifier-free guidance scale 8
    (runTestDiT.sh --cfg-scale 8; DiT's own paper uses 1.5 and DiT's sample.py 4), 50
    images per class (--num_sample 50), from the EMA weights (download.find_model); the
    sampled latents are snapped to the nearest code and decoded (the release's
    VQModel.decode quantises first), as vqlc's sample task does.
Ours, differing:
  guidance on every latent channel (eval.sampler.guided_channels 0). The release's
    forward_with_cfg guides only the first 3 channels, a leftover of upstream DiT's 4-channel
    SD latents that leaves 5 of LC's 8 channels unguided;
    --config.eval.sampler.guided_channels=3 reproduces the release's bug (and its numbers).
  FID against vqlc's reference statistics (vqlc.gen.evaluation); the release's
    evaluation.py scores with clean-fid against custom statistics it names "imagenet_train".
Variant `:bf16` computes in bfloat16 with rematerialised blocks (parameters stay float32).
"""
from vqlc import config_base
from vqlc.configs import encode_imagenet
from vqlc.gen import diffusion_train


def get_config(arg: str = ""):
    c = diffusion_train.base_config()
    c.tokenizer.workdir = "runs/lc"
    c.data.encode = encode_imagenet.get_config()
    c.data.encode.encode.what = "latents"
    c.network.kind = "dit"
    c.network.size = "XL/2"
    c.network.num_classes = 1000
    c.network.class_dropout = 0.1
    c.network.learn_sigma = True
    c.objective.kind = "ddpm"
    c.objective.schedule = "linear"
    c.objective.latent_norm = "none"
    c.optim.lr = 1e-4
    c.optim.weight_decay = 0.0
    c.optim.warmup_steps = 0
    c.optim.schedule = "constant"
    c.optim.ema_decay = 0.9999
    c.optim.ema_warmup = False  # DiT's EMA: the fixed decay from the first step
    c.train.batch_size = 256
    c.train.num_steps = 400_000
    c.train.checkpoint_every = 10_000
    c.eval.per_class = 50
    c.eval.batch_size = 500
    c.eval.sampler.kind = "ddpm"
    c.eval.sampler.num_steps = 250
    c.eval.sampler.cfg_scale = 8.0
    c.eval.sampler.guided_channels = 0
    c.eval.sampler.use_ema = True
    return config_base.apply_named_variants(c, arg, {"bf16": bf16})


def bf16(c):
    c.model.dtype = "bfloat16"
    c.model.remat = "blocks"
    return c
