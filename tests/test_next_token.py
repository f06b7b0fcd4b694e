"""vqlc.gen.objectives.next_token: the chunked cross-entropy equals the plain one (value and
gradients) without ever holding [B, T, V] logits; pkeep corruption and class dropout."""
import math

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vqlc.gen.objectives.next_token import (chunked_cross_entropy, corrupt_tokens, drop_labels,
                                            plain_cross_entropy)

B, T, D, V = 3, 13, 8, 97


def _problem(seed=0, vocab=V, dtype=jnp.float32):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    hidden = jax.random.normal(k1, (B, T, D), jnp.float32).astype(dtype)
    kernel = jax.random.normal(k2, (D, vocab), jnp.float32)
    targets = jax.random.randint(k3, (B, T), 0, vocab, jnp.int32)
    weights = (jax.random.uniform(k4, (B, T)) > 0.3).astype(jnp.float32)
    return hidden, kernel, targets, weights


def _value_and_grads(loss_fn, hidden, kernel, targets, **kwargs):
    fn = jax.jit(jax.value_and_grad(lambda h, k: loss_fn(h, k, targets, **kwargs), argnums=(0, 1)))
    return fn(hidden, kernel)


def _assert_close(got, want, rtol=1e-5, atol=1e-6):
    (got_value, got_grads), (want_value, want_grads) = got, want
    np.testing.assert_allclose(got_value, want_value, rtol=rtol, atol=atol)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                   rtol=rtol, atol=atol)


def test_plain_reference_is_optax_mean():
    hidden, kernel, targets, _ = _problem()
    want = optax.softmax_cross_entropy_with_integer_labels(hidden @ kernel, targets).mean()
    np.testing.assert_allclose(plain_cross_entropy(hidden, kernel, targets), want, rtol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 13, 32])  # 4, 5: do not divide T = 13
def test_chunked_equals_plain(chunk_size):
    hidden, kernel, targets, _ = _problem()
    _assert_close(_value_and_grads(chunked_cross_entropy, hidden, kernel, targets,
                                   chunk_size=chunk_size),
                  _value_and_grads(plain_cross_entropy, hidden, kernel, targets))


@pytest.mark.parametrize("chunk_size", [3, 8])
def test_chunked_equals_plain_with_weights(chunk_size):
    hidden, kernel, targets, weights = _problem(seed=1)
    got = _value_and_grads(chunked_cross_entropy, hidden, kernel, targets,
                           chunk_size=chunk_size, weights=weights)
    _assert_close(got, _value_and_grads(plain_cross_entropy, hidden, kernel, targets,
                                        weights=weights))
    unweighted = _value_and_grads(plain_cross_entropy, hidden, kernel, targets)
    assert abs(float(got[0]) - float(unweighted[0])) > 1e-3  # the weights did something


def test_all_zero_weights_give_zero_loss_and_finite_gradients():
    hidden, kernel, targets, weights = _problem()
    value, grads = _value_and_grads(chunked_cross_entropy, hidden, kernel, targets,
                                    chunk_size=4, weights=jnp.zeros_like(weights))
    assert float(value) == 0.0
    assert all(np.all(np.asarray(g) == 0) for g in grads)


def test_restrict_to_normalises_over_the_first_columns_only():
    codebook_size = 80  # the last 17 columns play the class ids
    hidden, kernel, _, _ = _problem()
    targets = jax.random.randint(jax.random.key(5), (B, T), 0, codebook_size, jnp.int32)
    got = _value_and_grads(chunked_cross_entropy, hidden, kernel, targets, chunk_size=5,
                           restrict_to=codebook_size)
    _assert_close(got, _value_and_grads(plain_cross_entropy, hidden, kernel, targets,
                                        restrict_to=codebook_size))
    assert np.all(np.asarray(got[1][1])[:, codebook_size:] == 0)
    full = _value_and_grads(chunked_cross_entropy, hidden, kernel, targets, chunk_size=5)
    assert float(full[0]) > float(got[0])  # the default (the release's) normalises over all V


