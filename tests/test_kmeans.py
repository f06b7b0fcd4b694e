"""k-means: recovers known centres, per-class == each class alone, streaming == in memory,
1 device == 4 devices, tiled distances == brute force, mini-batch, clear errors."""
import jax
import numpy as np
import pytest

from vqlc.codebook import kmeans


def _blobs(k=8, d=5, per=60, seed=0, spread=10.0, noise=0.1):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, spread, (k, d)).astype(np.float32)
    x = (centres[:, None, :] + rng.normal(0, noise, (k, per, d))).reshape(-1, d)
    return centres, rng.permutation(x).astype(np.float32)


def _matched(true, found, tol):
    """Every true centre has its own found centre within tol."""
    d = np.linalg.norm(true[:, None] - found[None], axis=-1)
    return np.all(d.min(axis=1) < tol) and len(set(d.argmin(axis=1))) == len(true)


def _brute_inertia(x, c):
    d = ((x.astype(np.float64)[:, None] - c.astype(np.float64)[None]) ** 2).sum(-1)
    return d.min(axis=1).sum()


def test_recovers_well_separated_centres():
    # k-means++ seeds one centre per blob here; random init can merge two blobs (a local
    # optimum of Lloyd), which the Lloyd-step parity test below covers instead.
    centres, x = _blobs()
    found = kmeans.fit(x, 8, num_iters=20, seed=0)
    assert _matched(centres, found, 0.1)
    assert kmeans.inertia(x, found) < 1.2 * 0.01 * x.size


def test_minibatch_recovers_centres_and_is_deterministic():
    centres, x = _blobs(per=200, seed=4)
    a = kmeans.fit(x, 8, num_iters=5, seed=1, batch_size=128)
    b = kmeans.fit(x, 8, num_iters=5, seed=1, batch_size=128)
    np.testing.assert_array_equal(a, b)
    assert _matched(centres, a, 0.1)


def test_deterministic_for_a_seed():
    _, x = _blobs(seed=1)
    for init in kmeans.INITS:
        a = kmeans.fit(x, 8, num_iters=5, seed=3, init=init)
        b = kmeans.fit(x, 8, num_iters=5, seed=3, init=init)
        np.testing.assert_array_equal(a, b)


def test_inertia_equals_brute_force_and_accepts_chunks():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1000, 16)).astype(np.float32)
    c = rng.normal(size=(300, 16)).astype(np.float32)  # > one K tile, N not a multiple of 256
    want = _brute_inertia(x, c)
    np.testing.assert_allclose(kmeans.inertia(x, c), want, rtol=1e-5)
    chunks = lambda: (x[i:i + 333] for i in range(0, 1000, 333))
    np.testing.assert_allclose(kmeans.inertia(chunks, c), want, rtol=1e-5)


def test_lloyd_step_matches_a_numpy_lloyd_step():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 12)).astype(np.float32)
    got = kmeans.fit(x, 40, num_iters=1, init="random", seed=0)
    start = kmeans.random_rows(lambda: iter([x]), 40, 0)
    idx = ((x[:, None] - start[None]) ** 2).sum(-1).argmin(1)
    want = np.stack([x[idx == k].mean(0) if np.any(idx == k) else start[k] for k in range(40)])
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_one_and_four_devices_give_the_same_centres():
    assert jax.device_count() >= 4
    _, x = _blobs(k=16, d=6, per=50, seed=2, noise=2.0)
    one = kmeans.fit(x, 16, num_iters=10, seed=0, init="random", devices=jax.devices()[:1])
    four = kmeans.fit(x, 16, num_iters=10, seed=0, init="random", devices=jax.devices()[:4])
    np.testing.assert_allclose(one, four, atol=1e-5)
    labels = np.arange(x.shape[0]) % 3
    p1 = kmeans.fit_per_class(x, labels, 5, num_iters=10, devices=jax.devices()[:1])
    p4 = kmeans.fit_per_class(x, labels, 5, num_iters=10, devices=jax.devices()[:4])
    np.testing.assert_allclose(p1, p4, atol=1e-5)


def test_centres_split_over_devices_give_the_same_centres():
    """Centres split 2 and 4 ways along K (rows over the rest) == whole on one device, for
    in-memory, streaming and mini-batch k-means; the statistics step gathers no centres."""
    _, x = _blobs(k=16, d=6, per=50, seed=2, noise=2.0)
    chunks = lambda: (x[i:i + 150] for i in range(0, x.shape[0], 150))  # noqa: E731
    one = kmeans.fit(x, 24, num_iters=10, seed=0, init="random", devices=jax.devices()[:1])
    stream = kmeans.fit_streaming(chunks, 24, num_iters=10, seed=0, devices=jax.devices()[:1])
    mini = kmeans.fit(x, 24, num_iters=3, seed=0, init="random", batch_size=200,
                      devices=jax.devices()[:1])
    for shards in (2, 4):
        split = dict(devices=jax.devices()[:4], centre_shards=shards)
        np.testing.assert_allclose(
            kmeans.fit(x, 24, num_iters=10, seed=0, init="random", **split), one, atol=1e-5)
        np.testing.assert_allclose(
            kmeans.fit_streaming(chunks, 24, num_iters=10, seed=0, **split), stream, atol=1e-5)
        np.testing.assert_allclose(
            kmeans.fit(x, 24, num_iters=3, seed=0, init="random", batch_size=200, **split),
            mini, atol=1e-5)
    mesh = kmeans._data_mesh(jax.devices()[:4], 4)
    centres = kmeans._put_centres(np.zeros((400, 6), np.float32), mesh)
    xs, ws = kmeans._put_rows(x, mesh)
    hlo = kmeans._stats_fn(mesh).lower(xs, ws, centres).compile().as_text()
    assert "all-gather" not in hlo
    with pytest.raises(ValueError, match="divisible by centre_shards=4"):
        kmeans.fit(x, 22, centre_shards=4, devices=jax.devices()[:4])
    with pytest.raises(ValueError, match="must divide the 3 devices"):
        kmeans.fit(x, 24, centre_shards=2, devices=jax.devices()[:3])


