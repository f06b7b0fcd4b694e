"""GPT networks (vqlc.gen.networks.gpt) and the autoregressive sampler: parameter counts of the
paper's sizes, causal masking, KV cache = recompute, guidance, top-k, per-sample keys,
bfloat16 and remat. Tiny float32 models (4x4 token maps, 64 codes) unless a size is named."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqlc.gen.networks import gpt
from vqlc.gen.samplers import autoregressive as ar

CODEBOOK, CLASSES, GRID = 64, 5, 4
TINY = dict(codebook_size=CODEBOOK, num_classes=CLASSES, block_size=1 + GRID * GRID,
            num_layers=2, num_heads=2, width=32)
KINDS = ("mingpt", "llamagen")
# One set of sampling settings shared by several tests, so they share one compiled sampler.
SAMPLING = dict(top_k=8, temperature=1.0)


def tiny(kind: str, **overrides):
    # Class dropout gives mingpt a null-class id too, so both kinds can be guided.
    fields = dict(TINY, class_dropout=0.1 if kind == "mingpt" else 0.0)
    return gpt.make_gpt(kind, **{**fields, **overrides})


@jax.jit
def randomised(variables, scale: float = 0.2, seed: int = 1):
    """Every parameter replaced by noise: an untrained llamagen's head is zero, and equal
    logits everywhere would make the tests below pass trivially."""
    leaves, tree = jax.tree.flatten(variables["params"])
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [leaf + scale * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)]
    return {"params": jax.tree.unflatten(tree, noisy)}


def batch(size: int = 4, seed: int = 0):
    labels = jnp.arange(size, dtype=jnp.int32) % CLASSES
    codes = jax.random.randint(jax.random.key(seed), (size, GRID * GRID), 0, CODEBOOK)
    return labels, codes


_CACHE = {}


def model_and_variables(kind: str):
    """A tiny model of `kind` with randomised float32 parameters (built once per session)."""
    if kind not in _CACHE:
        model = tiny(kind)
        labels, codes = batch()
        _CACHE[kind] = model, randomised(jax.jit(model.init)(jax.random.key(0), labels, codes))
    return _CACHE[kind]


def sample_keys(size: int, seed: int = 7):
    return jax.random.split(jax.random.key(seed), size)


# ------------------------------------------------------------------------------- parameter counts

def test_gpt_lc_parameter_count():
    # The paper's GPT-LC: 24 layers, 16 heads, width 1024, vocab 100,000 codes + 1,000 classes,
    # block 257. 509,422,592 = token embedding 101,000 x 1024 (103,424,000) + position
    # embedding 257 x 1024 (263,168) + 24 blocks of 12,596,224 (302,309,376) + ln_f (2,048)
    # + head 1024 x 101,000 (103,424,000). The paper's "404M" leaves out the embeddings:
    # 405,735,424 here; 404,711,424 with the head over the 100,000 image codes only (or an
    # unconditional model, vocab 100,001, whose count without embeddings is 404,712,448).
    model = gpt.make_gpt("mingpt", codebook_size=100_000, num_classes=1000, block_size=257,
                         **gpt.GPT_LC)
    counts = gpt.param_counts(model)
    assert counts["total"] == 509_422_592
    assert counts["embeddings"] == 101_000 * 1024 + 257 * 1024
    assert counts["head"] == 1024 * 101_000
    assert counts["total_without_embeddings"] == 405_735_424
    assert counts["body"] == 302_311_424


@pytest.mark.parametrize("size,reported", [("B", 111e6), ("L", 343e6), ("XL", 775e6)])
def test_llamagen_parameter_counts(size, reported):
    layers, width = gpt.LLAMAGEN_SIZES[size]
    model = gpt.make_gpt("llamagen", codebook_size=16_384, num_classes=1000, block_size=257,
                         num_layers=layers, width=width)
    assert abs(gpt.param_counts(model)["total"] / reported - 1) < 0.02


# ------------------------------------------------------------------------------------- network

@pytest.mark.parametrize("kind", KINDS)
def test_later_codes_never_change_earlier_logits(kind):
    model, variables = model_and_variables(kind)
    labels, codes = batch()
    changed = codes.at[:, 7:].set((codes[:, 7:] + 1) % CODEBOOK)
    forward = jax.jit(model.apply)
    before, after = forward(variables, labels, codes), forward(variables, labels, changed)
    # Position t reads codes[:, :t]: positions 0..7 never see codes[:, 7:].
    np.testing.assert_allclose(after[:, :8], before[:, :8], atol=1e-6)
    assert np.abs(np.asarray(after[:, 8:] - before[:, 8:])).max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_kv_cache_logits_equal_full_forward(kind):
    model, variables = model_and_variables(kind)
    labels, codes = batch()
    full = jax.jit(model.apply)(variables, labels, codes)
    cached = ar.teacher_forced_logits(model, variables, labels, codes)
    assert cached.shape == full.shape == (4, GRID * GRID, model.output_size)
    np.testing.assert_allclose(cached, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_kv_cache_equals_recompute(kind):
    model, variables = model_and_variables(kind)
    labels, _ = batch()
    keys = sample_keys(4)
    cached = ar.sample(model, variables, keys, labels, temperature=0.0)
    recomputed = ar.sample_recompute(model, variables, keys, labels, temperature=0.0)
    assert cached.shape == (4, GRID * GRID) and cached.dtype == jnp.int32
    np.testing.assert_array_equal(cached, recomputed)
    assert len(np.unique(np.asarray(cached))) > 1  # not a degenerate constant map


def test_head_kernel_gives_the_logits():
    model, variables = model_and_variables("llamagen")
    labels, codes = batch()
    hidden = jax.jit(lambda v: model.apply(v, labels, codes, method=model.hidden_states))(
        variables)
    np.testing.assert_allclose(hidden @ gpt.head_kernel(variables),
                               jax.jit(model.apply)(variables, labels, codes), atol=1e-5)


# ------------------------------------------------------------------------------------- sampling

def test_guidance_at_scale_one_equals_conditional_sampling():
    model, variables = model_and_variables("llamagen")
    labels, _ = batch()
    keys = sample_keys(4)
    conditional = ar.sample(model, variables, keys, labels, **SAMPLING)
    guided = ar.sample(model, variables, keys, labels, cfg_scale=1.0, **SAMPLING)
    np.testing.assert_array_equal(guided, conditional)
    stronger = ar.sample(model, variables, keys, labels, cfg_scale=4.0, **SAMPLING)
    assert not np.array_equal(stronger, conditional)  # the null branch is really there


def test_guidance_interval_outside_is_conditional():
    model, variables = model_and_variables("llamagen")
    labels, _ = batch()
    keys = sample_keys(4)
    conditional = ar.sample(model, variables, keys, labels, **SAMPLING)
    empty = ar.sample(model, variables, keys, labels, cfg_scale=4.0, cfg_interval=(0, 0),
                      **SAMPLING)
    np.testing.assert_array_equal(empty, conditional)


def test_guidance_on_mingpt_without_class_dropout_is_refused():
    model = tiny("mingpt", class_dropout=0.0)
    labels, _ = batch()
    with pytest.raises(ValueError, match="null"):
        ar.sample(model, {"params": {}}, sample_keys(4), labels, cfg_scale=2.0)
    unconditional = tiny("mingpt", num_classes=0, class_dropout=0.0)
    assert unconditional.vocab_size == CODEBOOK + 1  # one start id, after the codes
    with pytest.raises(ValueError, match="unconditional"):
        ar.sample(unconditional, {"params": {}}, sample_keys(4), labels, cfg_scale=2.0)


def test_top_k_keeps_exactly_k_candidates():
    logits = jax.random.normal(jax.random.key(3), (3, 50))
    tied = jnp.zeros((1, 50))  # every code tied: still exactly k
    for rows in (logits, tied):
        probs = jax.nn.softmax(ar.filter_logits(rows, top_k=7), axis=-1)
        assert (np.asarray(probs > 0).sum(axis=-1) == 7).all()
    kept = ar.filter_logits(logits, top_k=7)
    np.testing.assert_array_equal(np.isfinite(kept), logits >= jnp.sort(logits)[:, -7:-6])


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    assert np.isfinite(ar.filter_logits(logits, top_p=0.7)).sum() == 2
    assert np.isfinite(ar.filter_logits(logits, top_p=0.4)).sum() == 1
    assert np.isfinite(ar.filter_logits(logits, top_k=3, top_p=0.99)).sum() == 3


def test_mingpt_never_samples_a_class_id():
    model, variables = model_and_variables("mingpt")
    params = jax.tree.map(lambda x: x, variables["params"])
    # hidden = ln_f's bias = ones, so every logit is its head column's sum: class ids win.
    params["ln_f"] = {"scale": jnp.zeros(TINY["width"]), "bias": jnp.ones(TINY["width"])}
    params["head"] = {"kernel": params["head"]["kernel"].at[:, CODEBOOK:].set(1.0)}
    biased = {"params": params}
    labels, codes = batch()
    logits = jax.jit(model.apply)(biased, labels, codes)
    assert (np.asarray(jnp.argmax(logits, -1)) >= CODEBOOK).all()  # the bias took hold
    for settings in (SAMPLING, dict(temperature=0.0)):
        drawn = ar.sample(model, biased, sample_keys(4), labels, **settings)
        assert (np.asarray(drawn) < CODEBOOK).all()


def test_sample_does_not_depend_on_the_batch():
    model, variables = model_and_variables("llamagen")
    labels, _ = batch()
    keys = sample_keys(4)
    together = ar.sample(model, variables, keys, labels, cfg_scale=4.0, **SAMPLING)
    alone = ar.sample(model, variables, keys[2:3], labels[2:3], cfg_scale=4.0, **SAMPLING)
    np.testing.assert_array_equal(alone[0], together[2])


# --------------------------------------------------------------------------- precision, remat

@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_stays_close_to_float32(kind):
    model, variables = model_and_variables(kind)
    labels, codes = batch()
    low = tiny(kind, dtype=jnp.bfloat16)
    full = jax.jit(model.apply)(variables, labels, codes)
    half = jax.jit(low.apply)(variables, labels, codes)
    assert half.dtype == jnp.float32
    assert np.abs(np.asarray(half - full)).max() < 0.03 * np.abs(np.asarray(full)).max()
    drawn = ar.sample(low, variables, sample_keys(4), labels, **SAMPLING)
    assert drawn.shape == (4, GRID * GRID)


@pytest.mark.parametrize("kind", KINDS)
def test_remat_gives_the_same_loss_and_gradient(kind):
    model, variables = model_and_variables(kind)
    rematted = tiny(kind, remat=True)
    labels, codes = batch()

    def loss_and_grad(net):
        def loss(params):
            logits = net.apply({"params": params}, labels, codes)
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), codes[..., None],
                                                 axis=-1))
        return jax.jit(jax.value_and_grad(loss))(variables["params"])

    (value, grads), (value_r, grads_r) = loss_and_grad(model), loss_and_grad(rematted)
    np.testing.assert_allclose(value_r, value, rtol=1e-6)
    for g, g_r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
        np.testing.assert_allclose(g_r, g, atol=1e-6)
