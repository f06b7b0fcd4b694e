"""DiT network (vqlc.gen.networks.dit): parameter counts of the paper's sizes, adaLN-Zero at init,
conditioning, DiT's patch and position-embedding layouts, bfloat16 and remat. Tiny float32
models (8x8x4 latents, patch 2) unless a size is named."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqlc.gen.networks import dit

CLASSES, SIDE, CHANNELS, PATCH = 5, 8, 4, 2
TINY = dict(input_size=SIDE, patch_size=PATCH, in_channels=CHANNELS, hidden_size=32, depth=2,
            num_heads=2, num_classes=CLASSES)


def tiny(**overrides) -> dit.DiT:
    return dit.DiT(**{**TINY, **overrides})


def batch(size: int = 4, seed: int = 0):
    x = jax.random.normal(jax.random.key(seed), (size, SIDE, SIDE, CHANNELS))
    t = jnp.linspace(0.0, 999.0, size)
    labels = jnp.arange(size, dtype=jnp.int32) % CLASSES
    return x, t, labels


@jax.jit
def randomised(params, scale: float = 0.2, seed: int = 1):
    """Noise added to every parameter: at init the output is zero, which would make the
    conditioning tests below pass trivially."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [leaf + scale * jax.random.normal(k, leaf.shape)
                                     for leaf, k in zip(leaves, keys)])


_CACHE = {}


def model_and_params():
    """The tiny model with randomised parameters (built once per session)."""
    if not _CACHE:
        model = tiny()
        params = jax.jit(model.init)(jax.random.key(0), *batch())["params"]
        _CACHE["tiny"] = model, randomised(params)
    return _CACHE["tiny"]


# ------------------------------------------------------------------------------ parameter counts

def test_dit_xl_2_parameter_count():
    # DiT's 675M counts its frozen pos_embed buffer (256 x 1152) with the parameters; here the
    # table is a constant, so the parameter tree holds 294,912 fewer numbers.
    counts = dit.param_counts(dit.make_dit("XL/2", input_size=32, in_channels=4))
    assert counts["dit_reported"] == 675_129_632
    assert counts["pos_embed"] == 256 * 1152
    assert counts["total"] == 674_834_720
    assert counts["blocks"] == 28 * 23_905_152


@pytest.mark.parametrize("size,reported", [("S", 33e6), ("B", 130e6), ("L", 458e6)])
def test_paper_sizes_parameter_counts(size, reported):
    counts = dit.param_counts(dit.make_dit(f"{size}/2", input_size=32, in_channels=4))
    assert abs(counts["dit_reported"] / reported - 1) < 0.005
    if size == "S":
        assert counts["dit_reported"] == 32_963_360


def test_print_lc_geometries():
    for name in ("XL/2", "S/2"):
        counts = dit.param_counts(dit.make_dit(name, input_size=16, in_channels=8))
        print(f"DiT-{name} at 16x16x8: {counts}")


def test_make_dit_rejects_bad_names():
    for name in ("XXL/2", "XL", "XL/0", "XL-2"):
        with pytest.raises(ValueError, match="valid sizes: S, B, L, XL"):
            dit.make_dit(name, input_size=32, in_channels=4)
    with pytest.raises(ValueError, match="depth"):
        dit.make_dit("S/2", input_size=32, in_channels=4, depth=3)
    model = dit.make_dit("B/4", input_size=32, in_channels=4, dtype="bfloat16")
    assert (model.patch_size, model.depth, model.hidden_size, model.dtype) == (
        4, 12, 768, jnp.bfloat16)


def test_wrong_latent_shape_is_refused():
    x, t, labels = batch()
    with pytest.raises(ValueError, match="NHWC"):
        tiny().init(jax.random.key(0), jnp.moveaxis(x, -1, 1), t, labels)


# ------------------------------------------------------------------------------------ init

def test_output_is_exactly_zero_at_init():
    model = tiny()
    variables = jax.jit(model.init)(jax.random.key(0), *batch())
    assert "pos_embed" not in variables["params"] and set(variables) == {"params"}
    out = jax.jit(model.apply)(variables, *batch())
    assert out.shape == (4, SIDE, SIDE, 2 * CHANNELS) and out.dtype == jnp.float32
    np.testing.assert_array_equal(out, 0.0)