def test_bfloat16_hidden_matches_float32_reference():
    hidden, kernel, targets, weights = _problem(seed=2)
    hidden_bf16 = hidden.astype(jnp.bfloat16)
    got = _value_and_grads(chunked_cross_entropy, hidden_bf16, kernel, targets, chunk_size=5,
                           weights=weights)
    assert got[1][0].dtype == jnp.bfloat16
    # Same bfloat16 inputs, float32 math: equal up to the bfloat16 rounding of the hidden grad.
    _assert_close(got, _value_and_grads(plain_cross_entropy, hidden_bf16.astype(jnp.float32),
                                        kernel, targets, weights=weights), rtol=1e-2, atol=1e-4)
    # Against the float32 hidden states: close to bfloat16 precision.
    want_value = plain_cross_entropy(hidden, kernel, targets, weights=weights)
    np.testing.assert_allclose(got[0], want_value, rtol=2e-2)


def _largest_intermediate(jaxpr):
    """Elements in the largest value any equation of `jaxpr` (or its sub-jaxprs) produces."""
    largest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            largest = max(largest, math.prod(getattr(var.aval, "shape", ())))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            largest = max(largest, _largest_intermediate(sub))
    return largest


def test_chunked_loss_never_holds_full_logits():
    batch, length, vocab, width, chunk = 2, 64, 50_000, 16, 8
    logits_elements = batch * length * vocab
    args = (jax.ShapeDtypeStruct((batch, length, width), jnp.float32),
            jax.ShapeDtypeStruct((width, vocab), jnp.float32),
            jax.ShapeDtypeStruct((batch, length), jnp.int32))

    def chunked(h, k, t):
        return chunked_cross_entropy(h, k, t, chunk_size=chunk)

    def grad_fn(loss):
        return jax.value_and_grad(loss, argnums=(0, 1))

    jaxpr = jax.make_jaxpr(grad_fn(chunked))(*args).jaxpr
    assert _largest_intermediate(jaxpr) < logits_elements // 4
    plain_jaxpr = jax.make_jaxpr(grad_fn(plain_cross_entropy))(*args).jaxpr
    assert _largest_intermediate(plain_jaxpr) >= logits_elements  # the check can see logits
    chunked_temp = jax.jit(grad_fn(chunked)).lower(*args).compile().memory_analysis()
    plain_temp = jax.jit(grad_fn(plain_cross_entropy)).lower(*args).compile().memory_analysis()
    assert chunked_temp.temp_size_in_bytes < logits_elements * 4 // 2
    assert plain_temp.temp_size_in_bytes > logits_elements * 4


def _five_sigma(n, p):
    return 5 * math.sqrt(p * (1 - p) / n)


def test_corrupt_tokens_draws_image_codes_only_at_rate_pkeep():
    codebook_size, pkeep = 1000, 0.8
    codes = jnp.full((200, 500), codebook_size - 1, jnp.int32)  # 100k tokens
    corrupted = np.asarray(jax.jit(corrupt_tokens, static_argnums=3)(
        jax.random.key(0), codes, pkeep, codebook_size))
    assert corrupted.dtype == np.int32 and corrupted.shape == codes.shape
    assert corrupted.min() >= 0 and corrupted.max() < codebook_size
    # A replacement can redraw the same id: unchanged with probability pkeep + (1 - pkeep) / K.
    p_unchanged = pkeep + (1 - pkeep) / codebook_size
    assert abs(np.mean(corrupted == codebook_size - 1) - p_unchanged) < _five_sigma(
        codes.size, p_unchanged)
    assert len(np.unique(corrupted)) == codebook_size  # uniform over every image code


def test_corrupt_tokens_pkeep_one_is_identity():
    codes = jax.random.randint(jax.random.key(1), (4, 256), 0, 100, jnp.int32)
    assert corrupt_tokens(jax.random.key(2), codes, 1.0, 100) is codes
    traced = jax.jit(corrupt_tokens, static_argnums=3)(jax.random.key(2), codes,
                                                       jnp.float32(1.0), 100)
    np.testing.assert_array_equal(traced, codes)


def test_drop_labels_rate_and_identity_at_zero():
    labels = jnp.arange(100_000, dtype=jnp.int32) % 1000
    null_label, prob = 1000, 0.1
    dropped = np.asarray(jax.jit(drop_labels)(jax.random.key(3), labels, prob, null_label))
    is_null = dropped == null_label
    assert abs(is_null.mean() - prob) < _five_sigma(labels.size, prob)
    np.testing.assert_array_equal(dropped[~is_null], np.asarray(labels)[~is_null])
    assert drop_labels(jax.random.key(3), labels, 0.0, null_label) is labels
    traced = jax.jit(drop_labels)(jax.random.key(3), labels, jnp.float32(0.0), null_label)
    np.testing.assert_array_equal(traced, labels)
