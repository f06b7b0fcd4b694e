"""Sampling token maps from a GPT (vqlc.gen.networks.gpt), one code at a time.

``sample``: the KV-cache sampler. One prefill on the condition, then one decode step per code
inside a single jitted ``lax.fori_loop``; the cache buffers have static shapes and the prefix
is never recomputed.
``sample_recompute``: no cache; every step runs the network over the whole (static-length)
code buffer and reads the position it needs, the release's way. For the equivalence test and
the benchmark.

Each step turns logits into a code in this order:
  1. keep the image codes only (a mingpt head also scores class ids: they can never be drawn);
  2. classifier-free guidance: the batch runs doubled, [conditional; null class], and
     logits = u + s (c - u), optionally only for code positions in [start, end);
  3. temperature; 4. top-k (exactly k candidates), then top-p within them;
  5. a draw from each sample's own key: fold_in(keys[i], t) for code t, so sample i depends
     only on keys[i] and labels[i], never on the batch it shares. temperature=0 is greedy.

Guidance needs a null class. LlamaGen models always have one (trained with class dropout);
the release's mingpt never learned one, so guiding it is a ValueError unless the model was
built with class_dropout > 0 (our extension, which adds a null-class id).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from vqlc.gen.networks.gpt import MinGPT


class Settings(NamedTuple):
    """The static shape of a sampling run (the traced numbers travel separately)."""
    num_tokens: int
    greedy: bool
    top_k: Optional[int]
    use_top_p: bool
    guided: bool


class Numbers(NamedTuple):
    """Traced sampling numbers: changing them does not recompile."""
    temperature: jax.Array
    top_p: jax.Array
    cfg_scale: jax.Array
    cfg_start: jax.Array
    cfg_end: jax.Array
    max_steps: jax.Array  # codes to draw before stopping (timing runs stop early)


# ------------------------------------------------------------------------ logits -> candidates

def filter_logits(logits: jax.Array, top_k: Optional[int] = None,
                  top_p: Optional[jax.Array] = None) -> jax.Array:
    """logits [..., V] -> the same with -inf outside the candidates.

    top_k keeps exactly k (lax.top_k breaks ties by index); top_p then keeps the smallest
    prefix of those, by descending probability, whose mass reaches top_p (at least one)."""
    vocab = logits.shape[-1]
    if top_k is None and top_p is None:
        return logits
    k = vocab if top_k is None else min(top_k, vocab)
    values, indices = jax.lax.top_k(logits, k)
    if top_p is not None:
        probs = jax.nn.softmax(values, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        values = jnp.where(mass_before < top_p, values, -jnp.inf)
    return _scatter_last(jnp.full_like(logits, -jnp.inf), indices, values)


def _scatter_last(base: jax.Array, indices: jax.Array, values: jax.Array) -> jax.Array:
    """base[..., indices[..., j]] = values[..., j] along the last axis."""
    flat = base.reshape(-1, base.shape[-1])
    rows = jax.vmap(lambda row, i, v: row.at[i].set(v))(
        flat, indices.reshape(-1, indices.shape[-1]), values.reshape(-1, values.shape[-1]))
    return rows.reshape(base.shape)


def guide(logits: jax.Array, scale: jax.Array, active: jax.Array) -> jax.Array:
    """[cond; null] logits [2B, V] -> u + s (c - u) [B, V] where `active`, else c.

    Written s c + (1 - s) u: the same value, and exactly c at s = 1."""
    cond, uncond = jnp.split(logits, 2, axis=0)
    scale = jnp.where(active, scale, 1.0)
    return scale * cond + (1.0 - scale) * uncond


def draw(logits: jax.Array, keys: jax.Array, step, settings: Settings,
         numbers: Numbers) -> jax.Array:
    """Image-code logits [B, K] -> int32 codes [B]; row i draws from fold_in(keys[i], step)."""
    if settings.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / numbers.temperature
    logits = filter_logits(logits, settings.top_k, numbers.top_p if settings.use_top_p else None)
    pick = lambda key, row: jax.random.categorical(jax.random.fold_in(key, step), row)  # noqa
    return jax.vmap(pick)(keys, logits).astype(jnp.int32)


def next_codes(model, logits: jax.Array, keys: jax.Array, step, settings: Settings,
               numbers: Numbers) -> jax.Array:
    """Network logits ([2B, V_out] when guided) -> codes for the network's next input: [B],
    or [2B] (the same code for both halves) when guided."""
    logits = logits[..., :model.codebook_size]
    if settings.guided:
        active = (step >= numbers.cfg_start) & (step < numbers.cfg_end)
        logits = guide(logits, numbers.cfg_scale, active)
    codes = draw(logits, keys, step, settings, numbers)
    return jnp.concatenate([codes, codes]) if settings.guided else codes


# ------------------------------------------------------------------------------------ samplers

def sample(model, variables, keys, labels, *, num_tokens: Optional[int] = None,
           temperature: float = 1.0, top_k: Optional[int] = None,
           top_p: Optional[float] = None, cfg_scale: Optional[float] = None,
           cfg_interval: Optional[Tuple[int, int]] = None,
           max_steps: Optional[int] = None) -> jax.Array:
    """Draw int32 codes [B, num_tokens] with the KV cache.

    keys: one PRNG key per sample ([B] key array or [B, 2] raw keys); labels int32 [B].
    num_tokens: codes per sample (default: as many as block_size holds).
    temperature: 0 = greedy (argmax). top_k: keep the k most likely codes (None = all).
    top_p: nucleus mass (None = off). cfg_scale: guidance scale (None = no guidance; a number,
    even 1.0, runs the doubled batch). cfg_interval: (start, end) code positions to guide.
    max_steps: stop after this many codes, the rest stay 0 (for timing; no recompilation).
    """
    settings, numbers = _settings(model, num_tokens, temperature, top_k, top_p, cfg_scale,
                                  cfg_interval, max_steps)
    return _sample_cached(model, settings, _params_only(variables), keys, labels, numbers)


def sample_recompute(model, variables, keys, labels, *, num_tokens: Optional[int] = None,
                     temperature: float = 1.0, top_k: Optional[int] = None,
                     top_p: Optional[float] = None, cfg_scale: Optional[float] = None,
                     cfg_interval: Optional[Tuple[int, int]] = None,
                     max_steps: Optional[int] = None) -> jax.Array:
    """`sample` without a cache: a full forward pass over the code buffer for every code.

    Every step costs the same (static shapes), so timing a few (max_steps) measures the rate
    of a whole run."""
    settings, numbers = _settings(model, num_tokens, temperature, top_k, top_p, cfg_scale,
                                  cfg_interval, max_steps)
    return _sample_recomputed(model, settings, _params_only(variables), keys, labels, numbers)


def teacher_forced_logits(model, variables, labels, codes) -> jax.Array:
    """float32 [B, T, V_out]: the cached decoder's logits for each of the given codes (prefill,
    then decode_step on codes[:, t - 1]); equals the full forward's logits."""
    return _teacher_forced(model, _params_only(variables), labels, codes)