def test_blocks_are_the_identity_at_init():
    """Every parameter randomised except the blocks' zero adaLN modulation: each block then
    returns its input unchanged, and the output equals a depth-0 model's with the same other
    weights."""
    model = tiny()
    params = jax.jit(model.init)(jax.random.key(0), *batch())["params"]
    noisy = randomised(params)
    for name in ("blocks_0", "blocks_1"):
        noisy[name]["adaLN_modulation_1"] = params[name]["adaLN_modulation_1"]
        np.testing.assert_array_equal(params[name]["adaLN_modulation_1"]["kernel"], 0.0)

    @jax.jit
    def forward(params):
        return model.apply({"params": params}, *batch(), capture_intermediates=True,
                           mutable=["intermediates"])

    deep_out, state = forward(noisy)
    seen = state["intermediates"]
    tokens = seen["x_embedder"]["__call__"][0] + dit.sincos_pos_embed_2d(32, SIDE // PATCH)
    for name in ("blocks_0", "blocks_1"):
        np.testing.assert_array_equal(seen[name]["__call__"][0], tokens)
    shallow = {name: p for name, p in noisy.items() if not name.startswith("blocks_")}
    shallow_out = jax.jit(tiny(depth=0).apply)({"params": shallow}, *batch())
    assert np.abs(np.asarray(deep_out)).max() > 1e-2  # the final layer is live
    # Equal up to XLA compiling the two programs differently.
    np.testing.assert_allclose(deep_out, shallow_out, atol=1e-5, rtol=0)


def test_initialisation_follows_dit():
    model = tiny(hidden_size=64, num_heads=4)
    params = model.init(jax.random.key(0), *batch())["params"]
    kernel = params["x_embedder"]["proj"]["kernel"]  # [p, p, C, hidden]
    # xavier-uniform of the [C*p*p, hidden] matrix: bound sqrt(6 / (C*p*p + hidden)).
    bound = math.sqrt(6 / (CHANNELS * PATCH * PATCH + 64))
    assert kernel.shape == (PATCH, PATCH, CHANNELS, 64)
    assert 0.9 * bound < np.abs(kernel).max() <= bound
    qkv = params["blocks_0"]["attn"]["qkv"]["kernel"]
    assert 0.9 * math.sqrt(6 / (64 + 192)) < np.abs(qkv).max() <= math.sqrt(6 / (64 + 192))
    for table in (params["y_embedder"]["embedding_table"]["embedding"],
                  params["t_embedder"]["mlp_0"]["kernel"]):
        assert 0.015 < np.std(table) < 0.025
    assert params["y_embedder"]["embedding_table"]["embedding"].shape == (CLASSES + 1, 64)
    for leaf in jax.tree.leaves(params["final_layer"]):
        np.testing.assert_array_equal(leaf, 0.0)
    for layer in params["blocks_0"]["attn"].values():
        np.testing.assert_array_equal(layer["bias"], 0.0)


# ------------------------------------------------------------------------------ conditioning

def test_output_channels_follow_learn_sigma():
    model = tiny(learn_sigma=False)
    out = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), *batch())[0])
    assert out.shape == (4, SIDE, SIDE, CHANNELS) and model.out_channels == CHANNELS
    assert tiny().out_channels == 2 * CHANNELS


def test_labels_and_time_change_the_output():
    model, params = model_and_params()
    x, t, labels = batch()
    forward = jax.jit(model.apply)
    base = forward({"params": params}, x, t, labels)
    null = jnp.full_like(labels, model.null_label)
    for other in (forward({"params": params}, x, t, (labels + 1) % CLASSES),
                  forward({"params": params}, x, t, null),
                  forward({"params": params}, x, t + 0.5, labels)):
        assert np.isfinite(np.asarray(other)).all()
        differences = np.abs(np.asarray(other - base)).reshape(4, -1).max(axis=1)
        assert (differences > 1e-3).all()  # every sample, not just some


def test_samples_are_independent():
    model, params = model_and_params()
    x, t, labels = batch()
    together = jax.jit(model.apply)({"params": params}, x, t, labels)
    alone = jax.jit(model.apply)({"params": params}, x[2:3], t[2:3], labels[2:3])
    np.testing.assert_allclose(alone[0], together[2], atol=1e-5)


