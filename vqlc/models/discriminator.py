"""taming-transformers' NLayerDiscriminator (PatchGAN) in Flax Linen, NHWC.

Layers are named after their index in taming's `self.main` nn.Sequential (`main.N` -> `main_N`), so
`vqlc.models.taming_names.torch_to_flax` converts its state_dict directly. For n_layers=2:
main_0 conv 3->ndf k4 s2 (+bias), lrelu; main_2 conv ndf->2ndf k4 s2 (no bias), main_3 BN, lrelu;
main_5 conv 2ndf->4ndf k4 s1 (no bias), main_6 BN, lrelu; main_8 conv 4ndf->1 k4 s1 (+bias).
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqlc.models.conv import Conv


def _torch_bias_init(fan_in: int):
    """torch's default Conv2d bias init, uniform(+-1/sqrt(fan_in)); taming's weights_init keeps it."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _normal_around_one(stddev: float):
    """BatchNorm scale init normal(1, stddev), as taming's weights_init."""

    def init(key, shape, dtype=jnp.float32):
        return 1.0 + stddev * jax.random.normal(key, shape, dtype)

    return init


class NLayerDiscriminator(nn.Module):
    """PatchGAN: image [B,H,W,C] -> patch logits [B,H',W',1] (256 px gives 62x62 with n_layers=2).

    Convs are 4x4 with padding 1: the first n_layers halve the resolution, the last two keep stride 1
    (so each shrinks the map by one pixel). BatchNorm uses batch statistics when `train` and running
    averages otherwise; momentum 0.9 is torch's 0.1. One difference from torch: torch updates
    running_var with the unbiased batch variance (n/(n-1) larger), Flax with the biased one; at
    training sizes (n = B*H*W in the thousands) the gap is below 0.1%.
    """
    ndf: int = 64
    n_layers: int = 2

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        index = 0

        def conv_layer(h, features, stride, use_bias):
            nonlocal index
            fan_in = h.shape[-1] * 16
            out = Conv(features, (4, 4), strides=(stride, stride), padding=1, use_bias=use_bias,
                       kernel_init=nn.initializers.normal(0.02),
                       bias_init=_torch_bias_init(fan_in), name=f"main_{index}")(h)
            index += 1
            return out

        def batch_norm(h):
            nonlocal index
            out = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                               use_fast_variance=False, scale_init=_normal_around_one(0.02),
                               bias_init=nn.initializers.zeros, name=f"main_{index}")(h)
            index += 1
            return out

        def leaky_relu(h):
            nonlocal index
            index += 1  # LeakyReLU has no parameters but takes a slot in taming's Sequential
            return nn.leaky_relu(h, 0.2)

        h = leaky_relu(conv_layer(x, self.ndf, 2, use_bias=True))
        mult = 1
        for n in range(1, self.n_layers):
            mult = min(2 ** n, 8)
            h = leaky_relu(batch_norm(conv_layer(h, self.ndf * mult, 2, use_bias=False)))
        mult = min(2 ** self.n_layers, 8)
        h = leaky_relu(batch_norm(conv_layer(h, self.ndf * mult, 1, use_bias=False)))
        return conv_layer(h, 1, 1, use_bias=True)