def test_streaming_equals_in_memory():
    _, x = _blobs(k=12, d=7, per=40, seed=5, noise=3.0)
    chunks = lambda: (x[i:i + 100] for i in range(0, x.shape[0], 100))
    mem = kmeans.fit(x, 12, num_iters=8, seed=2, init="random")
    stream = kmeans.fit_streaming(chunks, 12, num_iters=8, seed=2)
    np.testing.assert_allclose(mem, stream, atol=1e-5)
    with pytest.raises(ValueError, match="init='random' only"):
        kmeans.fit_streaming(chunks, 12, init="k-means++")


def test_random_rows_do_not_depend_on_chunking():
    x = np.arange(200 * 3, dtype=np.float32).reshape(200, 3)
    a = kmeans.random_rows(lambda: iter([x]), 17, seed=9)
    b = kmeans.random_rows(lambda: (x[i:i + 7] for i in range(0, 200, 7)), 17, seed=9)
    np.testing.assert_array_equal(a, b)
    assert len({tuple(r) for r in a}) == 17


def test_per_class_equals_each_class_alone():
    rng = np.random.default_rng(3)
    sizes = [50, 80, 65]  # unequal classes: padding inside a block must not matter
    x = rng.normal(size=(sum(sizes), 6)).astype(np.float32)
    labels = np.repeat([7, 2, 11], sizes)
    perm = rng.permutation(len(labels))
    x, labels = x[perm], labels[perm]
    together = kmeans.fit_per_class(x, labels, 4, num_iters=20, seed=1)
    assert together.shape == (12, 6)
    for j, c in enumerate([2, 7, 11]):  # sorted label order
        alone = kmeans.fit_per_class(x[labels == c], labels[labels == c], 4, num_iters=20, seed=1)
        np.testing.assert_allclose(together[4 * j:4 * j + 4], alone, atol=1e-5)
    blocks = kmeans.fit_per_class(x, labels, 4, num_iters=20, seed=1, classes_per_block=1)
    np.testing.assert_allclose(blocks, together, atol=1e-5)


def test_per_class_recovers_each_classes_centres():
    parts, labels = [], []
    truth = []
    for c in range(3):
        centres, x = _blobs(k=4, d=5, per=30, seed=10 + c)
        parts.append(x)
        labels.append(np.full(len(x), c))
        truth.append(centres)
    found = kmeans.fit_per_class(np.concatenate(parts), np.concatenate(labels), 4, num_iters=30,
                                 init="k-means++")
    for c in range(3):
        assert _matched(truth[c], found[4 * c:4 * c + 4], 0.1)


def test_empty_clusters_are_reseeded():
    # 95 identical points and 5 far away: a random init that draws two identical rows leaves
    # one cluster empty (exact ties go to the lower index); re-seeding must still find both.
    x = np.concatenate([np.zeros((95, 2)), np.full((5, 2), 10.0)]).astype(np.float32)
    seed = next(s for s in range(50)
                if np.all(kmeans.random_rows(lambda: iter([x]), 2, s) == 0))
    found = kmeans.fit(x, 2, num_iters=30, seed=seed, init="random")
    assert _matched(np.array([[0, 0], [10, 10]], np.float32), found, 1e-6)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="N >= 10"):
        kmeans.fit(np.zeros((5, 2), np.float32), 10)
    with pytest.raises(ValueError, match="init must be"):
        kmeans.fit(np.zeros((20, 2), np.float32), 2, init="kmeans")
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        kmeans.fit(np.zeros((20,), np.float32), 2)
    with pytest.raises(ValueError, match="fewer than 5 rows"):
        kmeans.fit_per_class(np.zeros((12, 2), np.float32), np.repeat([0, 1], [8, 4]), 5)


def test_per_class_batched_path_equals_one_class_at_a_time(monkeypatch):
    # Accelerators search a block of classes as one batched matmul; CPU maps over classes.
    # Both must give the same centres (the batched path is exercised here on CPU).
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 6)).astype(np.float32)
    labels = np.repeat([0, 1, 2], [90, 100, 110])
    mapped = kmeans.fit_per_class(x, labels, 4, num_iters=20, tol=1e-5)
    monkeypatch.setattr(kmeans, "_classes_per_step", lambda n: n)
    kmeans._per_class_fn.cache_clear()  # a fresh jit: retrace with the batched search
    try:
        batched = kmeans.fit_per_class(x, labels, 4, num_iters=20, tol=1e-5)
    finally:
        kmeans._per_class_fn.cache_clear()
    np.testing.assert_allclose(batched, mapped, atol=1e-5)
