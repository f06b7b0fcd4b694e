"""A codebook split along K over the mesh's `model` axis (issue 15): the search and the row
lookups give the unsplit results without gathering the codebook, and LC training on a
(data 2, model 2) mesh equals training on (data 4, model 1)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import train_steps
from vqlc import neighbors, parallel
from vqlc.configs import default as default_config


def _search(z, codes, mesh=None, **tiles):
    fn = jax.jit(lambda a, b: neighbors.nearest_code(a, b, **tiles))
    if mesh is None:
        return np.asarray(fn(z, codes))
    with jax.set_mesh(mesh):
        codes = jax.device_put(codes, parallel.codebook_sharding(mesh)) \
            if codes.shape[0] % mesh.shape["model"] == 0 else codes
        return np.asarray(fn(jax.device_put(z, parallel.batch_sharded(mesh)), codes))


@pytest.mark.parametrize("k", [96, 97, 99])  # 97, 99: K not divisible by 2 or 4 shards
def test_split_search_equals_unsplit_with_ties(k):
    rng = np.random.default_rng(k)
    codes = rng.normal(size=(k, 8)).astype(np.float32)
    codes[60] = codes[5]  # an exact tie across shards: the lower id (5) wins
    codes[k - 1] = codes[2]  # a tie with the last code, next to the padding
    z = rng.normal(size=(200, 8)).astype(np.float32)
    z[:4], z[4:8] = codes[5], codes[2]
    z[8:12] = codes[0] + 1e-3  # nearest to code 0, the code the padding copies
    expect = np.argmin(((z[:, None] - codes[None]) ** 2).sum(-1), axis=1)
    ref = _search(z, codes, tile_n=64, tile_k=16)
    np.testing.assert_array_equal(ref, expect)
    for data, model in ((2, 2), (1, 4), (4, 1)):
        out = _search(z, codes, parallel.make_mesh(data, model=model), tile_n=64, tile_k=16)
        np.testing.assert_array_equal(out, ref, err_msg=f"mesh data {data} x model {model}")
    assert (ref[:4] == 5).all() and (ref[4:8] == 2).all() and (ref[8:12] == 0).all()


def test_split_search_never_gathers_the_codebook():
    """What crosses devices is small: the codes' mean (D floats), the rows of each `model`
    group (gathered, N / data x D) and two minima per row; never the [K, D] codes."""
    mesh = parallel.make_mesh(2, model=2)
    k, n = 4096, 512
    with jax.set_mesh(mesh):
        codes = jax.device_put(np.zeros((k, 8), np.float32), parallel.codebook_sharding(mesh))
        z = jax.device_put(np.zeros((n, 8), np.float32), parallel.batch_sharded(mesh))
        hlo = jax.jit(neighbors.nearest_code).lower(z, codes).compile().as_text()
    moved = re.findall(r"= (\w+\[[\d,]*\])[^=]* (all-reduce|all-gather)\(", hlo)
    assert sorted(moved) == [("f32[256,8]", "all-gather"), ("f32[256]", "all-reduce"),
                             ("f32[8]", "all-reduce"), ("s32[256]", "all-reduce")], moved


def test_take_rows_and_its_gradient_on_a_split_table():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(64, 6)).astype(np.float32)
    ids = rng.integers(0, 64, size=(4, 3, 5))
    loss = lambda t: jnp.sum(neighbors.take_rows(t, ids) ** 3)  # noqa: E731
    want, want_grad = table[ids], jax.grad(loss)(table)
    mesh = parallel.make_mesh(2, model=2)
    with jax.set_mesh(mesh):
        t = jax.device_put(table, parallel.codebook_sharding(mesh))
        got = jax.jit(neighbors.take_rows)(t, ids)
        grad = jax.jit(jax.grad(loss))(t)
    np.testing.assert_array_equal(np.asarray(got), want)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(want_grad), rtol=1e-6)
    assert grad.sharding.spec[0] == "model"  # the gradient stays split like the table
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="divisible"):
        neighbors.take_rows(table[:63], ids)


def test_make_mesh_axes_and_errors():
    mesh = parallel.make_mesh(model=2)
    assert dict(mesh.shape) == {"data": 2, "model": 2}
    assert dict(parallel.make_mesh(3).shape) == {"data": 3, "model": 1}
    with pytest.raises(ValueError, match="mesh.model"):
        parallel.make_mesh(model=5)
    with pytest.raises(ValueError, match="available"):
        parallel.make_mesh(3, model=2)
    with pytest.raises(ValueError, match="divisible by mesh.model=4"):
        parallel.check_codebook_split(30, parallel.make_mesh(1, model=4))


def test_lc_training_split_over_model_equals_data_parallel(tmp_path):
    """Two LC steps on (data 2, model 2) vs (data 4, model 1): the same parameters and code
    counts, with each device holding half the frozen codebook."""
    from vqlc.data import make_train_iterator
    config = default_config.get_config("tiny")
    # Biases that feed a GroupNorm get gradients that are zero up to rounding noise; Adam's
    # default eps would turn that noise into lr-sized steps whose sign depends on the reduction
    # order. A larger eps keeps those at ~0, so the comparison sees the real updates.
    config.optim.eps = 1e-3
    batch = next(make_train_iterator(config.data, batch_size=8, seed=0))
    out = {}
    for data, model in ((4, 1), (2, 2)):
        mesh = parallel.make_mesh(data, model=model)
        config.mesh.model = model
        state, metrics, frozen = train_steps.run_steps(config, mesh, batch,
                                                       str(tmp_path / "w"))
        codebook = frozen["frozen"]["quantizer"]["codebook"]
        k = config.quantizer.codebook_size
        assert {s.data.shape[0] for s in codebook.addressable_shards} == {k // model}
        out[model] = (jax.device_get(state.g_params), np.asarray(state.usage),
                      float(metrics["loss"]))
    np.testing.assert_array_equal(out[2][1], out[1][1])  # code counts: exact
    assert out[1][1].sum() > 0
    assert out[2][2] == pytest.approx(out[1][2], rel=1e-5)
    for a, b in zip(jax.tree.leaves(out[1][0]), jax.tree.leaves(out[2][0])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
