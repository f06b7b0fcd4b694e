"""Regenerate tests/golden/ldm_unet_tiny.npz: a tiny latent-diffusion UNet in the state-dict
layout of the release's LDM-LC checkpoints (LatentDiffusion: `model.diffusion_model.*` and
`cond_stage_model.embedding.weight`), and its outputs. Also prints the PyTorch parameter counts
of the release's f16 and f8 UNets (built on the meta device: nothing is allocated).

Run with the torch venv (torch is never a dependency of vqlc or its tests):
    /work/venv-torch/bin/python tests/golden/make_ldm_unet_golden.py

latent-diffusion (CompVis/latent-diffusion; the release's ldm-lc/ copy of
ldm/modules/diffusionmodules/openaimodel.py and ldm/modules/attention.py is the same code) does
not install from PyPI, so the reference below is our own, written from scratch with its module
and parameter names and forward math, restricted to what the release's configs use:
UNetModel(use_spatial_transformer=True, legacy, conv_resample, no scale-shift norm, dropout 0,
num_classes None: the class enters as cross-attention context), ResBlock (in_layers GroupNorm32
/ SiLU / conv3x3, emb_layers SiLU / Linear, out_layers GroupNorm32 / SiLU / Dropout / conv3x3,
skip_connection 1x1 when channels change), SpatialTransformer (GroupNorm eps 1e-6, proj_in /
proj_out 1x1 convs, BasicTransformerBlock: attn1 self, attn2 cross, GEGLU feed-forward, three
LayerNorms), Downsample (conv3x3 stride 2), Upsample (nearest x2 + conv3x3), the time
embedding (cos then sin, model_channels wide) and ClassEmbedder ([B] -> [B, 1, D]).

Tiny geometry: 8x8x4 latents, model_channels 32, channel_mult (1, 1), 1 res block, attention
at rates 1 and 2 (every level and the middle), 16-channel heads, context 16, 6 classes (table
7 rows: the last the null class). Zero-initialised layers would make the test vacuous: every
weight is drawn at random here.

File ldm_unet_tiny.npz:
  sd/<state-dict key>      the tensors (torch layout), stored as float16: every weight is drawn
                           float16-exact, so float32(stored) is the weight the output used
  in/x float32 [3, 4, 8, 8] NCHW; in/t int64 [3]; in/y int64 [3] (the last is 6, the null
  class); out/eps float32 [3, 4, 8, 8]: forward in float64.
"""
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_NPZ = os.path.join(HERE, "ldm_unet_tiny.npz")
TINY = dict(in_channels=4, model_channels=32, channel_mult=(1, 1), num_res_blocks=1,
            attention_resolutions=(1, 2), num_head_channels=16, context_dim=16)
SIDE, CLASSES = 8, 6


