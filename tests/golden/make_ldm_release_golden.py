"""Regenerate tests/golden/ldm_release_tiny.ckpt and ldm_release_tiny.npz: a tiny LDM-LC
checkpoint in the release's PyTorch Lightning layout, and the UNet's outputs for both of its
weight sets.

Run with the torch venv (torch is never a dependency of vqlc or its tests):
    /work/venv-torch/bin/python tests/golden/make_ldm_release_golden.py

The release (zh460045050/VQGAN-LC, ldm-lc/) trains latent-diffusion's LatentDiffusion
(ldm/models/diffusion/ddpm.py) with Lightning; a checkpoint is Lightning's dict
  {"epoch", "global_step", "pytorch-lightning_version", "state_dict", "callbacks",
   "optimizer_states", "lr_schedulers"}
whose state_dict (LatentDiffusion.state_dict(), read from the release's code) holds
  betas, alphas_cumprod, alphas_cumprod_prev, sqrt_alphas_cumprod,
  sqrt_one_minus_alphas_cumprod, log_one_minus_alphas_cumprod, sqrt_recip_alphas_cumprod,
  sqrt_recipm1_alphas_cumprod, posterior_variance, posterior_log_variance_clipped,
  posterior_mean_coef1, posterior_mean_coef2   DDPM.register_schedule's persistent buffers
                                               (float32 of the float64 numpy values;
                                               lvlb_weights is non-persistent, logvar a plain
                                               attribute, scale_factor a plain float when
                                               scale_by_std is False, the release's setting)
  model.diffusion_model.*                      the UNet (DiffusionWrapper.diffusion_model)
  model_ema.decay, model_ema.num_updates       LitEma's two buffers (float32, int32)
  model_ema.diffusion_model<...>               LitEma's copies of every trainable parameter of
                                               `model`, named without dots
  first_stage_model.*                          ldm/models/models_vq.py VQModelInterface:
                                               encoder, decoder, quant_conv, post_quant_conv,
                                               tok_embeddings, codebook_projection (no
                                               discriminator, no LPIPS: the tokenizer
                                               release's VQModel keys without those two)
  cond_stage_model.embedding.weight            ClassEmbedder's table [n_classes, context_dim]

The UNet and ClassEmbedder are our own PyTorch reference (make_ldm_unet_golden.py: the upstream
code does not install from PyPI); the first stage is tests/golden/release_tiny.pth's state dict
(make_release_golden.py, taming's Encoder / Decoder) without its discriminator.* and
perceptual_loss.* keys. Tiny geometry: 8x8x4 latents (release_tiny's f2, embed_dim 4 tokenizer
on 16 px images), model_channels 32, channel_mult (1,), 1 res block, attention only in the
middle block (attention_resolutions ()), 32-channel heads, context 8, 5 classes (table 6 rows).

Deviations to keep the file < 1 MB-ish, none of them a layout change: every weight is stored as
float16 (the release's are float32; vqlc widens either); the UNet weights are drawn float16-exact
so the float64 golden outputs are those of the stored weights; the first stage is release_tiny's
weights rounded to float16; optimizer_states holds a real AdamW state_dict whose `state` is cut
to its first two parameters (the converter must never read it). The EMA weights differ from
the model's (model + noise) so a converter reading the wrong set fails the parity check.

ldm_release_tiny.npz: in/x float32 [3, 4, 8, 8] NCHW; in/t int64 [3]; in/y int64 [3] (the last
the null class 5); out/ema/eps, out/model/eps float32 [3, 4, 8, 8] (forward in float64).
"""
import math
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_ldm_unet_golden as ref  # noqa: E402  (our PyTorch UNet with openaimodel's names)

OUT_CKPT = os.path.join(HERE, "ldm_release_tiny.ckpt")
OUT_NPZ = os.path.join(HERE, "ldm_release_tiny.npz")
TOKENIZER = os.path.join(HERE, "release_tiny.pth")
TINY = dict(in_channels=4, model_channels=32, channel_mult=(1,), num_res_blocks=1,
            attention_resolutions=(), num_head_channels=32, context_dim=8)
SIDE, CLASSES = 8, 5
LINEAR_START, LINEAR_END, TIMESTEPS = 0.0015, 0.0195, 1000  # the release's yaml
FIRST_STAGE_SKIPPED = ("discriminator.", "perceptual_loss.")  # not in ldm-lc's VQModel


