"""Convolutions with tiny outputs: `lax.conv_general_dilated` against vqlc's drop-in
(`vqlc/models/conv.py`, im2col for outputs at most 2 pixels across), side by side in one run.

    python benchmarks/small_conv.py [--repeats 5] [--batch 16]

Rows: single convolutions (forward, and forward + gradient with respect to input and kernel)
at the shapes of VGG16's blocks 4-5 and a PatchGAN's last layers on small images; then LPIPS
(VGG16) on 16 x 16 and 32 x 32 images, forward and gradient with respect to the input, with the
library convolution swapped back in for the comparison. Times are the best of --repeats calls
after a compile; the last column is library time / vqlc time.
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from vqlc.models import conv

NHWC = ("NHWC", "HWIO", "NHWC")


def best_time(fn, args, repeats):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def conv_rows(batch, repeats):
    shapes = [  # (side, channels in, channels out, kernel, stride, padding)
        (2, 512, 512, 3, 1, 1),   # VGG16 block 4 at 16 px / block 5 at 32 px
        (1, 512, 512, 3, 1, 1),   # VGG16 block 5 at 16 px
        (4, 256, 512, 4, 2, 1),   # PatchGAN stride-2 layer down to 2 x 2
        (3, 512, 1, 4, 1, 1),     # PatchGAN output layer
        (8, 256, 256, 3, 1, 1),   # a larger map: both take the library path
    ]
    rng = np.random.default_rng(0)
    for side, cin, cout, k, s, p in shapes:
        x = jnp.asarray(rng.normal(size=(batch, side, side, cin)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(k, k, cin, cout)), jnp.float32)
        for mode in ("forward", "forward+grad"):
            times = []
            for fn in (lax.conv_general_dilated, conv.conv_general_dilated):
                def f(x, w, fn=fn):
                    return fn(x, w, (s, s), ((p, p), (p, p)), dimension_numbers=NHWC)
                if mode == "forward+grad":
                    f = jax.grad(lambda x, w, f=f: jnp.sum(f(x, w) ** 2), argnums=(0, 1))
                times.append(best_time(jax.jit(f), (x, w), repeats))
            yield (f"conv {side}x{side}x{cin} -> {cout}, {k}x{k}/{s}", mode, *times)


def lpips_rows(batch, repeats):
    from vqlc.models import lpips as lpips_lib
    params = lpips_lib.load_vgg16_lpips_params()
    rng = np.random.default_rng(1)
    for side in (16, 32):
        x = jnp.asarray(rng.uniform(-1, 1, (batch, side, side, 3)), jnp.float32)
        y = jnp.asarray(rng.uniform(-1, 1, (batch, side, side, 3)), jnp.float32)
        for mode in ("forward", "grad wrt x"):
            times = []
            for use_library in (True, False):
                def f(x, y, use_library=use_library):  # y an argument: no constant folding
                    original = conv.MAX_OUTPUT_SIDE
                    conv.MAX_OUTPUT_SIDE = 0 if use_library else original  # read at trace time
                    try:
                        return jnp.mean(lpips_lib.lpips(x, y, params=params))
                    finally:
                        conv.MAX_OUTPUT_SIDE = original
                fn = jax.jit(f if mode == "forward" else jax.grad(f))
                times.append(best_time(fn, (x, y), repeats))
            yield (f"LPIPS-VGG16, {batch} images of {side} px", mode, *times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, batch {args.batch}")
    print("| what | pass | lax (ms) | vqlc (ms) | lax / vqlc |\n|---|---|---:|---:|---:|")
    for rows in (conv_rows, lpips_rows):
        for what, mode, library, ours in rows(args.batch, args.repeats):
            print(f"| {what} | {mode} | {library * 1e3:.1f} | {ours * 1e3:.1f} | "
                  f"{library / ours:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
