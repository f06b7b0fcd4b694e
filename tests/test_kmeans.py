"""k-means recovers known centres and never builds an N x K matrix (it uses nearest_code)."""
import numpy as np

from vqlc.codebook import kmeans


def _blobs(k=8, d=5, per=60, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 10, (k, d)).astype(np.float32)
    x = (centres[:, None, :] + rng.normal(0, 0.1, (k, per, d))).reshape(-1, d)
    return centres, rng.permutation(x).astype(np.float32)


def test_recovers_well_separated_centres():
    centres, x = _blobs()
    found = kmeans.fit(x, 8, num_iters=20, seed=0)
    # every true centre has a found centre within the noise level, one-to-one
    d = np.linalg.norm(centres[:, None] - found[None], axis=-1)
    assert np.all(d.min(axis=1) < 0.1)
    assert len(set(d.argmin(axis=1))) == 8
    assert kmeans.inertia(x, found) < 1.2 * 0.01 * x.size


def test_deterministic_for_a_seed_and_random_init():
    _, x = _blobs(seed=1)
    a = kmeans.fit(x, 8, num_iters=5, seed=3)
    b = kmeans.fit(x, 8, num_iters=5, seed=3)
    np.testing.assert_array_equal(a, b)
    r = kmeans.fit(x, 8, num_iters=30, seed=3, init="random")
    assert kmeans.inertia(x, r) >= kmeans.inertia(x, a) * 0.999


def test_too_few_points_is_an_error():
    import pytest
    with pytest.raises(ValueError, match="N >= 10"):
        kmeans.fit(np.zeros((5, 2), np.float32), 10)
