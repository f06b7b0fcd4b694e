"""Autoregressive transformers over token maps: the release's GPT-LC (`mingpt`) and a
LlamaGen-style GPT (`llamagen`), in Flax Linen.

Both read a sequence ``[condition, z_0 .. z_{T-2}]`` and predict ``z_0 .. z_{T-1}``: position t
of the output predicts ``codes[:, t]``. The condition is one token (a class, or a start token).

``mingpt`` (taming-transformers' minGPT, as zh460045050/VQGAN-LC trains it):
  one vocabulary ``codebook_size + num_condition_ids``: image codes first, then class ids
  (class id = codebook_size + label). An unconditional model (num_classes=0) has one start id,
  codebook_size, so it never collides with code 0. Learned absolute positions, pre-LN blocks
  (LayerNorm -> causal self-attention -> +, LayerNorm -> 4x GELU MLP -> +), final LayerNorm,
  an untied bias-free head over the whole vocabulary. minGPT's init: normal(0.02) weights,
  zero biases, zero position embedding. Parameter names follow minGPT's state dict:
  ``tok_emb``, ``pos_emb`` [1, block_size, width], ``blocks_{i}/{ln1,ln2}``,
  ``blocks_{i}/attn/{query,key,value,proj}``, ``blocks_{i}/mlp/fc`` (minGPT's ``mlp.0``),
  ``blocks_{i}/mlp/proj`` (``mlp.2``), ``ln_f``, ``head``.
  Our extension: ``class_dropout > 0`` adds one null-class id (codebook_size + num_classes)
  and replaces labels by it with that probability in training, so guidance has something to
  guide against; the release never had one.

``llamagen`` (LlamaGen's GPT): RMSNorm, SwiGLU MLP, 2-D rotary positions over the token grid,
  bias-free linears, a label embedder with num_classes + 1 rows (the last is the null class of
  classifier-free guidance), class dropout in training, a token embedding over the image codes
  only, a zero-initialised output layer over the image codes. LlamaGen's names where they
  exist (``tok_embeddings``, ``cls_embedding``, ``layers_{i}/{attention_norm,ffn_norm}``,
  ``layers_{i}/attention/{wqkv,wo}``, ``layers_{i}/feed_forward/{w1,w2,w3}``, ``norm``); its
  ``output`` is named ``head`` here, like minGPT's, so one ``head_kernel`` serves both.

Shared mechanics:
  - attention through ``jax.nn.dot_product_attention`` (is_causal for a full sequence; a mask
    over a static cache for decoding);
  - decoding state in the Linen ``cache`` collection: per layer ``cached_key`` and
    ``cached_value`` [B, block_size, heads, head_dim] and a ``cache_index`` (the next slot);
  - ``dtype`` is the compute dtype of the linears and attention; parameters, norms, the
    residual stream and the returned hidden states and logits stay float32;
  - ``remat`` recomputes each block's activations in the backward pass (nn.remat).

Usage (all through ``model.apply``; decoding needs ``mutable=['cache']``):
  hidden = apply(v, labels, codes, train=False, method=model.hidden_states)   # [B, T, width]
  logits = apply(v, hidden, method=model.head)                               # [..., V_out]
  _, cache = apply(v, batch, method=model.init_cache, mutable=['cache'])
  logits, cache = apply({**v, **cache}, labels, method=model.prefill, mutable=['cache'])
  logits, cache = apply({**v, **cache}, token, position, method=model.decode_step,
                        mutable=['cache'])
``head_kernel(variables)`` is the head's [width, V_out] kernel for a chunked loss.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqlc.models import activations
from vqlc.models.build import COMPUTE_DTYPES

# The condition (class or start token) is one token, as in the release and LlamaGen's c2i.
CONDITION_TOKENS = 1
# minGPT's and LlamaGen's weight init.
INIT_STD = 0.02
NORM_EPS = 1e-5  # torch's LayerNorm default; LlamaGen's RMSNorm norm_eps
ROPE_BASE = 10000.0

# Attention modes (static): a whole sequence; create zero cache buffers; decode with the cache.
FULL, INIT_CACHE, DECODE = "full", "init_cache", "decode"

# LlamaGen's sizes: (layers, width); heads = width / 64.
LLAMAGEN_SIZES = {"B": (12, 768), "L": (24, 1024), "XL": (36, 1280)}
# The paper's GPT-LC (the release's minGPT configuration).
GPT_LC = dict(num_layers=24, num_heads=16, width=1024)


def dense(features: int, name: str, dtype: Any, use_bias: bool,
          kernel_init=nn.initializers.normal(INIT_STD)) -> nn.Dense:
    """A linear layer: float32 parameters, `dtype` compute, zero bias when it has one."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=kernel_init, name=name)


