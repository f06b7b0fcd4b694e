"""The paper's SiT-LC (Table 4): SiT-XL/2 (DiT-XL/2's network with SiT's flow-matching
objective) over VQGAN-LC's 16x16x8 pre-quantisation latents of ImageNet (the f16 tokenizer,
imagenet_lc), as the release's sit-lc/ trains and samples it.

    python -m vqlc.main --config=encode_imagenet --workdir=runs/lc_latents \\
        --config.tokenizer.workdir=runs/lc --config.encode.what=latents
    python -m vqlc.main --config=sit_lc_imagenet --workdir=runs/sit_lc \\
        --config.tokenizer.workdir=runs/lc --config.data.tokens=runs/lc_latents
    # several hosts: launch/slurm.sh or launch/tpu_vm.sh with the same flags
    # or the release's weights (sit-lc-100K-f16.pth), over the release's converted tokenizer:
    python -m vqlc.convert --config=imagenet_lc --src=vqgan-lc-100K-f16-dim8.pth \\
        --dst=runs/lc_release
    python -m vqlc.convert --config=sit_lc_imagenet --src=sit-lc-100K-f16.pth \\
        --dst=runs/sit_lc_release --tokenizer=runs/lc_release [--weights=ema|model]

Without --config.data.tokens the task first encodes ImageNet into <workdir>/latents (flip).

From the release (sit-lc/train.py, train_utils.py, transport/, evaluation.py, runTestSiT.sh,
README) and SiT (its models.py, which the release copies):
  network: as DiT-LC's (vqlc/configs/dit_lc_imagenet.py): SiT-XL/2 over 16x16x8 latents, 1,000
    classes + null (class dropout 0.1), 675.0M parameters. The model is built with SiT's
    default learn_sigma=True, so the checkpoint's final layer has 2 x 8 outputs; SiT's forward
    drops the second half and returns the velocity, as our flow objective reads out[..., :8]
    (network.learn_sigma True keeps the converted head; the sigma half gets no gradient).
  objective: SiT's defaults: linear interpolant x_t = t x1 + (1 - t) x0 with t = 1 the data
    (path-type Linear), velocity prediction, no loss weight, t uniform in [0, 1] (train-eps 0
    for velocity); the network sees t in [0, 1] itself (not 1000 t); raw latents.
  optimiser: AdamW lr 1e-4 constant, no weight decay; global batch 256; EMA 0.9999; 400K steps
    (the README's "trained for 400K iterations").
  sampling at the end: the ODE with dopri5, atol 1e-6, rtol 1e-3 (train_utils.parse_ode_args;
    runTestSiT.sh's --num-sampling-steps 250 only sets the output time grid of the adaptive
    solver), classifier-free guidance scale 8 (runTestSiT.sh --cfg-scale 8; SiT's paper uses
    1.5), 50 images per class (evaluation.py's n_sample), from the EMA weights; latents
    snapped to the nearest code and decoded (VQModel.decode quantises first), as ours.
Ours, differing:
  guidance on every latent channel (eval.sampler.guided_channels 0). The release's
    forward_with_cfg (copied from DiT) guides only the first 3 of the 8 velocity channels;
    --config.eval.sampler.guided_channels=3 reproduces the release's bug (and its numbers).
  FID against vqlc's reference statistics (vqlc.gen.evaluation); the release's
    evaluation.py scores with clean-fid against its --data-path, the ImageNet train folder.
Variant `:bf16` computes in bfloat16 with rematerialised blocks (parameters stay float32).
"""
from vqlc import config_base
from vqlc.configs import dit_lc_imagenet


def get_config(arg: str = ""):
    c = dit_lc_imagenet.get_config()
    c.network.kind = "sit"
    c.objective.kind = "flow"
    c.objective.interpolant = "linear"
    c.objective.prediction = "velocity"
    c.eval.sampler.kind = "dopri5"
    c.eval.sampler.num_steps = 0
    c.eval.sampler.atol = 1e-6
    c.eval.sampler.rtol = 1e-3
    c.eval.sampler.cfg_scale = 8.0
    c.eval.sampler.guided_channels = 0
    return config_base.apply_named_variants(c, arg, {"bf16": dit_lc_imagenet.bf16})
