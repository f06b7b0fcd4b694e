"""The convolution drop-in: the same outputs and gradients as lax, whichever path it takes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from vqlc.models import conv

NHWC = ("NHWC", "HWIO", "NHWC")


@pytest.mark.parametrize("size,kernel,strides,padding", [
    (2, 3, (1, 1), ((1, 1), (1, 1))),   # VGG16 block 5 at 32 px: the slow case
    (1, 3, (1, 1), ((1, 1), (1, 1))),
    (4, 4, (2, 2), ((1, 1), (1, 1))),   # PatchGAN stride-2 layer down to 2x2
    (3, 4, (1, 1), ((1, 1), (1, 1))),   # PatchGAN's last layers
    (2, 3, (1, 1), "SAME"),
    (5, 3, (2, 1), "VALID"),            # 2x3 output, unequal strides
    (2, 1, (1, 1), ((0, 0), (0, 0))),
    (3, 3, (1, 1), ((0, -1), (1, 0))),  # negative padding crops, as in lax
    (8, 3, (1, 1), ((1, 1), (1, 1))),   # large output: the library path
])
def test_matches_lax_outputs_and_gradients(size, kernel, strides, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, size, size + 1, 5)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(kernel, kernel, 5, 7)), jnp.float32)

    def outputs_and_grads(fn):
        y, vjp = jax.vjp(lambda x, w: fn(x, w, strides, padding, dimension_numbers=NHWC,
                                         precision=lax.Precision.HIGHEST), x, w)
        cotangent = jnp.asarray(np.random.default_rng(1).normal(size=y.shape), jnp.float32)
        return y, vjp(cotangent)

    want, want_grads = outputs_and_grads(lax.conv_general_dilated)
    got, got_grads = outputs_and_grads(conv.conv_general_dilated)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for g, w_ in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w_, rtol=1e-4, atol=1e-4)


def test_tiny_outputs_take_the_matrix_product_and_large_ones_the_library():
    w = jnp.zeros((3, 3, 16, 16))
    call = lambda size: jax.make_jaxpr(lambda x: conv.conv_general_dilated(  # noqa: E731
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC))(
        jnp.zeros((1, size, size, 16)))
    assert "conv_general_dilated" not in str(call(2))
    assert "conv_general_dilated" in str(call(3))


def test_flax_conv_keeps_its_parameter_names_and_values():
    import flax.linen as nn
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 2, 2, 4)), jnp.float32)
    ours = conv.Conv(6, (3, 3), padding=1)
    params = ours.init(jax.random.key(0), x)
    reference = nn.Conv(6, (3, 3), padding=1)
    assert jax.tree.structure(params) == jax.tree.structure(reference.init(jax.random.key(0), x))
    np.testing.assert_allclose(ours.apply(params, x), reference.apply(params, x),
                               rtol=1e-5, atol=1e-5)
