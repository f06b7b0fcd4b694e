"""Activations shared by the networks.

`gelu_exact` is torch's exact GELU, x * 0.5 * (1 + erf(x / sqrt(2))), written that way on
purpose: jax.nn.gelu(approximate=False) computes the same function through erfc, which XLA:CPU
evaluates several times slower than erf (benchmarks/activations.py), and the two differ by at
most about 1e-6 in float32.
"""
import jax
import jax.numpy as jnp
import numpy as np


def gelu_exact(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x)
    half_sqrt2 = np.sqrt(0.5).astype(x.dtype)
    return x * (0.5 * (1.0 + jax.lax.erf(x * half_sqrt2))).astype(x.dtype)


def gelu(x: jax.Array, approximate: bool) -> jax.Array:
    """GELU: the tanh approximation (DiT's) or the exact erf form (torch's nn.GELU())."""
    return jax.nn.gelu(x, approximate=True) if approximate else gelu_exact(x)
