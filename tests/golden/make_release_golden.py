"""Regenerate tests/golden/release_tiny.pth and release_tiny.npz: a tiny VQGAN-LC release checkpoint.

Also writes release_tiny_codebook.pth: the codebook alone as a bare torch.save'd tensor, the
format of the release's codebook-100K.pth.

Run with the torch venv (torch is never a dependency of vqlc or its tests):
    /work/venv-torch/bin/python tests/golden/make_release_golden.py

The authors' VQGAN-LC release (zh460045050/VQGAN-LC, vqgan-gpt-lc/models/models_vq.py) saves
`torch.save({'state_dict': VQModel.state_dict(), ...})` where VQModel has the attributes
  encoder, decoder              taming-transformers Encoder/Decoder (double_z False)
  quant_conv, post_quant_conv   1x1 convs z_channels <-> embed_dim
  tok_embeddings                nn.Embedding [K, feature_dim]: the frozen codebook (requires_grad False)
  codebook_projection           nn.Linear(feature_dim, embed_dim) (use_cblinear=1)
  discriminator                 taming NLayerDiscriminator(input_nc=3, n_layers=2, ndf=64)
  perceptual_loss               LPIPS (VGG16 + linear heads)
This script builds that module tree at a tiny size with random weights (taming's Encoder, Decoder
and NLayerDiscriminator from taming-transformers-rom1504, which the release's own copies match key
for key), so its state_dict keys are the release's. `perceptual_loss` is a placeholder with a few
LPIPS-named buffers (the converter skips that prefix; vqlc loads its own LPIPS weights).

Geometry (the test converts with matching --config overrides): ch 32, ch_mult (1,1),
num_res_blocks 1, attn_resolutions (8,), resolution 16, z_channels 32, embed_dim 4, K 64 codes of
feature_dim 16, discriminator ndf 8. f2: 16 px images -> 8x8 tokens.

The reference forward is the release's quantize(): squared L2 from z to every projected code
codebook_projection(tok_embeddings.weight), argmin, then post_quant_conv -> decoder; computed in
float64 from the float32 weights in the file. The codebook is rescaled so the projected codes sit at
the encoder latents' scale (many distinct codes are used), and the smallest gap between a token's
best and second-best squared distance is recorded, so a float32 search provably agrees.

release_tiny.npz holds: in/images uint8 [2,16,16,3]; out/indices int32 [2,8,8]; out/recon float32
[2,16,16,3] (quantised reconstruction); out/decode_code (decode of out/indices); out/latents (z
before quantisation); out/disc_eval (discriminator, eval mode, on the images); min_gap.
"""
import contextlib
import io
import os

import numpy as np
import torch

from taming.modules.diffusionmodules.model import Decoder, Encoder
from taming.modules.discriminator.model import NLayerDiscriminator, weights_init

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_PTH = os.path.join(HERE, "release_tiny.pth")
OUT_NPZ = os.path.join(HERE, "release_tiny.npz")
OUT_CODEBOOK = os.path.join(HERE, "release_tiny_codebook.pth")  # like codebook-100K.pth
CFG = dict(ch=32, out_ch=3, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0,
           in_channels=3, resolution=16, z_channels=32, double_z=False)
EMBED_DIM = 4
NUM_CODES = 64
FEATURE_DIM = 16
DISC_NDF = 8


class PerceptualPlaceholder(torch.nn.Module):
    """A few buffers under LPIPS' key names (scaling_layer.shift/scale, lin0.model.1.weight)."""

    def __init__(self):
        super().__init__()
        self.scaling_layer = torch.nn.Module()
        self.scaling_layer.register_buffer(
            "shift", torch.tensor([-.030, -.088, -.188])[None, :, None, None])
        self.scaling_layer.register_buffer(
            "scale", torch.tensor([.458, .448, .450])[None, :, None, None])
        self.lin0 = torch.nn.Module()
        self.lin0.model = torch.nn.Sequential(torch.nn.Dropout(),
                                              torch.nn.Conv2d(64, 1, 1, bias=False))


