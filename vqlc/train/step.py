"""One jitted training step: generator (and, after disc_start, discriminator) update.

The generator's loss is split at the reconstruction x_rec: the network's vjp is taken once,
and the cotangent fed to it is d(L1 + LPIPS)/dx_rec + lambda * d(GAN)/dx_rec, plus rate_q for
the quantisation loss. lambda (taming's adaptive weight) needs the two gradients at the
decoder's last kernel, which are cheap to get from those same cotangents.
"""
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from vqlc.eval import metrics as eval_metrics
from vqlc.models import quantizers
from vqlc.train import losses
from vqlc.train.state import TrainState


def make_train_step(model: nn.Module, disc: nn.Module, g_tx: optax.GradientTransformation,
                    d_tx: optax.GradientTransformation, loss_cfg: ml_collections.ConfigDict,
                    lpips_fn: Callable) -> Callable:
    """Returns train_step(state, batch, frozen, lpips_params) -> (state, metrics)."""
    num_codes = model.quantizer.codebook_size
    cfg = loss_cfg

    def disc_logits(d_params, batch_stats, x):
        logits, updates = disc.apply({"params": d_params, "batch_stats": batch_stats}, x,
                                     train=True, mutable=["batch_stats"])
        return logits, updates["batch_stats"]

    def train_step(state: TrainState, batch, frozen, lpips_params):
        x = batch["image"]
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        gan_on = state.step >= cfg.disc_start

        def forward(g_params):
            variables = {"params": g_params, "ema": state.ema, **frozen}
            (x_rec, q), mutated = model.apply(variables, x, train=True, rngs={"dropout": rng},
                                              mutable=["ema", "intermediates"])
            return (x_rec, q.loss), (q.indices, mutated)

        (x_rec, q_loss), model_vjp, (indices, mutated) = jax.vjp(
            forward, state.g_params, has_aux=True)

        def reconstruction_loss(x_rec):
            l1 = jnp.mean(jnp.abs(x - x_rec))
            if cfg.perceptual_weight:
                p = jnp.mean(lpips_fn(lpips_params, x, x_rec))
            else:
                p = jnp.zeros(())
            return cfg.l1_weight * l1 + cfg.perceptual_weight * p, (l1, p)

        (rec_loss, (l1, p_loss)), grad_rec = jax.value_and_grad(
            reconstruction_loss, has_aux=True)(x_rec)

        def with_gan(_):
            def g_loss_fn(x_rec):
                logits, _ = disc_logits(state.d_params, state.d_batch_stats, x_rec)
                return losses.generator_gan_loss(logits)
            g_loss, grad_gan = jax.value_and_grad(g_loss_fn)(x_rec)
            h = mutated["intermediates"]["decoder"]["conv_out_input"][0]
            kernel = state.g_params["decoder"]["conv_out"]["kernel"]
            weight = losses.adaptive_gan_weight(
                losses.conv3x3_kernel_grad(h, grad_rec, kernel),
                losses.conv3x3_kernel_grad(h, grad_gan, kernel),
                scale=cfg.disc_weight, max_weight=cfg.adaptive_weight_max) * cfg.disc_factor
            return g_loss, weight, grad_gan

        def without_gan(_):
            return jnp.zeros(()), jnp.zeros(()), jnp.zeros_like(x_rec)

        g_loss, gan_weight, grad_gan = jax.lax.cond(gan_on, with_gan, without_gan, None)
        (g_grads,) = model_vjp((grad_rec + gan_weight * grad_gan,
                                jnp.asarray(cfg.quantizer_weight, q_loss.dtype)))
        g_updates, g_opt_state = g_tx.update(g_grads, state.g_opt_state, state.g_params)
        g_params = optax.apply_updates(state.g_params, g_updates)

        def update_disc(_):
            x_fake = jax.lax.stop_gradient(x_rec)

            def d_loss_fn(d_params):
                real, stats = disc_logits(d_params, state.d_batch_stats, x)
                fake, stats = disc_logits(d_params, stats, x_fake)
                return cfg.disc_factor * losses.hinge_d_loss(real, fake), stats
            (d_loss, stats), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(state.d_params)
            updates, d_opt_state = d_tx.update(d_grads, state.d_opt_state, state.d_params)
            return d_loss, optax.apply_updates(state.d_params, updates), stats, d_opt_state

        def keep_disc(_):
            return jnp.zeros(()), state.d_params, state.d_batch_stats, state.d_opt_state

        d_loss, d_params, d_batch_stats, d_opt_state = jax.lax.cond(
            gan_on, update_disc, keep_disc, None)

        total = rec_loss + cfg.quantizer_weight * q_loss + gan_weight * g_loss
        batch_counts = quantizers.code_counts(indices, num_codes)
        finite = jnp.isfinite(total) & jnp.isfinite(d_loss)
        new_state = state.replace(
            step=state.step + 1, g_params=g_params, g_opt_state=g_opt_state, d_params=d_params,
            d_batch_stats=d_batch_stats, d_opt_state=d_opt_state,
            ema=mutated.get("ema", state.ema), usage=state.usage + batch_counts)
        # A non-finite step leaves the state untouched, so no NaN can reach a checkpoint; the
        # host sees `finite` in the metrics and stops the run.
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state,
                                 state.replace(step=state.step + 1))
        metrics = {
            "loss": total, "l1": l1, "lpips": p_loss, "q_loss": q_loss, "g_loss": g_loss,
            "d_loss": d_loss, "gan_weight": gan_weight, "finite": finite.astype(jnp.float32),
            "batch_perplexity": eval_metrics.perplexity(batch_counts),
        }
        return new_state, metrics

    return train_step
