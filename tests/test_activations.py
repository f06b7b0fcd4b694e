"""vqlc.models.activations.gelu_exact is torch's exact GELU (the erf form) and equals
jax.nn.gelu(approximate=False) in value and gradient."""
import math

import jax
import jax.numpy as jnp
import numpy as np

from vqlc.models import activations


def test_gelu_exact_is_the_erf_form_and_matches_jax():
    x = np.linspace(-12.0, 12.0, 4001, dtype=np.float32)
    want = np.array([v * 0.5 * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x.astype(np.float64)])
    got = np.asarray(activations.gelu_exact(jnp.asarray(x)))
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-6)
    np.testing.assert_allclose(got, np.asarray(jax.nn.gelu(x, approximate=False)), atol=2e-6)
    grad = jax.vmap(jax.grad(activations.gelu_exact))(jnp.asarray(x))
    ref = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(grad), np.asarray(ref), atol=2e-6)


def test_gelu_keeps_bfloat16_and_picks_the_approximation():
    x = jnp.linspace(-3.0, 3.0, 7, dtype=jnp.bfloat16)
    assert activations.gelu_exact(x).dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(activations.gelu(x, True)),
                                  np.asarray(jax.nn.gelu(x, approximate=True)))
