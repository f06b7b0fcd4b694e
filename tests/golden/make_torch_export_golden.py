"""Regenerate tests/golden/torch_export_tiny.npz: taming-transformers' PyTorch modules loaded
from tests/golden/torch_export_tiny.safetensors, their outputs and their real key lists.

First write the .safetensors with vqlc (jax side), then run this with the torch venv (torch is
never a dependency of vqlc or its tests):
    .venv/bin/python -m tests.test_torch_export
    /work/venv-torch/bin/python tests/golden/make_torch_export_golden.py

Uses the taming-transformers-rom1504 package (installed --no-deps; the module file imported here
needs only torch and numpy) and safetensors. When `taming.models.vqgan` imports too (it needs
pytorch-lightning 1.x, omegaconf, einops, torchvision), the whole file is also loaded into a
real VQModel (lossconfig torch.nn.Identity, as `python -m vqlc.torch_export` prints) and its
encode/decode is checked against the module-by-module result; otherwise that check is skipped.

The file is loaded with load_state_dict(strict=True) into taming's Encoder and Decoder (the
ddconfig in its metadata), quant_conv = Conv2d(z_channels, embed_dim, 1), post_quant_conv =
Conv2d(embed_dim, z_channels, 1) and quantize.embedding = nn.Embedding(n_embed, embed_dim) (the
table of taming's VectorQuantizer); a key none of them takes is an error. Then, in float64:
latents = quant_conv(encoder(x)), the nearest row of quantize.embedding.weight (squared L2,
argmin), decoded = decoder(post_quant_conv(those rows)).

Contents (image-like arrays NHWC):
  - images uint8 [2, 16, 16, 3] and x, their float32 [-1, 1] form (vqlc's to_float);
  - latents float32 [2, 8, 8, embed_dim], indices int32 [2, 8, 8], decoded float32 [2, 16, 16, 3];
  - gaps float32 [2, 8, 8]: second-nearest minus nearest squared distance of each token;
  - keys/<name>, shapes/<name> (string arrays, shapes as "32,3,3,3") and config/<name> (JSON:
    ddconfig, n_embed, embed_dim): the state_dict keys of those modules, prefixed as in
    taming's VQModel, for "tiny" (the file's own geometry) and the geometries of vqlc's shipped
    configs ("demo": configs/default.py; "imagenet_f16", "imagenet_f8": configs/imagenet_lc.py
    and its :f8 variant), built on the meta device (no weights);
  - safetensors_sha256: the digest of the .safetensors file these outputs belong to;
  - vqmodel_checked: whether the VQModel check ran.
"""
import contextlib
import hashlib
import io
import json
import os

import numpy as np
import safetensors
import torch

from taming.modules.diffusionmodules.model import Decoder, Encoder

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "torch_export_tiny.safetensors")
OUT = os.path.join(HERE, "torch_export_tiny.npz")
COMMON = dict(double_z=False, in_channels=3, out_ch=3, dropout=0.0)
# Geometries of vqlc's shipped configs (the test checks these against the configs themselves).
SHIPPED = {
    "demo": dict(COMMON, ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[],
                 resolution=32, z_channels=64, n_embed=512, embed_dim=8),
    "imagenet_f16": dict(COMMON, ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2,
                         attn_resolutions=[16], resolution=256, z_channels=256,
                         n_embed=100_000, embed_dim=8),
    "imagenet_f8": dict(COMMON, ch=128, ch_mult=[1, 2, 2, 4], num_res_blocks=2,
                        attn_resolutions=[], resolution=256, z_channels=256, n_embed=100_000,
                        embed_dim=4),
}


def build(ddconfig: dict, n_embed: int, embed_dim: int) -> dict:
    """VQModel's parts by their state_dict prefix."""
    with contextlib.redirect_stdout(io.StringIO()):  # taming's Decoder prints the z shape
        encoder, decoder = Encoder(**ddconfig), Decoder(**ddconfig)
    z = ddconfig["z_channels"]
    return {"encoder.": encoder, "decoder.": decoder,
            "quant_conv.": torch.nn.Conv2d(z, embed_dim, 1),
            "post_quant_conv.": torch.nn.Conv2d(embed_dim, z, 1),
            # taming's VectorQuantizer holds its table as `self.embedding`.
            "quantize.": torch.nn.ModuleDict({"embedding": torch.nn.Embedding(n_embed, embed_dim)})}


def key_list(parts: dict) -> tuple:
    keys, shapes = [], []
    for prefix, module in parts.items():
        for key, tensor in module.state_dict().items():
            keys.append(prefix + key)
            shapes.append(",".join(str(d) for d in tensor.shape))
    return np.array(keys), np.array(shapes)