def timestep_embedding(t, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class GroupNorm32(nn.GroupNorm):
    """openaimodel's: computes in float32 (here at least float32: the golden runs in float64)."""
    def forward(self, x):
        wide = x if x.dtype == torch.float64 else x.float()
        return super().forward(wide).type(x.dtype)


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class ResBlock(nn.Module):
    def __init__(self, channels, emb_channels, out_channels):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(32, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(32, out_channels), nn.SiLU(),
                                        nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    def __init__(self, query_dim, context_dim, heads, dim_head):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.scale = heads, dim_head ** -0.5
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        b, n, h = x.shape[0], x.shape[1], self.heads
        split = lambda a: a.reshape(b, a.shape[1], h, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        attn = (torch.einsum("bhid,bhjd->bhij", q, k) * self.scale).softmax(dim=-1)
        out = torch.einsum("bhij,bhjd->bhid", attn, v).transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out)


class GEGLU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0),
                                 nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, heads, dim_head, context_dim):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), \
            nn.LayerNorm(dim)

    def forward(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(self, channels, heads, dim_head, context_dim, depth=1):
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)])
        self.proj_out = nn.Conv2d(inner, channels, 1)

    def forward(self, x, context):
        b, c, h, w = x.shape
        y = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            y = block(y, context)
        y = y.transpose(1, 2).reshape(b, -1, h, w)
        return x + self.proj_out(y)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNetModel(nn.Module):
    def __init__(self, in_channels, model_channels, channel_mult, num_res_blocks,
                 attention_resolutions, num_head_channels, context_dim):
        super().__init__()
        self.model_channels = model_channels
        emb = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb), nn.SiLU(),
                                        nn.Linear(emb, emb))

        def attention(ch):
            heads = ch // num_head_channels
            return SpatialTransformer(ch, heads, ch // heads, context_dim)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(
            nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        chans, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, emb, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(ResBlock(ch, emb, ch), attention(ch),
                                                    ResBlock(ch, emb, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + chans.pop(), emb, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(32, ch), nn.SiLU(),
                                 nn.Conv2d(model_channels, in_channels, 3, padding=1))

    def forward(self, x, timesteps, context):
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        hs, h = [], x
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h)


class ClassEmbedder(nn.Module):
    def __init__(self, embed_dim, n_classes):
        super().__init__()
        self.embedding = nn.Embedding(n_classes, embed_dim)

    def forward(self, labels):
        return self.embedding(labels[:, None])


class DiffusionWrapper(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.diffusion_model = unet


class LatentDiffusion(nn.Module):
    """Only the two modules whose weights matter: model.diffusion_model, cond_stage_model."""
    def __init__(self, unet, embedder):
        super().__init__()
        self.model = DiffusionWrapper(unet)
        self.cond_stage_model = embedder

    def forward(self, x, t, y):
        return self.model.diffusion_model(x, t, self.cond_stage_model(y))


def release_counts():
    """The release's two UNets (ldm-lc/configs/imagenet-f{16,8}-vqgan-lc-100K.yaml)."""
    common = dict(model_channels=256, num_head_channels=32, context_dim=512)
    with torch.device("meta"):
        f16 = UNetModel(8, channel_mult=(1, 4), num_res_blocks=3, attention_resolutions=(4, 1),
                        **common)
        f8 = UNetModel(4, channel_mult=(1, 2, 4), num_res_blocks=2,
                       attention_resolutions=(4, 2, 1), **common)
    return {name: sum(p.numel() for p in m.parameters()) for name, m in
            (("f16", f16), ("f8", f8))}


def main():
    print("release UNet parameter counts (model.diffusion_model):", release_counts())
    torch.manual_seed(0)
    model = LatentDiffusion(UNetModel(**TINY), ClassEmbedder(TINY["context_dim"], CLASSES + 1))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # biases, norm scales / shifts: around their usual values
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn_like(p))
            else:
                fan_in = p[0].numel() if "embedding" not in name else 1
                p.normal_(0.0, 1.0 / math.sqrt(fan_in))
            p.copy_(p.half().float())  # float16-exact, so the file stores them as float16
    model = model.eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, TINY["in_channels"], SIDE, SIDE)).astype(np.float32)
    t = np.array([0, 417, 999], np.int64)
    y = np.array([0, 3, CLASSES], np.int64)
    with torch.no_grad():
        out = model.double()(torch.from_numpy(x).double(), torch.from_numpy(t),
                             torch.from_numpy(y)).float().numpy()
    arrays = {f"sd/{k}": v.half().numpy() for k, v in model.state_dict().items()}
    arrays.update({"in/x": x, "in/t": t, "in/y": y, "out/eps": out})
    np.savez_compressed(OUT_NPZ, **arrays)
    print(f"wrote {OUT_NPZ}: {len(model.state_dict())} tensors, "
          f"{sum(v.numel() for v in model.state_dict().values())} values, "
          f"|out| max {np.abs(out).max():.3f}")


if __name__ == "__main__":
    main()
