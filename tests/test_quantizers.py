"""Tests for the tiled nearest-code search, code counts and the four quantizers."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vqlc.models import quantizers as q

KINDS = ("vq", "fc", "ema", "lc")


def brute_force(z, codes):
    """float64 squared distances [N, K] (test sizes only)."""
    z = np.asarray(z, np.float64)
    codes = np.asarray(codes, np.float64)
    return ((z[:, None, :] - codes[None, :, :]) ** 2).sum(-1)


def assert_nearest(idx, z, codes):
    """Chosen distance == min distance (1e-5 rel); same index wherever there is no near-tie."""
    idx = np.asarray(idx)
    d = brute_force(z, codes)
    rows = np.arange(len(z))
    best = d.min(1)
    np.testing.assert_allclose(d[rows, idx], best, rtol=1e-5, atol=1e-6)
    second = np.partition(d, 1, axis=1)[:, 1] if d.shape[1] > 1 else best + 1
    # float32 rounding of |c|^2 - 2 z.c is relative to the magnitudes that cancel.
    mu = np.asarray(codes, np.float64).mean(0)
    scale = (((np.asarray(z, np.float64) - mu) ** 2).sum(1)
             + ((np.asarray(codes, np.float64) - mu) ** 2).sum(1).max())
    clear = (second - best) > 1e-5 * scale
    assert clear.mean() > 0.9  # the check below must cover most rows
    np.testing.assert_array_equal(idx[clear], d.argmin(1)[clear])


def meshes():
    devs = jax.devices()
    assert len(devs) >= 4, "tests/conftest.py should provide 4 CPU devices"
    return {
        "auto1": Mesh(np.array(devs[:1]), ("data",)),
        "auto4": Mesh(np.array(devs[:4]), ("data",)),
        "explicit4": jax.make_mesh((4,), ("data",), devices=devs[:4]),
    }


# ----------------------------------------------------------------------------- nearest_code


@pytest.mark.parametrize("n,k,d,tile_n,tile_k", [
    (300, 1000, 8, None, None),   # defaults
    (257, 301, 8, 64, 48),        # N and K not multiples of the tiles
    (1000, 37, 4, 100, 16),       # N chunked, K padded
    (5, 3, 16, 64, 128),          # tiles larger than the problem
])
def test_nearest_code_matches_brute_force(n, k, d, tile_n, tile_k):
    rng = np.random.default_rng(n + k)
    z = rng.standard_normal((n, d)).astype(np.float32)
    codes = rng.standard_normal((k, d)).astype(np.float32)
    idx = jax.jit(lambda z, c: q.nearest_code(z, c, tile_n=tile_n, tile_k=tile_k))(z, codes)
    assert idx.dtype == jnp.int32 and idx.shape == (n,)
    assert_nearest(idx, z, codes)


def test_nearest_code_planted():
    """Each z is a small perturbation of a known code; that code must be found."""
    rng = np.random.default_rng(1)
    k, n, d = 2000, 700, 8
    codes = rng.standard_normal((k, d)).astype(np.float32) * 3.0
    planted = rng.integers(0, k, n)
    z = codes[planted] + 1e-3 * rng.standard_normal((n, d)).astype(np.float32)
    idx = q.nearest_code(jnp.asarray(z), jnp.asarray(codes), tile_n=128, tile_k=96)
    np.testing.assert_array_equal(np.asarray(idx), planted)


def test_nearest_code_large_offset_accuracy():
    """Skipping |z|^2 must not cost accuracy when z and codes sit far from the origin."""
    rng = np.random.default_rng(2)
    centre = 50.0
    codes = (centre + rng.standard_normal((500, 8))).astype(np.float32)
    z = (centre + rng.standard_normal((400, 8))).astype(np.float32)
    assert_nearest(q.nearest_code(z, codes, tile_k=64), z, codes)


def test_nearest_code_ties_and_dtypes():
    rng = np.random.default_rng(3)
    base = rng.standard_normal((10, 8)).astype(np.float32)
    codes = np.concatenate([base, base])  # every code duplicated at index + 10
    idx = q.nearest_code(jnp.asarray(base), jnp.asarray(codes), tile_k=4)
    np.testing.assert_array_equal(np.asarray(idx), np.arange(10))  # lowest index wins, as argmin
    # bfloat16 inputs are searched in float32.
    zb = jnp.asarray(rng.standard_normal((64, 8)), jnp.bfloat16)
    cb = jnp.asarray(rng.standard_normal((100, 8)), jnp.bfloat16)
    idx = q.nearest_code(zb, cb)
    assert idx.dtype == jnp.int32
    assert_nearest(idx, np.asarray(zb.astype(jnp.float32)), np.asarray(cb.astype(jnp.float32)))


def test_nearest_code_inputs_get_no_gradient():
    rng = np.random.default_rng(4)
    z = jnp.asarray(rng.standard_normal((16, 4)), jnp.float32)
    codes = jnp.asarray(rng.standard_normal((32, 4)), jnp.float32)

    def f(z, codes):
        return jnp.sum(q.nearest_code(z, codes).astype(jnp.float32))

    gz, gc = jax.grad(f, argnums=(0, 1))(z, codes)
    assert not np.any(np.asarray(gz)) and not np.any(np.asarray(gc))


@pytest.mark.parametrize("mesh_name", ["auto4", "explicit4"])
@pytest.mark.parametrize("n", [1024, 1000])
def test_nearest_code_sharded(mesh_name, n):
    """Same indices as the unsharded call, and z is never gathered across devices."""
    mesh = meshes()[mesh_name]
    rng = np.random.default_rng(5)
    z = rng.standard_normal((n, 8)).astype(np.float32)
    codes = rng.standard_normal((333, 8)).astype(np.float32)
    row = NamedSharding(mesh, P("data"))
    fn = jax.jit(lambda z, c: q.nearest_code(z, c, tile_n=64, tile_k=64),
                 in_shardings=(row, NamedSharding(mesh, P())), out_shardings=row)
    zs = jax.device_put(z, row)
    got = np.asarray(fn(zs, codes))
    want = np.asarray(jax.jit(lambda z, c: q.nearest_code(z, c, tile_n=64, tile_k=64))(z, codes))
    np.testing.assert_array_equal(got, want)
    assert_nearest(got, z, codes)
    hlo = fn.lower(zs, codes).compile().as_text()
    for collective in ("all-gather", "all-to-all", "collective-permute"):
        assert collective not in hlo, collective


def test_nearest_code_memory_is_bounded():
    """At N = 65,536 and K = 100,000 the compiled search needs far less than an N x K matrix."""
    z = jax.ShapeDtypeStruct((65536, 8), jnp.float32)
    codes = jax.ShapeDtypeStruct((100_000, 8), jnp.float32)
    compiled = jax.jit(q.nearest_code).lower(z, codes).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 64 * 2**20, temp  # an N x K float32 matrix would be 24 GiB


# ----------------------------------------------------------------------------- code_counts


def test_code_counts_matches_bincount_and_is_global_under_sharding():
    rng = np.random.default_rng(6)
    k = 50
    idx = rng.integers(0, k, (8, 4, 4)).astype(np.int32)
    counts = q.code_counts(jnp.asarray(idx), k)
    assert counts.dtype == jnp.int32 and counts.shape == (k,)
    np.testing.assert_array_equal(np.asarray(counts), np.bincount(idx.ravel(), minlength=k))
    results = []
    for name in ("auto1", "auto4", "explicit4"):
        mesh = meshes()[name]
        sharded = jax.device_put(idx, NamedSharding(mesh, P("data")))
        fn = jax.jit(lambda i: q.code_counts(i, k), out_shardings=NamedSharding(mesh, P()))
        results.append(np.asarray(fn(sharded)))
    for r in results:
        np.testing.assert_array_equal(r, np.bincount(idx.ravel(), minlength=k))


# ----------------------------------------------------------------------------- quantizers


def apply(module, variables, *args, **kwargs):
    """module.apply under jit (compiling once beats dispatching every op eagerly)."""
    return jax.jit(functools.partial(module.apply, **kwargs))(variables, *args)


def init_quantizer(kind, k=40, dim=4, seed=0, **kwargs):
    module = q.make_quantizer(kind, k, dim, **kwargs)
    z0 = jnp.zeros((2, 3, 3, dim), jnp.float32)
    variables = jax.jit(functools.partial(module.init, train=False))(jax.random.key(seed), z0)
    if kind == "lc":  # stand-in for the k-means codebook file
        feats = jax.random.normal(jax.random.key(seed + 1), (k, module.feature_dim))
        variables = {**variables, "frozen": {"codebook": feats}}
    return module, variables


def latents(dim=4, seed=7, scale=0.05):
    return scale * jax.random.normal(jax.random.key(seed), (2, 3, 5, dim), jnp.float32)


def test_make_quantizer_kinds_and_error():
    assert isinstance(q.make_quantizer("vq", 8, 4), q.VectorQuantizer)
    assert isinstance(q.make_quantizer("fc", 8, 4), q.FactorizedQuantizer)
    assert isinstance(q.make_quantizer("ema", 8, 4, decay=0.9), q.EMAQuantizer)
    assert q.make_quantizer("lc", 8, 4, feature_dim=16).feature_dim == 16
    with pytest.raises(ValueError, match="ema.*fc.*lc.*vq"):
        q.make_quantizer("gumbel", 8, 4)


def test_variable_layout():
    _, v = init_quantizer("vq")
    assert set(v) == {"params"} and v["params"]["embedding"].shape == (40, 4)
    assert float(jnp.abs(v["params"]["embedding"]).max()) <= 1.0 / 40
    _, v = init_quantizer("ema")
    assert set(v) == {"ema"}
    assert {k: x.shape for k, x in v["ema"].items()} == {
        "embedding": (40, 4), "cluster_size": (40,), "embed_sum": (40, 4)}
    module = q.make_quantizer("lc", 1000, 8, feature_dim=768)
    v = jax.jit(functools.partial(module.init, train=False))(jax.random.key(0), jnp.zeros((1, 8)))
    assert set(v) == {"params", "frozen"}
    assert v["frozen"]["codebook"].shape == (1000, 768) and not np.any(v["frozen"]["codebook"])
    kernel, bias = v["params"]["projector"]["kernel"], v["params"]["projector"]["bias"]
    assert kernel.shape == (768, 8) and bias.shape == (8,)
    assert abs(float(kernel.std()) - 8 ** -0.5) < 0.02  # normal(std = dim ** -0.5)
    assert float(jnp.abs(bias).max()) <= 768 ** -0.5


@pytest.mark.parametrize("kind", KINDS)
def test_forward_matches_hand_computation(kind):
    module, variables = init_quantizer(kind)
    z = latents()
    out = apply(module, variables, z, train=False)
    assert out.z_q.shape == z.shape and out.z_q.dtype == z.dtype
    assert out.indices.shape == z.shape[:-1] and out.indices.dtype == jnp.int32
    assert out.loss.shape == ()

    cb = np.asarray(apply(module, variables, method="codebook"), np.float64)
    zz = np.asarray(z, np.float64).reshape(-1, 4)
    if kind == "fc":
        zz = zz / np.linalg.norm(zz, axis=1, keepdims=True)
        np.testing.assert_allclose(np.linalg.norm(cb, axis=1), 1.0, rtol=1e-6)
    idx = np.asarray(out.indices).reshape(-1)
    np.testing.assert_array_equal(idx, np.asarray(q.nearest_code(zz, cb)))
    assert_nearest(idx, zz, cb)
    e = cb[idx]
    np.testing.assert_allclose(np.asarray(out.z_q).reshape(-1, 4), e, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(apply(module, variables, out.indices, method="embed")).reshape(-1, 4), e,
        atol=1e-6)
    mse = np.mean((e - zz) ** 2)
    want = mse if kind == "ema" else (1.0 + 0.33) * mse
    np.testing.assert_allclose(float(out.loss), want, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients(kind):
    module, variables = init_quantizer(kind)
    z = latents()

    def z_q_sum(z):
        return jnp.sum(apply(module, variables, z, train=False).z_q)

    # Straight-through: d(sum z_q)/dz is all ones (FC: through the normalisation of z, so not 1).
    gz = jax.grad(z_q_sum)(z)
    if kind == "fc":
        want = jax.grad(lambda z: jnp.sum(z / jnp.linalg.norm(z, axis=-1, keepdims=True)))(z)
        np.testing.assert_allclose(np.asarray(gz), np.asarray(want), rtol=1e-5, atol=1e-6)
    else:
        np.testing.assert_array_equal(np.asarray(gz), np.ones(z.shape, np.float32))

    def loss(variables, z):
        return apply(module, variables, z, train=False).loss

    gv, gz_loss = jax.grad(loss, argnums=(0, 1))(variables, z)
    assert np.any(np.asarray(gz_loss))  # the commitment term pulls the encoder
    if kind in ("vq", "fc"):
        g = np.asarray(gv["params"]["embedding"])
        used = np.unique(np.asarray(apply(module, variables, z, train=False).indices))
        assert np.all(np.abs(g[used]).sum(1) > 0)  # every used code is pulled
        unused = np.setdiff1d(np.arange(g.shape[0]), used)
        assert not np.any(g[unused])
    elif kind == "ema":
        assert set(gv) == {"ema"} and not any(np.any(np.asarray(x))
                                              for x in jax.tree.leaves(gv))
    else:  # lc
        assert "frozen" not in variables["params"]
        assert np.any(np.asarray(gv["params"]["projector"]["kernel"]))
        assert np.any(np.asarray(gv["params"]["projector"]["bias"]))
        assert not np.any(np.asarray(gv["frozen"]["codebook"]))


def test_lc_codebook_is_projected_frozen_codes():
    module, variables = init_quantizer("lc", k=30, dim=4)
    feats = np.asarray(variables["frozen"]["codebook"], np.float64)
    proj = variables["params"]["projector"]
    want = feats @ np.asarray(proj["kernel"], np.float64) + np.asarray(proj["bias"], np.float64)
    got = apply(module, variables, method="codebook")
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    idx = jnp.asarray([[0, 29], [5, 5]])
    np.testing.assert_allclose(np.asarray(apply(module, variables, idx, method="embed")),
                               want[np.asarray(idx)], rtol=1e-5, atol=1e-5)


def ema_reference(state, z, idx, decay, eps):
    """One EMA update in numpy float64."""
    k = state["cluster_size"].shape[0]
    z = np.asarray(z, np.float64).reshape(-1, state["embedding"].shape[1])
    idx = np.asarray(idx).reshape(-1)
    counts = np.bincount(idx, minlength=k)
    sums = np.zeros((k, z.shape[1]))
    np.add.at(sums, idx, z)
    cs = decay * np.asarray(state["cluster_size"], np.float64) + (1 - decay) * counts
    es = decay * np.asarray(state["embed_sum"], np.float64) + (1 - decay) * sums
    total = cs.sum()
    smoothed = (cs + eps) / (total + k * eps) * total
    return {"cluster_size": cs, "embed_sum": es, "embedding": es / smoothed[:, None]}


def test_ema_update():
    module, variables = init_quantizer("ema", k=16, dim=4, decay=0.9, eps=1e-3)
    z = 0.05 * jax.random.normal(jax.random.key(3), (4, 8, 4))
    out, mutated = apply(module, variables, z, train=True, mutable=["ema"])
    want = ema_reference(variables["ema"], z, out.indices, 0.9, 1e-3)
    for name, value in want.items():
        np.testing.assert_allclose(np.asarray(mutated["ema"][name]), value, rtol=1e-5, atol=1e-7)
    assert not np.allclose(np.asarray(mutated["ema"]["embedding"]),
                           np.asarray(variables["ema"]["embedding"]))
    # The output used the codebook from before the update.
    before = np.asarray(variables["ema"]["embedding"])[np.asarray(out.indices)]
    np.testing.assert_allclose(np.asarray(out.z_q), before, atol=1e-6)
    # No update in evaluation, or when the collection is not mutable.
    _, same = apply(module, variables, z, train=False, mutable=["ema"])
    for name in want:
        np.testing.assert_array_equal(np.asarray(same["ema"][name]),
                                      np.asarray(variables["ema"][name]))
    apply(module, variables, z, train=True)  # immutable 'ema': must not raise


def test_ema_and_usage_identical_on_1_and_4_devices():
    """Counts and sums are global: the EMA state and code usage do not depend on the mesh."""
    module, variables = init_quantizer("ema", k=12, dim=4)
    # Dyadic values: every float32 sum is exact, so any summation order gives the same bits.
    z = jnp.round(jax.random.normal(jax.random.key(9), (8, 4, 4, 4)) * 64) / 1024

    def step(variables, z):
        out, mutated = apply(module, variables, z, train=True, mutable=["ema"])
        return mutated["ema"], q.code_counts(out.indices, 12)

    results = {}
    for name in ("auto1", "auto4", "explicit4"):
        mesh = meshes()[name]
        repl = NamedSharding(mesh, P())
        fn = jax.jit(step, in_shardings=(repl, NamedSharding(mesh, P("data"))),
                     out_shardings=repl)
        zs = jax.device_put(z, NamedSharding(mesh, P("data")))
        results[name] = jax.tree.map(np.asarray, fn(jax.device_put(variables, repl), zs))
    ema1, counts1 = results["auto1"]
    assert counts1.sum() == 8 * 4 * 4 and (counts1 > 0).sum() > 1
    for name in ("auto4", "explicit4"):
        ema4, counts4 = results[name]
        np.testing.assert_array_equal(counts4, counts1)
        for key in ema1:
            np.testing.assert_array_equal(ema4[key], ema1[key])
    # And equal to the unsharded numpy update.
    out = apply(module, variables, z, train=False)
    want = ema_reference(variables["ema"], z, out.indices, 0.99, 1e-5)
    for key, value in want.items():
        np.testing.assert_allclose(ema1[key], value, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ("vq", "lc"))
def test_quantizer_sharded_matches_unsharded(kind):
    module, variables = init_quantizer(kind, k=64, dim=4)
    z = latents()
    z = jnp.concatenate([z, z * 1.5])  # batch 4: one sample per device
    want = apply(module, variables, z, train=False)
    mesh = meshes()["auto4"]
    fn = jax.jit(lambda v, z: module.apply(v, z, train=False),
                 in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))))
    got = fn(variables, jax.device_put(z, NamedSharding(mesh, P("data"))))
    np.testing.assert_array_equal(np.asarray(got.indices), np.asarray(want.indices))
    np.testing.assert_allclose(np.asarray(got.z_q), np.asarray(want.z_q), atol=1e-7)
    np.testing.assert_allclose(float(got.loss), float(want.loss), rtol=1e-6)


def test_bfloat16_latents():
    module, variables = init_quantizer("vq")
    z = latents().astype(jnp.bfloat16)
    out = apply(module, variables, z, train=False)
    assert out.z_q.dtype == jnp.bfloat16 and out.loss.dtype == jnp.float32


@pytest.mark.parametrize("n", [37, 1000])  # one chunk; several chunks plus a remainder
def test_nearest_code_in_place_equals_nearest_code(n):
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.normal(3.0, 1.0, (n, 6)), jnp.float32)  # off-centre, as real features
    codes = jnp.asarray(rng.normal(3.0, 1.0, (300, 6)), jnp.float32)
    want = q.nearest_code(z, codes)
    got = jax.jit(functools.partial(q.nearest_code_in_place, tile_n=128, tile_k=64))(z, codes)
    np.testing.assert_array_equal(got, want)
    # Inside shard_map, on each device's own rows (how k-means calls it).
    mesh = Mesh(np.asarray(jax.devices()[:4]), ("data",))
    if n % 4 == 0:
        local = jax.shard_map(functools.partial(q.nearest_code_in_place, tile_n=64), mesh=mesh,
                              in_specs=(P("data"), P()), out_specs=P("data"))
        np.testing.assert_array_equal(jax.jit(local)(z, codes), want)
