"""vqlc.gen.trainer's EMA of the weights: the warmed-up decay (latent-diffusion's LitEma) and
the fixed one (DiT's), applied by the shared train step."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vqlc.gen import trainer


def test_warmed_up_decay_follows_litemas_formula():
    steps = jnp.array([0, 1, 90, 9_990, 1_000_000])
    got = jax.vmap(lambda n: trainer.ema_decay_at(n, 0.999, True))(steps)
    np.testing.assert_allclose(got, [0.1, 2 / 11, 0.91, 0.999, 0.999], rtol=1e-6)
    assert float(trainer.ema_decay_at(jnp.array(0), 0.999, False)) == np.float32(0.999)


def _run(ema_warmup: bool, steps: int):
    params = {"w": jnp.zeros((3,))}
    tx = optax.sgd(0.1)

    def loss_fn(p, batch, key):
        return jnp.sum((p["w"] - 1.0) ** 2), {}
    state = trainer.fresh_state(params, tx, seed=0, ema=True)
    step = jax.jit(trainer.make_train_step(loss_fn, tx, 0.999, ema_warmup))
    for _ in range(steps):
        state, _ = step(state, {})
    return state


def test_the_train_step_applies_the_decay_of_its_step():
    one = _run(True, 1)  # w: 0 -> 0.2; EMA = 0.1 * 0 + 0.9 * 0.2
    np.testing.assert_allclose(one.params["w"], 0.2, rtol=1e-6)
    np.testing.assert_allclose(one.ema_params["w"], 0.18, rtol=1e-6)
    fixed = _run(False, 1)  # EMA = 0.999 * 0 + 0.001 * 0.2
    np.testing.assert_allclose(fixed.ema_params["w"], 2e-4, rtol=1e-4)
    # after 200 steps the weights sit at 1: the warmed-up EMA is near them, the fixed one
    # still mostly the initial zeros
    warm, cold = _run(True, 200), _run(False, 200)
    assert abs(float(warm.ema_params["w"][0]) - 1.0) < 0.1
    assert float(cold.ema_params["w"][0]) < 0.25
