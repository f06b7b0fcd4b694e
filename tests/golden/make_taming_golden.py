"""Regenerate tests/golden/taming_tiny.npz: tiny taming-transformers networks and their outputs.

Run with the torch venv (torch is never a dependency of vqlc or its tests):
    /work/venv-torch/bin/python tests/golden/make_taming_golden.py

Uses the taming-transformers-rom1504 package (installed --no-deps; the two module files imported
here need only torch and numpy, so pytorch-lightning is not required).

Contents (all image-like arrays NHWC, float32):
  - state_dicts of a tiny Encoder/Decoder (ch 32, ch_mult (1,2), num_res_blocks 1,
    attn_resolutions (8,), resolution 16, z_channels 8), quant_conv (8->4) / post_quant_conv (4->8)
    1x1 convs, and an NLayerDiscriminator(input_nc=3, ndf=8, n_layers=2);
  - inputs and the reference outputs.
To keep the file small (< 1 MB) every float tensor is put on an 8-bit grid: value = q * 2**e with
int8 q, stored as `sd/<net>/<key>/q` (int8) and `sd/<net>/<key>/e` (exponent). Such values are exact
in float32, so the test feeds Flax exactly the weights torch used. Integer buffers
(num_batches_tracked) are stored as `sd/<net>/<key>/raw`. Norm affines and BatchNorm running stats are
randomised so that the comparison exercises them, and the discriminator's conv kernels are drawn
with fan-in scale so its BatchNorms see O(1) batch variances. Reference outputs are computed in float64.
"""
import contextlib
import io
import os

import numpy as np
import torch

from taming.modules.diffusionmodules.model import Decoder, Encoder
from taming.modules.discriminator.model import NLayerDiscriminator, weights_init

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "taming_tiny.npz")
CFG = dict(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0,
           in_channels=3, resolution=16, z_channels=8, double_z=False)
EMBED_DIM = 4


def to_grid(t: torch.Tensor):
    """Round a float tensor onto q * 2**e with int8 q; returns (q, e) and writes the values back."""
    m = float(t.abs().max())
    e = int(np.ceil(np.log2(m / 127.0))) if m > 0 else 0
    q = torch.clamp(torch.round(t / 2.0 ** e), -127, 127)
    t.copy_(q * 2.0 ** e)
    return q.to(torch.int8).numpy(), e


def randomise_norms(module: torch.nn.Module, gen: torch.Generator):
    for m in module.modules():
        if isinstance(m, torch.nn.Conv2d) and isinstance(module, NLayerDiscriminator):
            # weights_init's std 0.02 leaves tiny activations; fan-in scaling gives BatchNorm O(1)
            # batch variances, so torch's unbiased running_var update differs visibly from Flax's.
            fan_in = m.weight[0].numel()
            m.weight.data = torch.randn(m.weight.shape, generator=gen) / fan_in ** 0.5
        if isinstance(m, (torch.nn.GroupNorm, torch.nn.BatchNorm2d)):
            m.weight.data = 1.0 + 0.2 * torch.randn(m.weight.shape, generator=gen)
            m.bias.data = 0.2 * torch.randn(m.bias.shape, generator=gen)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.data = 0.3 * torch.randn(m.running_mean.shape, generator=gen)
            m.running_var.data = 0.5 + torch.rand(m.running_var.shape, generator=gen)


def store(arrays: dict, net: str, module: torch.nn.Module):
    with torch.no_grad():
        for key, t in module.state_dict().items():
            if t.is_floating_point():
                q, e = to_grid(t)
                arrays[f"sd/{net}/{key}/q"] = q
                arrays[f"sd/{net}/{key}/e"] = np.int32(e)
            else:
                arrays[f"sd/{net}/{key}/raw"] = t.numpy()


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).numpy()


def nchw64(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).permute(0, 3, 1, 2).double()


def main():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    with contextlib.redirect_stdout(io.StringIO()):  # taming's Decoder prints the z shape
        enc, dec = Encoder(**CFG), Decoder(**CFG)
    quant_conv = torch.nn.Conv2d(CFG["z_channels"], EMBED_DIM, 1)
    post_quant_conv = torch.nn.Conv2d(EMBED_DIM, CFG["z_channels"], 1)
    disc = NLayerDiscriminator(input_nc=3, ndf=8, n_layers=2).apply(weights_init)
    for m in (enc, dec, disc):
        randomise_norms(m, gen)

    arrays = {}
    for net, m in (("encoder", enc), ("decoder", dec), ("quant_conv", quant_conv),
                   ("post_quant_conv", post_quant_conv), ("disc", disc)):
        store(arrays, net, m)  # rounds the weights in place, so the outputs below use the stored ones

    x = torch.rand((2, 16, 16, 3), generator=gen) * 2 - 1
    z = torch.randn((2, 8, 8, CFG["z_channels"]), generator=gen)
    zq = torch.randn((2, 8, 8, EMBED_DIM), generator=gen)
    xd = torch.rand((4, 32, 32, 3), generator=gen) * 2 - 1
    for name, t in (("x", x), ("z", z), ("zq", zq), ("x_disc", xd)):
        arrays[f"in/{name}"] = t.numpy().astype(np.float32)

    for m in (enc, dec, quant_conv, post_quant_conv, disc):
        m.double()
    with torch.no_grad():
        enc.eval(), dec.eval(), disc.eval()
        h = enc(nchw64(arrays["in/x"]))
        arrays["out/encoder"] = nhwc(h).astype(np.float32)
        arrays["out/encode"] = nhwc(quant_conv(h)).astype(np.float32)
        arrays["out/decoder"] = nhwc(dec(nchw64(arrays["in/z"]))).astype(np.float32)
        arrays["out/decode"] = nhwc(dec(post_quant_conv(nchw64(arrays["in/zq"])))).astype(np.float32)
        arrays["out/disc_eval"] = nhwc(disc(nchw64(arrays["in/x_disc"]))).astype(np.float32)
        # Train mode: batch statistics in the forward pass, running stats updated (momentum 0.1).
        disc.train()
        arrays["out/disc_train"] = nhwc(disc(nchw64(arrays["in/x_disc"]))).astype(np.float32)
        for idx in (3, 6):
            bn = disc.main[idx]
            arrays[f"out/disc_train_running_mean/{idx}"] = bn.running_mean.numpy().astype(np.float32)
            arrays[f"out/disc_train_running_var/{idx}"] = bn.running_var.numpy().astype(np.float32)

    np.savez_compressed(OUT, **arrays)
    for k in sorted(k for k in arrays if k.startswith("out/")):
        print(f"{k}: shape {arrays[k].shape}, max |.| {np.abs(arrays[k]).max():.3g}")
    print(f"wrote {OUT}: {os.path.getsize(OUT) / 1e6:.3f} MB, {len(arrays)} arrays")


if __name__ == "__main__":
    main()
