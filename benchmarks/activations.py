"""GELU on XLA:CPU: jax.nn.gelu (exact, via erfc; tanh approximation) against vqlc's erf form
(vqlc.models.activations.gelu_exact, torch's formula), forward and gradient, side by side.

    python benchmarks/activations.py [--elements 3145728] [--repeats 20]
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from vqlc.models import activations


def median_ms(fn, x, repeats: int) -> float:
    jax.block_until_ready(fn(x))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(x))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=8 * 256 * 1536,
                        help="default: a DiT-S MLP's hidden activations at batch 8, 256 tokens")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    x = jax.random.normal(jax.random.key(0), (args.elements,)) * 3
    fns = {"jax.nn.gelu(approximate=False) (erfc)": lambda x: jax.nn.gelu(x, approximate=False),
           "vqlc gelu_exact (erf)": activations.gelu_exact,
           "jax.nn.gelu(approximate=True) (tanh)": lambda x: jax.nn.gelu(x, approximate=True)}
    diff = float(jnp.max(jnp.abs(fns["vqlc gelu_exact (erf)"](x) - jax.nn.gelu(x, False))))
    print(f"{args.elements:,} float32 elements on {jax.devices()[0].platform}; "
          f"max |erf form - erfc form| = {diff:.2e}\n")
    print("| GELU | forward ms | gradient ms |\n|---|---:|---:|")
    for name, fn in fns.items():
        forward = median_ms(jax.jit(fn), x, args.repeats)
        grad = median_ms(jax.jit(jax.grad(lambda x, fn=fn: fn(x).sum())), x, args.repeats)
        print(f"| {name} | {forward:.2f} | {grad:.2f} |")


if __name__ == "__main__":
    main()
