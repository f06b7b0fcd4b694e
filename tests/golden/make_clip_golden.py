"""Regenerate the golden files for tests/test_clip.py (CLIP tower + torch_files reader).

Run with the torch venv (never imported by vqlc or its tests):

    /work/venv-torch/bin/python tests/golden/make_clip_golden.py

Writes, under tests/golden/clip/:

* hf/                  tiny random CLIPVisionModelWithProjection, save_pretrained (safetensors)
* hf_sharded/          the same vision weights inside a tiny CLIPModel (text tower too),
                       saved in >= 2 safetensors shards + model.safetensors.index.json
* openai_tiny.pt       the same weights in OpenAI's layout (``visual.*``), torch.jit.trace'd
                       and torch.jit.save'd like OpenAI's ViT-L-14.pt
* openai_tiny_state_dict.pt   torch.save of that module's state_dict
* golden.npz           uint8 input images, their preprocessed 32x32 versions and the
                       reference patch features ``visual_projection(post_layernorm(h))[:, 1:]``
* torch_files_state.pt / torch_files_script.pt / torch_files.npz
                       torch.save / torch.jit.save files exercising dtypes and shared-storage
                       views, with the values torch itself reads back.
"""
import collections
import json
import os
import shutil
import sys

# The torch venv's torchvision is broken; hide it so transformers does not try to load it.
sys.modules["torchvision"] = None

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig
from transformers import CLIPVisionModelWithProjection

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clip")
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
SIZE = 32

VISION = dict(image_size=SIZE, patch_size=8, hidden_size=32, num_hidden_layers=2,
              num_attention_heads=2, intermediate_size=64, projection_dim=24,
              hidden_act="quick_gelu", layer_norm_eps=1e-5)