def _params_only(variables) -> dict:
    """The variables without any stale 'cache' collection (the samplers make their own)."""
    return {name: tree for name, tree in variables.items() if name != "cache"}


def _settings(model, num_tokens, temperature, top_k, top_p, cfg_scale, cfg_interval,
              max_steps) -> Tuple[Settings, Numbers]:
    """Checked settings, split into the static part and the traced numbers."""
    num_tokens = model.num_codes if num_tokens is None else int(num_tokens)
    _check_settings(model, num_tokens, temperature, top_k, top_p, max_steps)
    if cfg_scale is not None:
        _check_guidance(model)
    start, end = (0, num_tokens) if cfg_interval is None else cfg_interval
    top_k = None if top_k is None or top_k >= model.codebook_size else int(top_k)
    settings = Settings(num_tokens=num_tokens, greedy=temperature == 0, top_k=top_k,
                        use_top_p=top_p is not None and top_p < 1, guided=cfg_scale is not None)
    max_steps = num_tokens if max_steps is None else min(int(max_steps), num_tokens)
    numbers = Numbers(temperature=jnp.float32(temperature or 1.0),
                      top_p=jnp.float32(1.0 if top_p is None else top_p),
                      cfg_scale=jnp.float32(1.0 if cfg_scale is None else cfg_scale),
                      cfg_start=jnp.int32(start), cfg_end=jnp.int32(end),
                      max_steps=jnp.int32(max_steps))
    return settings, numbers


