"""Regenerate tests/golden/mae_tiny.pth and mae_tiny.npz: a tiny MAE pretraining checkpoint in
the layout of MAE's released mae_pretrain_vit_base.pth, written by timm's VisionTransformer, the
outputs of MAE's fine-tuning model built on it, and PyTorch's bicubic position-embedding
interpolation of a fixed random table.

Run with the torch venv (torch and timm are never dependencies of vqlc or its tests):
    /work/venv-torch/bin/pip install timm   # once; it leaves torch as it is
    /work/venv-torch/bin/python tests/golden/make_mae_golden.py

MAE's release (facebookresearch/mae, README "pre-trained checkpoints"): `{"model": state_dict}`
of the pretraining encoder only (models_mae.MaskedAutoencoderViT without its decoder_*,
mask_token): cls_token [1, 1, D], pos_embed [1, 1 + 14*14, D] (the fixed 2-D sin-cos table,
stored), patch_embed.proj.{weight [D, 3, 16, 16], bias}, blocks.{i}.{norm1, attn.qkv, attn.proj,
norm2, mlp.fc1, mlp.fc2}.{weight, bias}, norm.{weight, bias}; no head, no fc_norm. timm's
VisionTransformer with global_pool="token" and num_classes=0 has exactly those keys (its head is
an Identity), so it writes the checkpoint here.

The reference fine-tuning model is MAE's models_vit.VisionTransformer(global_pool=True): timm's
VisionTransformer with global_pool="avg" and fc_norm (mean of the patch tokens -> fc_norm ->
head; timm's own "avg" pooling is that). main_finetune.py loads the checkpoint with
interpolate_pos_embed (reproduced below with the same F.interpolate call) and
load_state_dict(strict=False): missing head.*, fc_norm.*; the pretraining `norm.*` unused.
Its head and fc_norm are set here to deterministic random values (stored in the npz so the test
sets the same), not MAE's trunc_normal(2e-5) init, which would make the logits ~0 and the check
vacuous.

Tiny geometry: depth 2, width 48, 3 heads, MLP 192, patch 4, pretraining at 32 px (8 x 8 grid),
5 classes; fine-tuning outputs at 32 px (no interpolation) and at 40 px (10 x 10: pos_embed
interpolated 8x8 -> 10x10 as MAE does 14x14 -> 16x16). Every weight is random (LayerNorm scales
around 1), pos_embed too (MAE's is sin-cos; any table tests the mapping). Evaluated in float64.

Files:
  mae_tiny.pth   {"model": {cls_token, pos_embed [1, 65, 48], patch_embed.proj.*, blocks.{0,1}.*,
                 norm.*}}
  mae_tiny.npz   in/images32 float32 [3, 3, 32, 32] NCHW; in/images40 float32 [3, 3, 40, 40];
                 fresh/head_weight [5, 48], fresh/head_bias [5], fresh/fc_norm_weight [48],
                 fresh/fc_norm_bias [48] (torch layouts); out/logits32, out/logits40 [3, 5];
                 out/features32 [3, 48] (after fc_norm, before the head);
                 pe/table float32 [1, 197, 8] (class row + 14x14); pe/side{7,16,20}: MAE's
                 interpolate_pos_embed of it to that side [1, 1 + side*side, 8].
"""
import functools
import os

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_PTH = os.path.join(HERE, "mae_tiny.pth")
OUT_NPZ = os.path.join(HERE, "mae_tiny.npz")
DEPTH, WIDTH, HEADS, PATCH, PRETRAIN_PX, CLASSES = 2, 48, 3, 4, 32, 5


from torch_compat import import_torchvision  # noqa: E402  (tests/golden/torch_compat.py)

import_torchvision()
from timm.models.vision_transformer import VisionTransformer  # noqa: E402


def vit(img_size, **kwargs):
    return VisionTransformer(img_size=img_size, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH,
                             num_heads=HEADS, mlp_ratio=4, qkv_bias=True,
                             norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6), **kwargs)