def register_schedule(linear_start=LINEAR_START, linear_end=LINEAR_END, timesteps=TIMESTEPS,
                      v_posterior=0.0):
    """DDPM.register_schedule's persistent buffers (make_beta_schedule "linear")."""
    betas = np.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps,
                        dtype=np.float64) ** 2
    alphas = 1.0 - betas
    ac = np.cumprod(alphas, axis=0)
    ac_prev = np.append(1.0, ac[:-1])
    posterior_variance = ((1 - v_posterior) * betas * (1.0 - ac_prev) / (1.0 - ac)
                          + v_posterior * betas)
    buffers = {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": np.sqrt(ac), "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
    }
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in buffers.items()}


def randomise(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # biases, norm scales / shifts: around their usual values
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn_like(p))
            else:
                fan_in = p[0].numel() if "embedding" not in name else 1
                p.normal_(0.0, 1.0 / math.sqrt(fan_in))
            p.copy_(p.half().float())  # float16-exact


def forward(model, x, t, y):
    with torch.no_grad():
        return model.double()(torch.from_numpy(x).double(), torch.from_numpy(t),
                              torch.from_numpy(y)).float().numpy()


def main():
    torch.manual_seed(13)
    model = ref.LatentDiffusion(ref.UNetModel(**TINY),
                                ref.ClassEmbedder(TINY["context_dim"], CLASSES + 1)).eval()
    randomise(model)
    unet_sd = {k: v.clone() for k, v in model.model.state_dict().items()}  # diffusion_model.*
    # The EMA: the trained weights plus noise (float16-exact), the class table untouched
    # (LitEma tracks `model`, the DiffusionWrapper, only).
    ema = {}
    with torch.no_grad():
        for name, value in unet_sd.items():
            noisy = value + 0.1 * value.abs().mean() * torch.randn_like(value)
            ema[name] = noisy.half().float()

    rng = np.random.default_rng(13)
    x = rng.standard_normal((3, TINY["in_channels"], SIDE, SIDE)).astype(np.float32)
    t = np.array([0, 503, 999], np.int64)
    y = np.array([0, 4, CLASSES], np.int64)
    out_model = forward(model, x, t, y)
    model.model.load_state_dict(ema)
    out_ema = forward(model, x, t, y)
    model.model.load_state_dict(unet_sd)
    model = model.float()

    state_dict = dict(register_schedule())
    for name, value in unet_sd.items():
        state_dict[f"model.{name}"] = value.half()
    state_dict["model_ema.decay"] = torch.tensor(0.9999, dtype=torch.float32)
    state_dict["model_ema.num_updates"] = torch.tensor(10, dtype=torch.int32)
    for name, value in ema.items():
        state_dict["model_ema." + name.replace(".", "")] = value.half()
    first = torch.load(TOKENIZER, map_location="cpu", weights_only=True)["state_dict"]
    for name, value in first.items():
        if not name.startswith(FIRST_STAGE_SKIPPED):
            state_dict[f"first_stage_model.{name}"] = value.half()
    state_dict["cond_stage_model.embedding.weight"] = \
        model.cond_stage_model.embedding.weight.detach().half()

    # LatentDiffusion.configure_optimizers: AdamW over model + cond_stage_model (trainable).
    params = list(model.model.parameters()) + list(model.cond_stage_model.parameters())
    opt = torch.optim.AdamW(params, lr=4.5e-5)
    loss = sum(p.float().square().sum() for p in params[:2])
    loss.backward()
    opt.step()
    opt_state = opt.state_dict()
    opt_state["state"] = {k: v for k, v in opt_state["state"].items() if k < 2}

    torch.save({"epoch": 0, "global_step": 10, "pytorch-lightning_version": "1.4.2",
                "state_dict": state_dict, "callbacks": {}, "optimizer_states": [opt_state],
                "lr_schedulers": []}, OUT_CKPT)
    np.savez_compressed(OUT_NPZ, **{"in/x": x, "in/t": t, "in/y": y,
                                    "out/ema/eps": out_ema, "out/model/eps": out_model})
    print(f"wrote {OUT_CKPT} ({os.path.getsize(OUT_CKPT)} bytes, {len(state_dict)} tensors) and "
          f"{OUT_NPZ}; |out| max {np.abs(out_model).max():.3f}, "
          f"|ema - model| max {np.abs(out_ema - out_model).max():.3f}")


if __name__ == "__main__":
    main()