# ---------------------------------------------------------------- OpenAI layout


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """OpenAI CLIP's block: ln_1 -> MultiheadAttention -> ln_2 -> c_fc/gelu/c_proj."""

    def __init__(self, width, heads, mlp):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(collections.OrderedDict(
            [("c_fc", nn.Linear(width, mlp)), ("gelu", QuickGELU()),
             ("c_proj", nn.Linear(mlp, width))]))

    def forward(self, x):  # [L, N, D]
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, mlp):
        super().__init__()
        self.resblocks = nn.Sequential(
            *[ResidualAttentionBlock(width, heads, mlp) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class VisionTransformer(nn.Module):
    """OpenAI's VisionTransformer, returning ln_post(all patch tokens) @ proj."""

    def __init__(self, image, patch, width, layers, heads, mlp, out):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros((image // patch) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, out))

    def forward(self, x):  # NCHW normalised
        x = self.conv1(x).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1])
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.ln_pre(x).permute(1, 0, 2)
        x = self.transformer(x).permute(1, 0, 2)
        return self.ln_post(x[:, 1:]) @ self.proj


class OpenAIClip(nn.Module):
    """Holds the tower under ``visual`` so keys read ``visual.conv1.weight`` etc."""

    def __init__(self, **kw):
        super().__init__()
        self.visual = VisionTransformer(**kw)

    def forward(self, x):
        return self.visual(x)


def hf_to_openai(sd, layers):
    """HF vision keys -> OpenAI ``visual.*`` keys (fusing q/k/v)."""
    v = "vision_model."
    out = {
        "visual.conv1.weight": sd[v + "embeddings.patch_embedding.weight"],
        "visual.class_embedding": sd[v + "embeddings.class_embedding"],
        "visual.positional_embedding": sd[v + "embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": sd[v + "pre_layrnorm.weight"],
        "visual.ln_pre.bias": sd[v + "pre_layrnorm.bias"],
        "visual.ln_post.weight": sd[v + "post_layernorm.weight"],
        "visual.ln_post.bias": sd[v + "post_layernorm.bias"],
        "visual.proj": sd["visual_projection.weight"].t().contiguous(),
    }
    for i in range(layers):
        s, t = f"visual.transformer.resblocks.{i}.", f"{v}encoder.layers.{i}."
        out[s + "attn.in_proj_weight"] = torch.cat(
            [sd[f"{t}self_attn.{n}_proj.weight"] for n in "qkv"])
        out[s + "attn.in_proj_bias"] = torch.cat(
            [sd[f"{t}self_attn.{n}_proj.bias"] for n in "qkv"])
        for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                     ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                     ("mlp.c_proj", "mlp.fc2")):
            out[f"{s}{a}.weight"] = sd[f"{t}{b}.weight"]
            out[f"{s}{a}.bias"] = sd[f"{t}{b}.bias"]
    return out


# ---------------------------------------------------------------- preprocessing


def reference_preprocess(image, size):
    """torchvision Resize(size, BICUBIC) + CenterCrop(size) on a PIL image, spelled out.

    torchvision (what OpenAI's clip.load uses) resizes the short side to ``size`` and the
    long side to ``int(size * long / short)`` with PIL bicubic, then crops at
    ``round((h - size) / 2)``; written here with PIL's own crop.
    """
    img = Image.fromarray(image)
    w, h = img.size
    if min(w, h) != size:
        if w <= h:
            img = img.resize((size, int(size * h / w)), Image.BICUBIC)
        else:
            img = img.resize((int(size * w / h), size), Image.BICUBIC)
    w, h = img.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return np.asarray(img.crop((left, top, left + size, top + size)))


def make_images(rng):
    """Smooth colour gradients + noise: square 32x32 ones and two non-square ones."""
    def picture(h, w):
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        base = np.stack([np.sin(6 * xx + 1), np.cos(5 * yy), np.sin(4 * (xx + yy))], -1)
        noisy = 127.5 + 90 * base + rng.normal(0, 25, (h, w, 3))
        return np.clip(noisy, 0, 255).astype(np.uint8)

    square = np.stack([picture(SIZE, SIZE) for _ in range(3)])
    # 45x61: short side 45 -> 32, long int(32*61/45)=43, odd excess 11 -> torchvision rounds
    # the left offset to 6 (HF's CLIPImageProcessor would floor to 5).
    # 50x40: long side int(32*50/40)=40, even excess: every convention agrees.
    return square, picture(45, 61), picture(50, 40)


def normalise(images_uint8):
    x = torch.from_numpy(images_uint8).float() / 255.0
    x = (x - torch.tensor(MEAN)) / torch.tensor(STD)
    return x.permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------- torch_files goldens


class HParams:
    """Stands in for an arbitrary class in a training checkpoint (e.g. Lightning hparams)."""

    def __init__(self):
        self.lr = 1e-4
        self.name = "tiny"


class Scripted(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.block = nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4))
        self.half_param = nn.Parameter(torch.randn(5).half())
        self.register_buffer("steps", torch.arange(4, dtype=torch.int64))

    def forward(self, x):
        return self.lin(x) * 2.0


def make_torch_files_goldens():
    torch.manual_seed(1)
    base = torch.randn(4, 6)
    state = collections.OrderedDict(
        f32=torch.randn(3, 5),
        f16=torch.randn(2, 3).half(),
        bf16=torch.randn(7).bfloat16(),
        f64=torch.randn(2, 2).double(),
        i64=torch.arange(-3, 9, dtype=torch.int64).reshape(3, 4),
        i32=torch.tensor([1, -2, 3], dtype=torch.int32),
        u8=torch.tensor([0, 7, 255], dtype=torch.uint8),
        flag=torch.tensor([True, False, True]),
        scalar=torch.tensor(3.5),
        empty=torch.zeros(0, 3),
        param=nn.Parameter(torch.randn(2, 3)),
        # Views of one storage: transpose, 2-D slice with an offset, flat offset slice.
        view_t=base.t(),
        view_slice=base[1:, 2:5],
        view_flat=base.view(-1)[5:11],
        base=base,
    )
    state["nested"] = {"inner": {"w": torch.ones(2, 2) * 4}}
    ckpt = {"state_dict": state, "epoch": 3, "hparams": HParams(), "note": "golden"}
    torch.save(ckpt, os.path.join(OUT, "torch_files_state.pt"))

    # What torch itself reads back, bf16 widened to float32.
    back = torch.load(os.path.join(OUT, "torch_files_state.pt"), weights_only=False)
    expected = {}
    for k, v in back["state_dict"].items():
        if isinstance(v, dict):
            expected["nested.inner.w"] = v["inner"]["w"].numpy()
            continue
        v = v.detach()
        expected[k] = (v.float() if v.dtype == torch.bfloat16 else v).numpy()
    assert back["state_dict"]["view_t"].untyped_storage().data_ptr() == \
        back["state_dict"]["base"].untyped_storage().data_ptr(), "views should share storage"

    module = torch.jit.script(Scripted().eval())
    torch.jit.save(module, os.path.join(OUT, "torch_files_script.pt"))
    for k, v in module.state_dict().items():
        expected["script." + k] = v.detach().numpy()
    np.savez(os.path.join(OUT, "torch_files.npz"), **expected)


# ---------------------------------------------------------------- main


def main():
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)

    vcfg = CLIPVisionConfig(**VISION)
    model = CLIPVisionModelWithProjection(vcfg).eval()
    # HF's init leaves layernorms at (1, 0) and tiny weights: randomise everything so
    # every parameter (and any transpose mistake) shows in the output.
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.3 if "norm" in name or "layrnorm" in name else 0.15
            offset = 1.0 if name.endswith("norm1.weight") or name.endswith("norm2.weight") \
                or name.endswith("layernorm.weight") or name.endswith("layrnorm.weight") else 0.0
            p.copy_(offset + scale * torch.randn_like(p))

    square, wide, tall = make_images(rng)
    pre_wide = reference_preprocess(wide, SIZE)
    pre_tall = reference_preprocess(tall, SIZE)
    batch = np.concatenate([square, pre_wide[None], pre_tall[None]])
    pixels = normalise(batch)

    with torch.no_grad():
        h = model(pixel_values=pixels).last_hidden_state
        feats = model.visual_projection(model.vision_model.post_layernorm(h))[:, 1:]
    feats = feats.numpy().astype(np.float32)

    # HF, unsharded (CLIPVisionConfig config.json).
    model.save_pretrained(os.path.join(OUT, "hf"))

    # HF, sharded, inside a full CLIPModel (CLIPConfig with vision_config + text keys).
    tcfg = CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                          num_hidden_layers=1, num_attention_heads=2,
                          max_position_embeddings=8, projection_dim=24)
    full = CLIPModel(CLIPConfig(text_config=tcfg.to_dict(), vision_config=vcfg.to_dict(),
                                projection_dim=VISION["projection_dim"])).eval()
    missing, unexpected = full.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected, unexpected
    assert all(k.startswith(("text_", "logit_")) for k in missing), missing
    with torch.no_grad():
        h2 = full.vision_model(pixel_values=pixels).last_hidden_state
        f2 = full.visual_projection(full.vision_model.post_layernorm(h2))[:, 1:]
    np.testing.assert_allclose(f2.numpy(), feats, atol=1e-6)
    full.save_pretrained(os.path.join(OUT, "hf_sharded"), max_shard_size="40KB")
    shards = [f for f in os.listdir(os.path.join(OUT, "hf_sharded")) if f.endswith(".safetensors")]
    assert len(shards) >= 2, shards

    # OpenAI layout: same weights, checked against HF, then TorchScript + state_dict.
    openai = OpenAIClip(image=SIZE, patch=VISION["patch_size"], width=VISION["hidden_size"],
                        layers=VISION["num_hidden_layers"], heads=VISION["num_attention_heads"],
                        mlp=VISION["intermediate_size"], out=VISION["projection_dim"]).eval()
    openai_sd = hf_to_openai(model.state_dict(), VISION["num_hidden_layers"])
    openai.load_state_dict(openai_sd, strict=True)
    with torch.no_grad():
        f3 = openai(pixels).numpy()
    np.testing.assert_allclose(f3, feats, atol=1e-5)
    traced = torch.jit.trace(openai, pixels[:1])
    torch.jit.save(traced, os.path.join(OUT, "openai_tiny.pt"))
    with torch.no_grad():
        f4 = torch.jit.load(os.path.join(OUT, "openai_tiny.pt"))(pixels).numpy()
    np.testing.assert_allclose(f4, feats, atol=1e-5)
    torch.save(openai.state_dict(), os.path.join(OUT, "openai_tiny_state_dict.pt"))

    np.savez_compressed(
        os.path.join(OUT, "golden.npz"), square=square, wide=wide, tall=tall,
        pre_wide=pre_wide, pre_tall=pre_tall, batch=batch, features=feats,
        vision_config=json.dumps(VISION))

    make_torch_files_goldens()

    total = 0
    for root, _, files in os.walk(OUT):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    print(f"wrote {OUT}: {total / 1024:.0f} KiB; features {feats.shape}, "
          f"max |HF - OpenAI layout| = {np.abs(f3 - feats).max():.2e}")


if __name__ == "__main__":
    main()