def interpolate_pos_embed(pos_embed, new_size):
    """MAE's util/pos_embed.interpolate_pos_embed on one tensor (one extra token)."""
    extra, tokens = pos_embed[:, :1], pos_embed[:, 1:]
    orig = int(tokens.shape[1] ** 0.5)
    if orig == new_size:
        return pos_embed
    tokens = tokens.reshape(-1, orig, orig, pos_embed.shape[-1]).permute(0, 3, 1, 2)
    tokens = torch.nn.functional.interpolate(tokens, size=(new_size, new_size), mode="bicubic",
                                             align_corners=False)
    return torch.cat((extra, tokens.permute(0, 2, 3, 1).flatten(1, 2)), dim=1)


def pretrain_checkpoint():
    torch.manual_seed(0)
    encoder = vit(PRETRAIN_PX, global_pool="token", num_classes=0)
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight")) or name == "norm.weight":
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif p.ndim == 1 or name in ("cls_token", "pos_embed"):
                p.normal_(0.0, 0.3)
            else:
                fan_in = p[0].numel()
                p.normal_(0.0, 1.0 / fan_in ** 0.5)
    state_dict = encoder.state_dict()
    expected = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
                "norm.weight", "norm.bias"}
    assert expected <= set(state_dict) and all(
        k in expected or k.startswith("blocks.") for k in state_dict), sorted(state_dict)
    return state_dict


def finetune_outputs(state_dict, img_size, images, fresh):
    model = vit(img_size, global_pool="avg", fc_norm=True, num_classes=CLASSES)
    checkpoint = dict(state_dict)
    checkpoint["pos_embed"] = interpolate_pos_embed(checkpoint["pos_embed"], img_size // PATCH)
    msg = model.load_state_dict(checkpoint, strict=False)
    assert set(msg.missing_keys) == {"head.weight", "head.bias", "fc_norm.weight",
                                     "fc_norm.bias"}, msg
    assert set(msg.unexpected_keys) == {"norm.weight", "norm.bias"}, msg  # timm: norm is Identity
    with torch.no_grad():
        model.head.weight.copy_(torch.from_numpy(fresh["head_weight"]))
        model.head.bias.copy_(torch.from_numpy(fresh["head_bias"]))
        model.fc_norm.weight.copy_(torch.from_numpy(fresh["fc_norm_weight"]))
        model.fc_norm.bias.copy_(torch.from_numpy(fresh["fc_norm_bias"]))
        model = model.double().eval()
        x = torch.from_numpy(images).double()
        features = model.forward_head(model.forward_features(x), pre_logits=True)
        logits = model(x)
    return logits.float().numpy(), features.float().numpy()


def main():
    state_dict = pretrain_checkpoint()
    torch.save({"model": state_dict}, OUT_PTH)

    rng = np.random.default_rng(0)
    head = rng.standard_normal((CLASSES, WIDTH)) / WIDTH ** 0.5
    fresh = {"head_weight": head.astype(np.float32),
             "head_bias": (0.1 * rng.standard_normal(CLASSES)).astype(np.float32),
             "fc_norm_weight": (1.0 + 0.2 * rng.standard_normal(WIDTH)).astype(np.float32),
             "fc_norm_bias": (0.1 * rng.standard_normal(WIDTH)).astype(np.float32)}
    images32 = rng.standard_normal((3, 3, 32, 32)).astype(np.float32)
    images40 = rng.standard_normal((3, 3, 40, 40)).astype(np.float32)
    arrays = {"in/images32": images32, "in/images40": images40,
              **{f"fresh/{k}": v for k, v in fresh.items()}}
    arrays["out/logits32"], arrays["out/features32"] = finetune_outputs(state_dict, 32, images32,
                                                                        fresh)
    arrays["out/logits40"], _ = finetune_outputs(state_dict, 40, images40, fresh)

    table = rng.standard_normal((1, 1 + 14 * 14, 8)).astype(np.float32)
    arrays["pe/table"] = table
    for side in (7, 16, 20):
        arrays[f"pe/side{side}"] = interpolate_pos_embed(torch.from_numpy(table), side).numpy()
    np.savez(OUT_NPZ, **arrays)
    print(f"wrote {OUT_PTH} ({os.path.getsize(OUT_PTH)} bytes) and {OUT_NPZ} "
          f"({os.path.getsize(OUT_NPZ)} bytes); logit scale "
          f"{np.abs(arrays['out/logits32']).mean():.3f}")


if __name__ == "__main__":
    main()
