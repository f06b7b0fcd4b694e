"""Loss terms of the release (taming's VQLPIPSWithDiscriminator, hinge variant)."""
import jax
import jax.numpy as jnp


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def generator_gan_loss(logits_fake: jax.Array) -> jax.Array:
    return -jnp.mean(logits_fake)


def conv3x3_kernel_grad(h: jax.Array, cotangent: jax.Array, kernel: jax.Array) -> jax.Array:
    """d<conv(h, W), cotangent>/dW for a stride-1, padding-1 3x3 conv (the decoder's conv_out).

    taming's adaptive GAN weight compares gradient norms at that kernel; computing them from
    the output cotangents costs one small transposed conv instead of two more backward passes.
    """
    def conv(w):
        return jax.lax.conv_general_dilated(
            h, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.vjp(conv, kernel)[1](cotangent)[0]


def adaptive_gan_weight(grad_rec: jax.Array, grad_gan: jax.Array, *, scale: float,
                        max_weight: float) -> jax.Array:
    """taming: clamp(|grad rec| / (|grad gan| + 1e-4), 0, max) * disc_weight, no gradient."""
    w = jnp.linalg.norm(grad_rec) / (jnp.linalg.norm(grad_gan) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(w, 0.0, max_weight) * scale)