class ReleaseVQModel(torch.nn.Module):
    """The release's VQModel attribute tree (LC setting: tuning_codebook 0, use_cblinear 1)."""

    def __init__(self):
        super().__init__()
        with contextlib.redirect_stdout(io.StringIO()):  # taming's Decoder prints the z shape
            self.encoder = Encoder(**CFG)
            self.decoder = Decoder(**CFG)
        self.discriminator = NLayerDiscriminator(input_nc=3, n_layers=2, use_actnorm=False,
                                                 ndf=DISC_NDF).apply(weights_init)
        self.perceptual_loss = PerceptualPlaceholder()
        self.tok_embeddings = torch.nn.Embedding(NUM_CODES, FEATURE_DIM)
        self.tok_embeddings.weight.requires_grad = False
        self.quant_conv = torch.nn.Conv2d(CFG["z_channels"], EMBED_DIM, 1)
        self.post_quant_conv = torch.nn.Conv2d(EMBED_DIM, CFG["z_channels"], 1)
        self.codebook_projection = torch.nn.Linear(FEATURE_DIM, EMBED_DIM)
        torch.nn.init.normal_(self.codebook_projection.weight, std=EMBED_DIM ** -0.5)

    def codes(self):
        return self.codebook_projection(self.tok_embeddings.weight)

    def encode(self, x):
        return self.quant_conv(self.encoder(x))

    def quantize(self, z):
        """z [B, C, h, w] -> (indices [B, h, w], sorted distances [B*h*w, 2])."""
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        e = self.codes()
        d = (flat ** 2).sum(1, keepdim=True) + (e ** 2).sum(1)[None] - 2 * flat @ e.T
        return d.argmin(1).reshape(b, h, w), d.sort(1).values[:, :2]

    def decode_code(self, indices):
        zq = self.codes()[indices].permute(0, 3, 1, 2)
        return self.decoder(self.post_quant_conv(zq))


def randomise_norms(module: torch.nn.Module, gen: torch.Generator, fan_in_convs: bool):
    for m in module.modules():
        if fan_in_convs and isinstance(m, torch.nn.Conv2d):
            # fan-in scaled kernels give the discriminator's BatchNorms O(1) inputs
            m.weight.data = torch.randn(m.weight.shape, generator=gen) / m.weight[0].numel() ** 0.5
        if isinstance(m, (torch.nn.GroupNorm, torch.nn.BatchNorm2d)):
            m.weight.data = 1.0 + 0.2 * torch.randn(m.weight.shape, generator=gen)
            m.bias.data = 0.2 * torch.randn(m.bias.shape, generator=gen)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.data = 0.3 * torch.randn(m.running_mean.shape, generator=gen)
            m.running_var.data = 0.5 + torch.rand(m.running_var.shape, generator=gen)


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).numpy().astype(np.float32)


def main():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = ReleaseVQModel()
    randomise_norms(model.encoder, gen, False)
    randomise_norms(model.decoder, gen, False)
    randomise_norms(model.discriminator, gen, True)
    model.tok_embeddings.weight.data = torch.randn((NUM_CODES, FEATURE_DIM), generator=gen)

    images = (torch.rand((2, 16, 16, 3), generator=gen) * 255).round().to(torch.uint8)
    x64 = images.permute(0, 3, 1, 2).double() / 127.5 - 1.0
    with torch.no_grad():
        # Rescale the codebook so the projected codes spread over the latents' range.
        model.double()
        z = model.encode(x64)
        e = model.codes()
        z_std, e_std = float(z.std()), float(e.std())
        model.tok_embeddings.weight.data *= z_std / e_std
        shift = z.mean((0, 2, 3)) - model.codes().mean(0)  # centre the codes on the latents
        model.codebook_projection.bias.data += shift
        model.float()

    sd = model.state_dict()
    torch.save({"state_dict": sd, "epoch": 0}, OUT_PTH)
    torch.save(sd["tok_embeddings.weight"].clone(), OUT_CODEBOOK)  # a bare tensor, as released

    # Reference outputs in float64 from the float32 weights just saved.
    model.double().eval()
    with torch.no_grad():
        z = model.encode(x64)
        indices, best2 = model.quantize(z)
        rec = model.decode_code(indices)
        disc = model.discriminator(x64)
    gaps = (best2[:, 1] - best2[:, 0]).numpy()
    arrays = {
        "in/images": images.numpy(),
        "out/latents": nhwc(z),
        "out/indices": indices.numpy().astype(np.int32),
        "out/recon": nhwc(rec),
        "out/decode_code": nhwc(rec),
        "out/disc_eval": nhwc(disc),
        "min_gap": np.float64(gaps.min()),
    }
    np.savez_compressed(OUT_NPZ, **arrays)
    n_distinct = len(np.unique(arrays["out/indices"]))
    print(f"{len(sd)} state_dict keys, e.g. {list(sd)[:3]} ... {list(sd)[-4:]}")
    print(f"distinct codes used: {n_distinct} of {NUM_CODES} ({arrays['out/indices'].size} tokens);"
          f" smallest best/second-best distance gap {gaps.min():.3g} (latent std {z.std():.3g})")
    print(f"wrote {OUT_PTH}: {os.path.getsize(OUT_PTH) / 1e6:.3f} MB; "
          f"{OUT_NPZ}: {os.path.getsize(OUT_NPZ) / 1e6:.3f} MB")


if __name__ == "__main__":
    main()
