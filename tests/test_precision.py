"""config.model.dtype (compute dtype) and config.model.remat on the tokenizer.

bfloat16 compute: parameters and optimiser states stay float32, and a train step's loss stays
within BF16_LOSS_RTOL of float32's on the tiny config. Measured (tiny config, LC with a random
codebook, demo photos, batch 8, the full loss with LPIPS, 3 steps x seeds 0-2, CPU): the largest
relative difference of the per-step losses was 0.44% (median 0.19%); the tolerance, 1.5%, is
that with a margin of more than 3x. remat="blocks" recomputes activations: same loss and
gradients as "none" up to float32 round-off.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqlc.configs import default as default_config
from vqlc import config_io, parallel
from vqlc.data import make_train_iterator
from vqlc.models import build
from vqlc.models import lpips as lpips_lib
from vqlc.train import optim, trainer
from vqlc.train.state import init_train_state
from vqlc.train.step import make_train_step

BF16_LOSS_RTOL = 1.5e-2
STEPS = 2


def tiny(dtype="float32", remat="none"):
    c = default_config.get_config("tiny")
    c.model.dtype, c.model.remat = dtype, remat
    return c


def setup(config):
    """Model, state and frozen variables on one device, with a random LC codebook (no k-means)."""
    model = build.tokenizer_from_config(config)
    disc = build.discriminator_from_config(config)
    g_tx = optim.make_optimizer(config.optim, config.train.num_steps)
    d_tx = optim.make_optimizer(config.optim, config.train.num_steps)
    state, frozen = init_train_state(model, disc, g_tx, d_tx, image_size=config.data.image_size,
                                     seed=config.seed, mesh=parallel.make_mesh(1))
    codes = np.random.default_rng(0).standard_normal(
        (config.quantizer.codebook_size, config.codebook.feature_dim)).astype(np.float32)
    codes = jnp.asarray(codes / np.sqrt(config.codebook.feature_dim))
    frozen = {"frozen": jax.tree.map(lambda _: codes, frozen["frozen"])}
    return model, disc, g_tx, d_tx, state, frozen


def batches(config, n):
    it = make_train_iterator(config.data, batch_size=config.train.batch_size, seed=0)
    return [next(it) for _ in range(n)]


@pytest.fixture(scope="module")
def runs():
    """STEPS train steps of the tiny config in float32 and in bfloat16 on the same batches."""
    lpips_params = lpips_lib.load_vgg16_lpips_params()
    data = batches(tiny(), STEPS)
    out = {}
    for dtype in ("float32", "bfloat16"):
        model, disc, g_tx, d_tx, state, frozen = setup(tiny(dtype))
        step = jax.jit(make_train_step(model, disc, g_tx, d_tx, tiny().loss,
                                       lambda p, x, y: lpips_lib.lpips(x, y, params=p)))
        losses = []
        for batch in data:
            state, metrics = step(state, batch, frozen, lpips_params)
            losses.append(float(metrics["loss"]))
        out[dtype] = (state, losses)
    return out


def test_bfloat16_keeps_parameters_and_optimiser_state_float32(runs):
    state, losses = runs["bfloat16"]
    assert all(np.isfinite(losses))
    for tree in (state.g_params, state.g_opt_state, state.d_params):
        dtypes = {leaf.dtype for leaf in jax.tree.leaves(tree) if jnp.issubdtype(
            leaf.dtype, jnp.floating)}
        assert dtypes == {jnp.dtype(jnp.float32)}, dtypes


def test_bfloat16_loss_is_close_to_float32(runs):
    f32, bf16 = runs["float32"][1], runs["bfloat16"][1]
    np.testing.assert_allclose(bf16, f32, rtol=BF16_LOSS_RTOL)
    assert bf16 != f32  # bfloat16 really computed something differently


def test_bfloat16_compute_is_bfloat16_inside_and_float32_outside():
    model, _, _, _, state, frozen = setup(tiny("bfloat16"))
    variables = {"params": state.g_params, "ema": state.ema, **frozen}
    x = jnp.zeros((2, 16, 16, 3), jnp.float32)
    jaxpr = str(jax.make_jaxpr(lambda v: model.apply(v, x))(variables))
    assert "bf16" in jaxpr  # the convolutions run in bfloat16
    x_rec, q = model.apply(variables, x)
    z = model.apply(variables, x, method=type(model).encode)
    # The image, the latent the quantizer searches with, and its loss leave in float32.
    assert x_rec.dtype == z.dtype == q.loss.dtype == jnp.float32


def test_remat_blocks_gives_the_same_loss_and_gradients():
    x = jnp.asarray(batches(tiny(), 1)[0]["image"])
    results = {}
    for remat in ("none", "blocks"):
        model, _, _, _, state, frozen = setup(tiny(remat=remat))

        def loss_fn(params):
            variables = {"params": params, "ema": state.ema, **frozen}
            (x_rec, q), _ = model.apply(variables, x, train=True, mutable=["ema", "intermediates"])
            return jnp.mean(jnp.abs(x - x_rec)) + 0.1 * q.loss

        results[remat] = jax.jit(jax.value_and_grad(loss_fn))(state.g_params)
    (loss_a, grads_a), (loss_b, grads_b) = results["none"], results["blocks"]
    assert jax.tree.structure(grads_a) == jax.tree.structure(grads_b)  # same parameter names
    np.testing.assert_allclose(float(loss_b), float(loss_a), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("field,value,message", [
    ("dtype", "float16", "config.model.dtype='float16' is not a compute dtype vqlc supports; "
                         "use one of: float32, bfloat16"),
    ("remat", "all", "config.model.remat='all'; use one of: none, blocks"),
])
def test_invalid_values_fail_before_anything_is_written(tmp_path, field, value, message):
    config = tiny()
    config.model[field] = value
    with pytest.raises(ValueError, match=re.escape(message)):
        build.tokenizer_from_config(config)
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=re.escape(message)):
        trainer.train_and_evaluate(config, str(workdir))
    assert not workdir.exists()


def test_a_run_may_resume_with_another_dtype_or_remat(tmp_path):
    config_io.write_or_check(tiny(), str(tmp_path))
    config_io.check_compatible(tiny("bfloat16", "blocks"), str(tmp_path))  # no error
    other = tiny("bfloat16")
    other.model.ch = 64
    with pytest.raises(ValueError, match=r"different config \(model differ"):
        config_io.check_compatible(other, str(tmp_path))
