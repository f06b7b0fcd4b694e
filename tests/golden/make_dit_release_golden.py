"""Regenerate tests/golden/dit_release_tiny.pt and dit_release_tiny.npz: a tiny DiT-LC / SiT-LC
release checkpoint in the layout the authors' train.py saves, and the outputs of both its
weight sets.

Run with the torch venv (torch is never a dependency of vqlc or its tests):
    /work/venv-torch/bin/python tests/golden/make_dit_release_golden.py

The release (zh460045050/VQGAN-LC, dit-lc/train.py, sit-lc/train.py) saves
`torch.save({"model": state_dict, "ema": state_dict, "opt": AdamW.state_dict(), "args":
argparse.Namespace})` with the modules of DiT's models.py (facebookresearch/DiT; SiT's
models.py is the same network whose forward drops the learned-sigma half). Upstream DiT is not
a package (nothing to pip install), so the reference below is our own, written from scratch
with DiT's module and parameter names and forward math: the patch conv (kernel = stride = p),
a fixed 2-D sin-cos `pos_embed` buffer (a non-trainable Parameter, so in the state_dict), the
TimestepEmbedder (256 cos/sin frequencies -> Linear -> SiLU -> Linear), the LabelEmbedder
(table num_classes + 1 rows: the null class, since class dropout > 0), adaLN-Zero blocks (fused
qkv attention with bias, GELU(tanh) MLP, affine-free LayerNorms eps 1e-6), the final layer and
unpatchify (N, T, p*p*C) -> (N, C, H, W) as (h, w, p, q, c) -> (c, h p, w q).

Tiny geometry: depth 2, width 32, 4 heads, patch 2, latents 8x8x8 (the f2 tiny tokenizer of
tests/tiny_tokenizer.py on 16 px images), 10 classes, learn_sigma (2C = 16 outputs). adaLN-Zero
initialises the modulation and output layers at zero, which would make the network the zero
map and the test vacuous: every weight is drawn at random here instead. `ema` is a different
random draw from `model`; `opt` holds AdamW's state for `model` (moments of zeros would be
smaller to store but AdamW really keeps them; they are tiny at this size).

Files:
  dit_release_tiny.pt    {"model", "ema", "opt", "args": argparse.Namespace(model="DiT-XL/2"-
                         style name "DiT-Tiny/2", num_classes=10, ...)}
  dit_release_tiny.npz   in/x float32 [3, 8, 8, 8] NCHW; in/t_ddpm float32 [3] (0..999);
                         in/t_flow float32 [3] in [0, 1]; in/y int64 [3] (the last is 10, the
                         null class); out/{ema,model}/{ddpm,flow} float32 [3, 16, 8, 8]: the
                         full 2C output at t_ddpm and at t_flow (SiT's forward returns
                         [:, :8] of the latter).
"""
import argparse
import math
import os

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_PT = os.path.join(HERE, "dit_release_tiny.pt")
OUT_NPZ = os.path.join(HERE, "dit_release_tiny.npz")
DEPTH, WIDTH, HEADS, PATCH, SIDE, CHANNELS, CLASSES = 2, 32, 4, 2, 8, 8, 10


def sincos_1d(dim, positions):
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim, grid):
    """DiT's table: the first half of the channels encodes the column, the second the row."""
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    return np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)


class PatchEmbed(nn.Module):  # timm's, as DiT uses it: x_embedder.proj
    def __init__(self, patch, channels, width):
        super().__init__()
        self.proj = nn.Conv2d(channels, width, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D), tokens row-major


class TimestepEmbedder(nn.Module):
    def __init__(self, width, frequencies=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequencies, width), nn.SiLU(), nn.Linear(width, width))
        self.frequencies = frequencies

    def forward(self, t):
        half = self.frequencies // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None].to(t.device)
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(
            self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes, width, dropout_prob=0.1):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), width)

    def forward(self, labels):
        return self.embedding_table(labels)


class Attention(nn.Module):  # timm's: fused qkv, heads split as (3, heads, head_dim)
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    def __init__(self, width, heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp,
                                                             scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, width, patch, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, input_size, patch, channels, width, depth, heads, num_classes,
                 learn_sigma=True):
        super().__init__()
        self.patch = patch
        self.out_channels = 2 * channels if learn_sigma else channels
        self.x_embedder = PatchEmbed(patch, channels, width)
        self.t_embedder = TimestepEmbedder(width)
        self.y_embedder = LabelEmbedder(num_classes, width)
        grid = input_size // patch
        self.pos_embed = nn.Parameter(
            torch.from_numpy(sincos_2d(width, grid)).float().unsqueeze(0), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(width, heads) for _ in range(depth)])
        self.final_layer = FinalLayer(width, patch, self.out_channels)

    def unpatchify(self, x):
        n, t, _ = x.shape
        h = w = int(t ** 0.5)
        p, c = self.patch, self.out_channels
        x = x.reshape(n, h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(n, c, h * p, w * p)

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))


def randomised(seed):
    torch.manual_seed(seed)
    model = DiT(SIDE, PATCH, CHANNELS, WIDTH, DEPTH, HEADS, CLASSES)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "pos_embed":
                continue
            fan_in = p.shape[1] * (p[0][0].numel() if p.ndim == 4 else 1) if p.ndim > 1 else WIDTH
            p.normal_(0.0, 1.0 / math.sqrt(fan_in))  # non-zero, and outputs of order 1
    return model.eval()


def outputs(model, x, t, y):
    with torch.no_grad():
        return model.double()(torch.as_tensor(x).double(), torch.as_tensor(t).double(),
                              torch.as_tensor(y)).float().numpy()


def main():
    model, ema = randomised(0), randomised(1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    loss = model(torch.randn(2, CHANNELS, SIDE, SIDE), torch.tensor([3.0, 500.0]),
                 torch.tensor([1, 2])).square().mean()
    loss.backward()
    opt.step()  # a real optimiser state, as the release's checkpoints hold
    opt.zero_grad()
    args = argparse.Namespace(model="DiT-Tiny/2", num_classes=CLASSES, image_size=16,
                              latent_size=SIDE, embed_dim=CHANNELS, global_batch_size=256,
                              results_dir="train_logs/dit_lc_tiny", start_epoch=3,
                              data_path="/data/imagenet/train")
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                "args": args}, OUT_PT)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, CHANNELS, SIDE, SIDE)).astype(np.float32)
    t_ddpm = np.array([0.0, 417.0, 999.0], np.float32)
    t_flow = np.array([0.0, 0.37, 1.0], np.float32)
    y = np.array([0, 7, CLASSES], np.int64)  # the last: the null class
    arrays = {"in/x": x, "in/t_ddpm": t_ddpm, "in/t_flow": t_flow, "in/y": y}
    for name, net in (("model", model), ("ema", ema)):
        arrays[f"out/{name}/ddpm"] = outputs(net, x, t_ddpm, y)
        arrays[f"out/{name}/flow"] = outputs(net, x, t_flow, y)
    np.savez(OUT_NPZ, **arrays)
    print(f"wrote {OUT_PT} ({os.path.getsize(OUT_PT)} bytes) and {OUT_NPZ}; output scale "
          f"{np.abs(arrays['out/ema/ddpm']).mean():.3f}")


if __name__ == "__main__":
    main()
