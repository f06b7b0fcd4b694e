"""vqlc.neighbors: k-th nearest distances, k-NN radii and precision/recall vs numpy brute force.

(nearest_code and nth_nearest_codes, which also live in vqlc.neighbors, are tested through their
re-exports in tests/test_quantizers.py and tests/test_figures.py.)
"""
import jax
import numpy as np
import pytest

from vqlc import neighbors as nb
from vqlc import parallel


def _sq(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def _brute_pr(real, fake, k=3):
    """The ADM evaluator's formulas, written out in float64 on full matrices."""
    d_rr, d_ff, d_rf = _sq(real, real), _sq(fake, fake), _sq(real, fake)
    r_real = np.sort(d_rr, axis=1)[:, k]  # self at index 0
    r_fake = np.sort(d_ff, axis=1)[:, k]
    precision = np.mean(np.any(d_rf <= r_real[:, None], axis=0))
    recall = np.mean(np.any(d_rf <= r_fake[None, :], axis=1))
    return r_real, r_fake, precision, recall


def test_module_imports_no_other_vqlc_module():
    import ast
    import inspect
    tree = ast.parse(inspect.getsource(nb))
    names = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    names += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in names if m.startswith("vqlc")], names


def test_old_locations_reexport():
    from vqlc.eval import analysis
    from vqlc.models import quantizers
    assert quantizers.nearest_code is nb.nearest_code
    assert quantizers.nearest_code_in_place is nb.nearest_code_in_place
    assert analysis.nth_nearest_codes is nb.nth_nearest_codes
    assert analysis.MAX_RANK == nb.MAX_RANK


@pytest.mark.parametrize("n,m,k,tiles", [(37, 53, 1, (8, 16)), (37, 53, 3, (8, 16)),
                                         (100, 20, 20, (32, 7)), (5, 300, 4, (None, None))])
def test_kth_nearest_distances_brute_force(n, m, k, tiles):
    rng = np.random.default_rng(n + m + k)
    x = rng.normal(size=(n, 6)).astype(np.float32) + 5.0  # off-centre: centring matters
    refs = rng.normal(size=(m, 6)).astype(np.float32) + 5.0
    got = nb.kth_nearest_distances(x, refs, k, tile_rows=tiles[0], tile_cols=tiles[1])
    assert got.shape == (n,) and got.dtype == np.float32
    want = np.sort(_sq(x, refs), axis=1)[:, k - 1]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_kth_nearest_errors_and_empty():
    x = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="k must lie in"):
        nb.kth_nearest_distances(x, x, 4)
    with pytest.raises(ValueError, match="expected x"):
        nb.kth_nearest_distances(x, np.zeros((3, 5)), 1)
    assert nb.kth_nearest_distances(np.zeros((0, 4)), x, 1).shape == (0,)


def test_manifold_radii_counts_self_and_duplicates():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8)).astype(np.float32)
    want = np.sort(_sq(x, x), axis=1)[:, 3]
    np.testing.assert_allclose(nb.manifold_radii(x, 3, tile_rows=16, tile_cols=16), want,
                               rtol=1e-5, atol=1e-5)
    # Every point twice: its duplicate is the first neighbour, at distance 0.
    xx = np.concatenate([x, x])
    np.testing.assert_allclose(nb.manifold_radii(xx, 1), 0.0, atol=1e-5)
    np.testing.assert_allclose(nb.manifold_radii(xx, 2)[:40], np.sort(_sq(x, x), 1)[:, 1],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tiles", [(16, 16), (7, 64), (None, None)])
def test_precision_recall_brute_force(tiles):
    rng = np.random.default_rng(1)
    real = rng.normal(size=(90, 16)).astype(np.float32)
    fake = (0.7 * rng.normal(size=(70, 16)) + 0.4).astype(np.float32)
    r_real, r_fake, p, r = _brute_pr(real, fake)
    kw = dict(tile_rows=tiles[0], tile_cols=tiles[1])
    real_in, fake_in = nb.mutual_within_radii(real, nb.manifold_radii(real, **kw), fake,
                                              nb.manifold_radii(fake, **kw), **kw)
    d = _sq(real, fake)
    np.testing.assert_array_equal(fake_in, np.any(d <= r_real[:, None], axis=0))
    np.testing.assert_array_equal(real_in, np.any(d <= r_fake[None, :], axis=1))
    got = nb.precision_recall(real, fake, **kw)
    assert got == pytest.approx((p, r), abs=1e-12)
    assert 0.0 < p < 1.0 and 0.0 < r < 1.0  # the example discriminates


def test_precision_recall_identical_sets_are_one():
    x = np.random.default_rng(2).normal(size=(50, 4)).astype(np.float32)
    assert nb.precision_recall(x, x.copy()) == (1.0, 1.0)


def test_sharded_over_four_devices_equals_one():
    mesh = parallel.make_mesh(4, jax.devices()[:4])
    rng = np.random.default_rng(3)
    a = rng.normal(size=(61, 8)).astype(np.float32)
    b = rng.normal(size=(45, 8)).astype(np.float32)
    for k in (1, 3):
        np.testing.assert_allclose(nb.kth_nearest_distances(a, b, k, tile_rows=4, mesh=mesh),
                                   nb.kth_nearest_distances(a, b, k), rtol=1e-6, atol=1e-6)
    assert nb.precision_recall(a, b, tile_rows=4, tile_cols=8, mesh=mesh) == \
        nb.precision_recall(a, b)


def test_memory_is_bounded_at_50k():
    """The compiled search at N = M = 50,000 (padded to whole 1024-row tiles), D = 2048 needs
    far less scratch than an N x M matrix (10 GB)."""
    n, d = 49 * 1024, 2048
    x = jax.ShapeDtypeStruct((n, d), np.float32)
    r = jax.ShapeDtypeStruct((n,), np.float32)
    kw = dict(tile_rows=1024, tile_cols=1024, mesh=None)
    full_matrix = n * n * 4
    c1 = nb._kth_nearest_jit.lower(x, x, np.int32(n), k=4, **kw).compile()
    c2 = nb._mutual_jit.lower(x, r, x, r, **kw).compile()
    for c in (c1, c2):
        temp = c.memory_analysis().temp_size_in_bytes
        assert temp < 64 * 2**20 < full_matrix / 100, temp