def find_multiple(n: int, k: int) -> int:
    """The smallest multiple of k that is >= n (LlamaGen's SwiGLU hidden size rule)."""
    return n if n % k == 0 else n + k - n % k


def swiglu_hidden(width: int) -> int:
    return find_multiple(int(2 * 4 * width / 3), 256)


# ----------------------------------------------------------------------------- rotary positions

def rotary_table_2d(grid: int, head_dim: int, zero_condition: bool = False
                    ) -> Tuple[np.ndarray, np.ndarray]:
    """(cos, sin), float32 [CONDITION_TOKENS + grid*grid, head_dim // 2], by sequence slot.

    Rotation pairs are adjacent channels (2j, 2j+1). The first head_dim/4 pairs turn with the
    token's row, the last head_dim/4 with its column, at frequencies base^(-2k / (head_dim/2)).
    Condition slots do not turn (cos 1, sin 0). LlamaGen's own table holds cos = sin = 0 there,
    which zeroes q and k at the condition; `zero_condition=True` reproduces that, for its
    checkpoints.
    """
    if head_dim % 4:
        raise ValueError(f"2-D rotary positions need head_dim divisible by 4, got {head_dim}.")
    quarter = head_dim // 4
    freqs = ROPE_BASE ** (-2.0 * np.arange(quarter) / (head_dim // 2))
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    angles = np.concatenate([np.outer(rows, freqs), np.outer(cols, freqs)], axis=1)
    cond_cos = np.full((CONDITION_TOKENS, head_dim // 2), 0.0 if zero_condition else 1.0)
    cond_sin = np.zeros((CONDITION_TOKENS, head_dim // 2))
    cos = np.concatenate([cond_cos, np.cos(angles)]).astype(np.float32)
    sin = np.concatenate([cond_sin, np.sin(angles)]).astype(np.float32)
    return cos, sin


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Turn each adjacent channel pair of x [B, T, N, H] by the angles of cos/sin [T, H/2]
    (float32 arithmetic, x's dtype out)."""
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    turned = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
    return turned.reshape(x.shape).astype(x.dtype)


# ----------------------------------------------------------------------------------- attention

class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with an optional KV cache.

    layout "separate": minGPT's query/key/value/proj linears with biases; "fused": LlamaGen's
    bias-free wqkv (q, k, v concatenated in that order) and wo.
    """
    num_heads: int
    max_len: int
    layout: str = "separate"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, rope: Optional[Tuple[jax.Array, jax.Array]],
                 mode: str = FULL) -> jax.Array:
        b, t, width = x.shape
        q, k, v = self._project_qkv(x)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if mode == FULL:
            out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        else:
            out = self._cached_attention(q, k, v, mode)
        out = out.reshape(b, t, width)
        separate = self.layout == "separate"
        return dense(width, "proj" if separate else "wo", self.dtype, use_bias=separate)(out)

    def _project_qkv(self, x: jax.Array):
        b, t, width = x.shape
        heads = (b, t, self.num_heads, width // self.num_heads)
        if self.layout == "separate":
            return tuple(dense(width, name, self.dtype, use_bias=True)(x).reshape(heads)
                         for name in ("query", "key", "value"))
        qkv = dense(3 * width, "wqkv", self.dtype, use_bias=False)(x)
        return tuple(part.reshape(heads) for part in jnp.split(qkv, 3, axis=-1))

    def _cached_attention(self, q, k, v, mode: str) -> jax.Array:
        """Write k, v at the cache index and attend over every filled slot up to each query."""
        b, t, heads, head_dim = q.shape
        if mode == DECODE and not self.has_variable("cache", "cached_key"):
            raise ValueError("decoding needs a cache: apply method=init_cache(batch) with "
                             "mutable=['cache'] first and pass its 'cache' collection.")
        shape = (b, self.max_len, heads, head_dim)
        cached_key = self.variable("cache", "cached_key", jnp.zeros, shape, self.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, shape, self.dtype)
        index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        if mode == INIT_CACHE:  # the buffers now exist; the output is not used
            return jax.nn.dot_product_attention(q, k, v, is_causal=True)
        start = index.value
        keys = jax.lax.dynamic_update_slice(cached_key.value, k.astype(self.dtype),
                                            (0, start, 0, 0))
        values = jax.lax.dynamic_update_slice(cached_value.value, v.astype(self.dtype),
                                              (0, start, 0, 0))
        cached_key.value, cached_value.value, index.value = keys, values, start + t
        # Query i sits at slot start + i and sees slots 0 .. start + i; empty slots are masked.
        visible = jnp.arange(self.max_len)[None, :] <= (start + jnp.arange(t))[:, None]
        return jax.nn.dot_product_attention(q, keys, values, mask=visible[None, None])


# -------------------------------------------------------------------------------------- blocks

class MinGPTMLP(nn.Module):
    """fc (4x) -> exact GELU -> proj, with biases (minGPT's mlp.0 / mlp.2)."""
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        h = activations.gelu_exact(dense(4 * width, "fc", self.dtype, use_bias=True)(x))
        return dense(width, "proj", self.dtype, use_bias=True)(h)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), bias-free, hidden size find_multiple(int(8 width / 3), 256)."""
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width, hidden = x.shape[-1], swiglu_hidden(x.shape[-1])
        gate = jax.nn.silu(dense(hidden, "w1", self.dtype, use_bias=False)(x))
        h = gate * dense(hidden, "w3", self.dtype, use_bias=False)(x)
        return dense(width, "w2", self.dtype, use_bias=False)(h)


def layer_norm(name: str) -> nn.LayerNorm:
    """torch's LayerNorm (eps 1e-5, two-pass variance), float32 whatever the compute dtype."""
    return nn.LayerNorm(epsilon=NORM_EPS, use_fast_variance=False, dtype=jnp.float32,
                        param_dtype=jnp.float32, name=name)


def rms_norm(name: str) -> nn.RMSNorm:
    """LlamaGen's RMSNorm (eps 1e-5), float32."""
    return nn.RMSNorm(epsilon=NORM_EPS, dtype=jnp.float32, param_dtype=jnp.float32, name=name)


class MinGPTBlock(nn.Module):
    """x + attn(ln1(x)), then x + mlp(ln2(x))."""
    num_heads: int
    max_len: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, rope=None, mode: str = FULL) -> jax.Array:
        x = x + CausalSelfAttention(self.num_heads, self.max_len, "separate", self.dtype,
                                    name="attn")(layer_norm("ln1")(x), rope, mode)
        return x + MinGPTMLP(self.dtype, name="mlp")(layer_norm("ln2")(x))


class LlamaGenBlock(nn.Module):
    """x + attention(attention_norm(x)), then x + feed_forward(ffn_norm(x))."""
    num_heads: int
    max_len: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, rope=None, mode: str = FULL) -> jax.Array:
        x = x + CausalSelfAttention(self.num_heads, self.max_len, "fused", self.dtype,
                                    name="attention")(rms_norm("attention_norm")(x), rope, mode)
        return x + SwiGLU(self.dtype, name="feed_forward")(rms_norm("ffn_norm")(x))


def block_class(block: type, remat: bool) -> type:
    """`block`, checkpointed when `remat`. Argument 3 of (self, x, rope, mode) is static."""
    return nn.remat(block, static_argnums=(3,)) if remat else block


# ---------------------------------------------------------------------------------- the models

class _GPT(nn.Module):
    """What both GPTs share: the sequence layout, the cache API and the head.

    Subclasses define setup (blocks, final_norm, head_layer, embeddings) and the hooks
    embed_condition, embed_codes, add_positions and rotary."""
    codebook_size: int
    num_classes: int
    num_layers: int
    num_heads: int
    width: int
    block_size: int  # the longest input sequence: CONDITION_TOKENS + number of codes
    class_dropout: float = 0.0  # P(label -> null label) in training; mingpt: > 0 adds a null id
    dtype: Any = jnp.float32
    remat: bool = False

    @property
    def null_label(self) -> int:
        """The label that stands for "no class" (guidance's unconditional branch)."""
        return self.num_classes

    @property
    def num_codes(self) -> int:
        return self.block_size - CONDITION_TOKENS

    def drop_labels(self, labels: jax.Array, train: bool) -> jax.Array:
        """Replace each label by the null label with probability class_dropout (training)."""
        if not train or self.class_dropout <= 0:
            return labels
        drop = jax.random.bernoulli(self.make_rng("dropout"), self.class_dropout, labels.shape)
        return jnp.where(drop, self.null_label, labels)

    def _forward(self, x: jax.Array, slots: jax.Array, mode: str) -> jax.Array:
        """Embedded inputs at sequence slots [T] -> final-normed hidden states, float32."""
        x = self.add_positions(x, slots)
        rope = self.rotary(slots)
        for block in self.blocks:
            x = block(x, rope, mode)
        return self.final_norm(x)

    def hidden_states(self, labels: jax.Array, codes: jax.Array, train: bool = False
                      ) -> jax.Array:
        """labels int32 [B], codes int32 [B, T] -> float32 [B, T, width]; position t reads
        [condition, codes[:, :t]] and predicts codes[:, t]."""
        if codes.shape[1] > self.num_codes:
            raise ValueError(f"{codes.shape[1]} codes exceed block_size={self.block_size} "
                             f"(room for {self.num_codes}).")
        condition = self.embed_condition(labels, train)
        x = jnp.concatenate([condition, self.embed_codes(codes[:, :-1])], axis=1)
        return self._forward(x, jnp.arange(x.shape[1]), FULL)

    def head(self, hidden: jax.Array) -> jax.Array:
        """Hidden states [..., width] -> float32 logits [..., V_out]."""
        return self.head_layer(hidden).astype(jnp.float32)

    def __call__(self, labels: jax.Array, codes: jax.Array, train: bool = False) -> jax.Array:
        """Logits [B, T, V_out] (builds every parameter at init)."""
        return self.head(self.hidden_states(labels, codes, train))

    def init_cache(self, batch: int) -> None:
        """Create zero cache buffers for `batch` rows (run with mutable=['cache'])."""
        x = jnp.zeros((batch, CONDITION_TOKENS, self.width), jnp.float32)
        self._forward(x, jnp.arange(CONDITION_TOKENS), INIT_CACHE)

    def prefill(self, labels: jax.Array) -> jax.Array:
        """Write the condition into the cache; float32 logits [B, V_out] for code 0."""
        condition = self.embed_condition(labels, train=False)
        hidden = self._forward(condition, jnp.arange(CONDITION_TOKENS), DECODE)
        return self.head(hidden[:, -1])

    def decode_step(self, token: jax.Array, position) -> jax.Array:
        """Feed code `position` (int32 [B]); float32 logits [B, V_out] for code position + 1.

        `position` counts the codes fed before this one (the sampler's loop index); it places
        the position embedding, while each layer's cache_index places the keys: both advance
        by one per call, so call decode_step for positions 0, 1, 2, ... after prefill."""
        slot = CONDITION_TOKENS + jnp.asarray(position, jnp.int32)
        hidden = self._forward(self.embed_codes(token[:, None]), slot[None], DECODE)
        return self.head(hidden[:, 0])


class MinGPT(_GPT):
    """The release's GPT-LC (taming's minGPT). Output vocabulary: codes, then class ids."""

    @property
    def num_condition_ids(self) -> int:
        """Class ids (one start id when unconditional), plus the null id with class dropout."""
        return max(self.num_classes, 1) + (1 if self.class_dropout > 0 else 0)

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + self.num_condition_ids

    @property
    def output_size(self) -> int:
        return self.vocab_size

    def setup(self):
        if self.class_dropout > 0 and self.num_classes == 0:
            raise ValueError("class_dropout needs classes to drop; this model is unconditional.")
        embed_init = nn.initializers.normal(INIT_STD)
        self.tok_emb = nn.Embed(self.vocab_size, self.width, embedding_init=embed_init)
        # minGPT starts its position embedding at zero.
        self.pos_emb = self.param("pos_emb", nn.initializers.zeros,
                                  (1, self.block_size, self.width), jnp.float32)
        block = block_class(MinGPTBlock, self.remat)
        self.blocks = [block(self.num_heads, self.block_size, self.dtype, name=f"blocks_{i}")
                       for i in range(self.num_layers)]
        self.final_norm = layer_norm("ln_f")
        self.head_layer = dense(self.vocab_size, "head", self.dtype, use_bias=False)

    def embed_condition(self, labels: jax.Array, train: bool) -> jax.Array:
        if self.num_classes == 0:  # the start token, whatever label was passed
            labels = jnp.zeros_like(labels)
        ids = self.codebook_size + self.drop_labels(labels, train)
        return self.tok_emb(ids)[:, None]

    def embed_codes(self, codes: jax.Array) -> jax.Array:
        return self.tok_emb(codes)

    def add_positions(self, x: jax.Array, slots: jax.Array) -> jax.Array:
        return x + jnp.take(self.pos_emb[0], slots, axis=0)[None]

    def rotary(self, slots: jax.Array):
        return None


class LlamaGen(_GPT):
    """LlamaGen's class-conditional GPT. Output vocabulary: the image codes only."""
    class_dropout: float = 0.1  # LlamaGen's class_dropout_prob
    zero_condition_rope: bool = False  # LlamaGen's table (q, k zeroed at the condition)

    @property
    def output_size(self) -> int:
        return self.codebook_size

    @property
    def grid(self) -> int:
        grid = math.isqrt(self.num_codes)
        if grid * grid != self.num_codes:
            raise ValueError(f"2-D rotary positions need a square token map: block_size="
                             f"{self.block_size} holds {self.num_codes} codes.")
        return grid

    def setup(self):
        embed_init = nn.initializers.normal(INIT_STD)
        self.tok_embeddings = nn.Embed(self.codebook_size, self.width, embedding_init=embed_init)
        # The last row is the null class (guidance's unconditional branch).
        self.cls_embedding = nn.Embed(self.num_classes + 1, self.width,
                                      embedding_init=embed_init)
        block = block_class(LlamaGenBlock, self.remat)
        self.blocks = [block(self.num_heads, self.block_size, self.dtype, name=f"layers_{i}")
                       for i in range(self.num_layers)]
        self.final_norm = rms_norm("norm")
        self.head_layer = dense(self.codebook_size, "head", self.dtype, use_bias=False,
                                kernel_init=nn.initializers.zeros)
        cos, sin = rotary_table_2d(self.grid, self.width // self.num_heads,
                                   self.zero_condition_rope)
        self.rope_cos, self.rope_sin = jnp.asarray(cos), jnp.asarray(sin)

    def embed_condition(self, labels: jax.Array, train: bool) -> jax.Array:
        return self.cls_embedding(self.drop_labels(labels, train))[:, None]

    def embed_codes(self, codes: jax.Array) -> jax.Array:
        return self.tok_embeddings(codes)

    def add_positions(self, x: jax.Array, slots: jax.Array) -> jax.Array:
        return x  # positions enter through the rotary q/k turns

    def rotary(self, slots: jax.Array):
        return jnp.take(self.rope_cos, slots, axis=0), jnp.take(self.rope_sin, slots, axis=0)


KINDS = {"mingpt": MinGPT, "llamagen": LlamaGen}


def make_gpt(kind: str, **fields) -> _GPT:
    """The GPT of `kind` ("mingpt" or "llamagen") with the given module fields.

    For llamagen, num_heads defaults to width / 64 (LlamaGen's head size). dtype may be a
    config.model.dtype string (see vqlc.models.build.precision)."""
    if kind not in KINDS:
        raise ValueError(f"GPT kind {kind!r} is unknown; valid: {', '.join(KINDS)}.")
    if kind == "llamagen" and "num_heads" not in fields:
        fields["num_heads"] = fields["width"] // 64
    if isinstance(fields.get("dtype"), str):
        fields["dtype"] = COMPUTE_DTYPES[fields["dtype"]]
    if fields["width"] % fields["num_heads"]:
        raise ValueError(f"width={fields['width']} is not a multiple of "
                         f"num_heads={fields['num_heads']}.")
    return KINDS[kind](**fields)


def head_kernel(variables) -> jax.Array:
    """The head's kernel, float32 [width, V_out]: logits = hidden @ head_kernel (no bias)."""
    return variables["params"]["head"]["kernel"]


# ------------------------------------------------------------------------- parameter counting

EMBEDDINGS = ("tok_emb", "pos_emb", "tok_embeddings", "cls_embedding")


def param_shapes(model: _GPT):
    """The parameter tree as ShapeDtypeStructs (jax.eval_shape: nothing is allocated)."""
    labels = jnp.zeros((1,), jnp.int32)
    codes = jnp.zeros((1, model.num_codes), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), labels, codes)["params"]


def param_counts(model: _GPT) -> dict:
    """Parameter counts: total; embeddings (token, position, label); head; body (the rest:
    blocks and final norm); total_without_embeddings (total - embeddings)."""
    sizes = {name: sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))
             for name, tree in param_shapes(model).items()}
    total = sum(sizes.values())
    embeddings = sum(sizes.get(name, 0) for name in EMBEDDINGS)
    head = sizes["head"]
    return {"total": total, "embeddings": embeddings, "head": head,
            "body": total - embeddings - head, "total_without_embeddings": total - embeddings}