def _check_settings(model, num_tokens, temperature, top_k, top_p, max_steps) -> None:
    if not 1 <= num_tokens <= model.num_codes:
        raise ValueError(f"num_tokens={num_tokens}; the model holds 1 .. {model.num_codes}.")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy).")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1 (or None for all codes).")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (or None).")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps={max_steps} must be >= 1 (or None for all codes).")


def _check_guidance(model) -> None:
    if isinstance(model, MinGPT) and model.num_classes == 0:
        raise ValueError("classifier-free guidance needs classes; this model is unconditional.")
    if isinstance(model, MinGPT) and model.class_dropout <= 0:
        raise ValueError(
            "classifier-free guidance (cfg_scale) on a mingpt model that never learned a null "
            "class: the release trains GPT-LC without class dropout. Sample with "
            "cfg_scale=None, or train with class dropout (train.class_dropout > 0, a vqlc "
            "extension that adds a null-class id).")


def _condition_labels(model, labels: jax.Array, guided: bool) -> jax.Array:
    """[labels] or, guided, [labels; null label] (the doubled batch)."""
    labels = jnp.asarray(labels, jnp.int32)
    if not guided:
        return labels
    return jnp.concatenate([labels, jnp.full_like(labels, model.null_label)])


def _with_cache(model, variables, batch: int) -> dict:
    _, cache = model.apply(variables, batch, method=model.init_cache, mutable=["cache"])
    return {**variables, **cache}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _sample_cached(model, settings: Settings, variables, keys, labels, numbers: Numbers):
    labels = _condition_labels(model, labels, settings.guided)
    variables = _with_cache(model, variables, labels.shape[0])
    logits, cache = model.apply(variables, labels, method=model.prefill, mutable=["cache"])
    token = next_codes(model, logits, keys, 0, settings, numbers)
    codes = jnp.zeros((keys.shape[0], settings.num_tokens), jnp.int32).at[:, 0].set(
        token[:keys.shape[0]])

    def step(t, carry):
        codes, token, cache = carry
        logits, cache = model.apply({**variables, **cache}, token, t - 1,
                                    method=model.decode_step, mutable=["cache"])
        token = next_codes(model, logits, keys, t, settings, numbers)
        return codes.at[:, t].set(token[:keys.shape[0]]), token, cache

    codes, _, _ = jax.lax.fori_loop(1, numbers.max_steps, step, (codes, token, cache))
    return codes


@functools.partial(jax.jit, static_argnums=(0, 1))
def _sample_recomputed(model, settings: Settings, variables, keys, labels, numbers: Numbers):
    labels = _condition_labels(model, labels, settings.guided)
    batch = keys.shape[0]
    # Position t of the hidden states reads only codes[:, :t]: the zeros ahead never matter.
    buffer = jnp.zeros((labels.shape[0], settings.num_tokens), jnp.int32)

    def step(t, buffer):
        hidden = model.apply(variables, labels, buffer, method=model.hidden_states)
        hidden_t = jax.lax.dynamic_index_in_dim(hidden, t, axis=1, keepdims=False)
        logits = model.apply(variables, hidden_t, method=model.head)
        return buffer.at[:, t].set(next_codes(model, logits, keys, t, settings, numbers))

    buffer = jax.lax.fori_loop(0, numbers.max_steps, step, buffer)
    return buffer[:batch]


@functools.partial(jax.jit, static_argnums=(0,))
def _teacher_forced(model, variables, labels, codes):
    variables = _with_cache(model, variables, labels.shape[0])
    first, cache = model.apply(variables, labels, method=model.prefill, mutable=["cache"])

    def step(cache, t):
        logits, cache = model.apply({**variables, **cache}, codes[:, t], t,
                                    method=model.decode_step, mutable=["cache"])
        return cache, logits

    _, rest = jax.lax.scan(step, cache, jnp.arange(codes.shape[1] - 1))
    return jnp.concatenate([first[:, None], jnp.swapaxes(rest, 0, 1)], axis=1)