def load_strictly(parts: dict, state_dict: dict):
    """Each part takes exactly its keys (strict); a key no part takes is an error."""
    taken = set()
    for prefix, module in parts.items():
        own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        module.load_state_dict(own, strict=True)
        taken |= {prefix + k for k in own}
    left = sorted(set(state_dict) - taken)
    if left:
        raise KeyError(f"keys no taming module takes: {left}")


def nchw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).permute(0, 3, 1, 2).double()


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).numpy()


def quantize(latents: torch.Tensor, table: torch.Tensor):
    """(indices [B,h,w], their rows NCHW, gap to the second-nearest code) by squared L2."""
    z = latents.permute(0, 2, 3, 1)
    d = ((z[..., None, :] - table) ** 2).sum(-1)
    best = d.topk(2, dim=-1, largest=False).values
    indices = d.argmin(-1)
    return indices, table[indices].permute(0, 3, 1, 2), best[..., 1] - best[..., 0]


def check_vqmodel(ddconfig, n_embed, embed_dim, state_dict, x, indices, decoded) -> bool:
    """The whole file in taming's real VQModel, as the export command tells users to load it."""
    try:
        from taming.models.vqgan import VQModel
    except ImportError as e:
        print(f"VQModel check skipped: {e}")
        return False
    with contextlib.redirect_stdout(io.StringIO()):
        model = VQModel(ddconfig, {"target": "torch.nn.Identity"}, n_embed, embed_dim)
    model.load_state_dict(state_dict, strict=True)
    model.double().eval()
    with torch.no_grad():
        quant, _, (_, _, idx) = model.encode(x)
        out = model.decode(quant)
    assert torch.equal(idx.reshape(indices.shape), indices), "VQModel picks other codes"
    assert torch.allclose(out, decoded, atol=1e-10), "VQModel decodes differently"
    print("VQModel check passed: the file loads strictly and reconstructs the same")
    return True


def main():
    with open(SRC, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    with safetensors.safe_open(SRC, "pt") as f:
        meta = f.metadata()
        state_dict = {k: f.get_tensor(k) for k in f.keys()}
    ddconfig = json.loads(meta["ddconfig"])
    n_embed, embed_dim = int(meta["n_embed"]), int(meta["embed_dim"])
    parts = build(ddconfig, n_embed, embed_dim)
    load_strictly(parts, state_dict)

    arrays = {"safetensors_sha256": np.array(digest)}
    configs = {"tiny": dict(ddconfig, n_embed=n_embed, embed_dim=embed_dim), **SHIPPED}
    for name, cfg in configs.items():
        cfg = dict(cfg)
        n, d = cfg.pop("n_embed"), cfg.pop("embed_dim")
        with torch.device("meta"):
            arrays[f"keys/{name}"], arrays[f"shapes/{name}"] = key_list(build(cfg, n, d))
        arrays[f"config/{name}"] = np.array(json.dumps(
            {"ddconfig": cfg, "n_embed": n, "embed_dim": d}))

    size = ddconfig["resolution"]
    images = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    x = np.multiply(images, np.float32(1.0 / 127.5), dtype=np.float32)  # vqlc's to_float
    x -= np.float32(1.0)
    for module in parts.values():
        module.double().eval()
    with torch.no_grad():
        latents = parts["quant_conv."](parts["encoder."](nchw(x)))
        indices, rows, gaps = quantize(latents, parts["quantize."]["embedding"].weight)
        decoded = parts["decoder."](parts["post_quant_conv."](rows))
    arrays.update(images=images, x=x, latents=nhwc(latents).astype(np.float32),
                  indices=indices.numpy().astype(np.int32), gaps=gaps.numpy().astype(np.float32),
                  decoded=nhwc(decoded).astype(np.float32))
    arrays["vqmodel_checked"] = np.array(check_vqmodel(
        ddconfig, n_embed, embed_dim, state_dict, nchw(x), indices, decoded))

    np.savez_compressed(OUT, **arrays)
    print(f"{len(np.unique(arrays['indices']))} distinct codes of {n_embed}; smallest gap "
          f"{arrays['gaps'].min():.3g}; max |latents| {np.abs(arrays['latents']).max():.3g}, "
          f"max |decoded| {np.abs(arrays['decoded']).max():.3g}")
    print(f"wrote {OUT}: {os.path.getsize(OUT) / 1e6:.3f} MB, {len(arrays)} arrays")


if __name__ == "__main__":
    main()