# ----------------------------------------------------------------------- DiT's layouts

def test_unpatchify_is_dits_and_patchify_inverts_it():
    n, grid, p, c = 2, 3, 2, 5
    tokens = np.random.default_rng(0).normal(size=(n, grid * grid, p * p * c))
    tokens = tokens.astype(np.float32)
    # DiT's unpatchify (NCHW), then moved to NHWC.
    dits = np.einsum("nhwpqc->nchpwq", tokens.reshape(n, grid, grid, p, p, c))
    dits = dits.reshape(n, c, grid * p, grid * p).transpose(0, 2, 3, 1)
    ours = dit.unpatchify(jnp.asarray(tokens), p, grid)
    np.testing.assert_array_equal(ours, dits)
    np.testing.assert_array_equal(dit.patchify(ours, p), tokens)


def test_patch_embedding_is_a_matmul_over_patchified_values():
    """The conv kernel [p, p, C, hidden] flattened row-major is the [(p q c), hidden] matrix of
    patchify's order (torch's [hidden, C, p, p] weight permuted to (2, 3, 1, 0))."""
    model, params = model_and_params()
    x, _, _ = batch()
    proj = params["x_embedder"]["proj"]
    embedded = dit.PatchEmbed(PATCH, TINY["hidden_size"]).apply(
        {"params": {"proj": proj}}, x)
    by_hand = dit.patchify(x, PATCH) @ proj["kernel"].reshape(-1, TINY["hidden_size"])
    np.testing.assert_allclose(embedded, by_hand + proj["bias"], atol=1e-5)


def test_pos_embed_is_dits_2d_sincos():
    grid, dim = 3, 16
    quarter = dim // 4
    omega = [1.0 / 10000 ** (2 * k / (dim // 2)) for k in range(quarter)]
    expected = np.zeros((grid * grid, dim))
    for row in range(grid):
        for col in range(grid):
            token = row * grid + col
            # DiT's meshgrid(grid_w, grid_h): the first half of the channels is the column's.
            for half, coordinate in ((0, col), (1, row)):
                base = half * dim // 2
                for k in range(quarter):
                    expected[token, base + k] = math.sin(coordinate * omega[k])
                    expected[token, base + quarter + k] = math.cos(coordinate * omega[k])
    table = dit.sincos_pos_embed_2d(dim, grid)
    assert table.dtype == np.float32
    np.testing.assert_allclose(table, expected, atol=1e-6)


def test_timestep_embedding_is_cos_then_sin():
    t = jnp.array([0.0, 1.0, 999.0])
    emb = dit.timestep_embedding(t, 8)
    freqs = np.exp(-math.log(10000) * np.arange(4) / 4)
    expected = np.concatenate([np.cos(np.outer(t, freqs)), np.sin(np.outer(t, freqs))], 1)
    np.testing.assert_allclose(emb, expected, atol=1e-4)


# --------------------------------------------------------------------------- precision, remat

def test_bfloat16_stays_close_to_float32():
    model, params = model_and_params()
    full = jax.jit(model.apply)({"params": params}, *batch())
    half = jax.jit(tiny(dtype=jnp.bfloat16).apply)({"params": params}, *batch())
    assert half.dtype == jnp.float32
    # Relative RMS error: these randomised weights amplify rounding more than trained ones.
    error = np.sqrt(np.mean(np.square(np.asarray(half - full))) / np.mean(np.square(full)))
    assert 0 < error < 0.03  # bfloat16 really in use, and close


def test_remat_gives_the_same_loss_and_gradient():
    model, params = model_and_params()
    x, t, labels = batch()

    def loss_and_grad(net):
        def loss(p):
            return jnp.mean(jnp.square(net.apply({"params": p}, x, t, labels)))
        return jax.jit(jax.value_and_grad(loss))(params)

    (value, grads), (value_r, grads_r) = loss_and_grad(model), loss_and_grad(tiny(remat=True))
    np.testing.assert_allclose(value_r, value, rtol=1e-6)
    for g, g_r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
        np.testing.assert_allclose(g_r, g, rtol=1e-6, atol=1e-6)
