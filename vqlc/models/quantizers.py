"""Vector quantizers (VQ, FC, EMA, LC) behind one interface.

Every quantizer is a Linen module with fields `codebook_size`, `dim` (plus its own) and methods
  __call__(z [..., dim], *, train) -> QuantizerOutput
  embed(indices [...]) -> [..., dim]    the code vectors a decoder gets for tokens
  codebook() -> [K, dim]                the codebook the search runs over
Build one by name with `make_quantizer(kind, codebook_size, dim, **kwargs)`.

All four assign tokens with `vqlc.neighbors.nearest_code`, which never holds an N x K distance matrix: K can be
100,000 codes and N a whole evaluation batch of tokens.
"""
import math
from typing import Callable, Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

# The tiled search lives in vqlc.neighbors; re-exported here for existing callers.
from vqlc.neighbors import (  # noqa: F401
    _explicit_row_sharding, _explicit_sharding, _replicate_explicit, nearest_code,
    nearest_code_in_place, take_rows)

Array = jax.Array


def segment_sum(data: Array, segment_ids: Array, num_segments: int) -> Array:
    """Sums of data rows [N, ...] per segment id [N] -> [num_segments, ...], replicated.

    A scatter-add, never a one-hot N x K matrix. Auto-sharded rows: XLA adds the per-device partial
    sums. Explicitly sharded rows: the same done by hand (local scatter-add, then psum), because a
    scatter from sharded rows into a replicated result has no sharding rule in explicit mode.
    """
    mesh, row_axes = _explicit_row_sharding(segment_ids)
    if not row_axes or segment_ids.shape[0] % math.prod(mesh.shape[a] for a in row_axes):
        return jax.ops.segment_sum(_replicate_explicit(data), _replicate_explicit(segment_ids),
                                   num_segments=num_segments)
    spec = P(row_axes if len(row_axes) > 1 else row_axes[0])

    def local(data, ids):
        return lax.psum(jax.ops.segment_sum(data, ids, num_segments=num_segments), row_axes)

    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec), out_specs=P())(
        jax.sharding.reshard(data, jax.sharding.NamedSharding(mesh, spec)), segment_ids)


def code_counts(indices: Array, codebook_size: int) -> Array:
    """int32 [K]: how many times each code occurs in `indices` (any shape).

    Under jit over a sharded batch this is the global count over all devices.
    """
    flat = indices.reshape(-1).astype(jnp.int32)
    return segment_sum(jnp.ones_like(flat), flat, codebook_size)


@flax.struct.dataclass
class QuantizerOutput:
    """z_q: like z, straight-through (z + sg(e - z)); indices: int32 z.shape[:-1]; loss: scalar."""
    z_q: Array
    indices: Array
    loss: Array


def _uniform_init(scale: float) -> Callable:
    """uniform(-scale, scale), as torch's `embedding.weight.data.uniform_(-1/K, 1/K)`."""
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -scale, scale)
    return init


def _l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    """x / max(|x|, eps) along the last axis (torch F.normalize)."""
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


def _mse(a: Array, b: Array) -> Array:
    return jnp.mean(jnp.square(a - b))


def _quantize(z: Array, codebook: Array, tile_n, tile_k) -> Tuple[Array, Array]:
    """Nearest code of each z vector: (indices z.shape[:-1], selected codes z.shape, float32)."""
    flat = z.reshape(-1, z.shape[-1])
    idx = nearest_code(flat, codebook, tile_n=tile_n, tile_k=tile_k)
    e = _take_rows(codebook, idx)
    return idx.reshape(z.shape[:-1]), e.reshape(z.shape)


def _take_rows(table: Array, indices: Array) -> Array:
    """table[indices] (rows). Under explicit sharding the rows come out sharded like the indices;
    under a context mesh with a `model` axis the table is split along K (neighbors.take_rows)."""
    mesh, spec = _explicit_sharding(indices)
    if spec is None:
        return take_rows(table, indices)
    out = jax.sharding.NamedSharding(mesh, P(*spec, None))
    return _replicate_explicit(table).at[indices].get(out_sharding=out)


def _straight_through(z: Array, e: Array) -> Array:
    """Forward value e, gradient identity to z."""
    return z + lax.stop_gradient(e - z)


def _check_dim(z: Array, dim: int, name: str):
    if z.shape[-1] != dim:
        raise ValueError(f"{name} expects z [..., {dim}] (its `dim`); got shape {z.shape}.")


def _quantize_with_codebook_loss(q: nn.Module, z: Array) -> QuantizerOutput:
    """Search `q.codebook()`; VQGAN's two-term loss (commitment + codebook pull)."""
    _check_dim(z, q.dim, type(q).__name__)
    zf = z.astype(jnp.float32)
    indices, e = _quantize(zf, q.codebook(), q.tile_n, q.tile_k)
    loss = (q.commitment_weight * _mse(lax.stop_gradient(e), zf)
            + q.codebook_weight * _mse(e, lax.stop_gradient(zf)))
    return QuantizerOutput(_straight_through(zf, e).astype(z.dtype), indices, loss)


class VectorQuantizer(nn.Module):
    """VQGAN's quantizer: a trainable codebook, init uniform(-1/K, 1/K).

    loss = commitment_weight * mean((sg[e] - z)^2) + codebook_weight * mean((e - sg[z])^2).
    """
    codebook_size: int
    dim: int
    commitment_weight: float = 1.0
    codebook_weight: float = 0.33
    tile_n: Optional[int] = None
    tile_k: Optional[int] = None

    def setup(self):
        self.embedding = self.param("embedding", _uniform_init(1.0 / self.codebook_size),
                                    (self.codebook_size, self.dim))

    def codebook(self) -> Array:
        return self.embedding

    def embed(self, indices: Array) -> Array:
        return _take_rows(self.codebook(), indices)

    def __call__(self, z: Array, *, train: bool) -> QuantizerOutput:
        del train  # same computation in training and evaluation
        return _quantize_with_codebook_loss(self, z)


class FactorizedQuantizer(VectorQuantizer):
    """ViT-VQGAN factorised codes: z and the codebook are l2-normalised before search and loss.

    The search is squared L2 between unit vectors (cosine), and z_q is the normalised code, passed
    straight through from the normalised z. `embed` and `codebook` return normalised codes.
    """

    def codebook(self) -> Array:
        return _l2_normalize(self.embedding)

    def __call__(self, z: Array, *, train: bool) -> QuantizerOutput:
        _check_dim(z, self.dim, type(self).__name__)
        zn = _l2_normalize(z.astype(jnp.float32))
        indices, e = _quantize(zn, self.codebook(), self.tile_n, self.tile_k)
        loss = (self.commitment_weight * _mse(lax.stop_gradient(e), zn)
                + self.codebook_weight * _mse(e, lax.stop_gradient(zn)))
        return QuantizerOutput(_straight_through(zn, e).astype(z.dtype), indices, loss)


class EMAQuantizer(nn.Module):
    """Codebook updated by exponential moving averages of assigned vectors (no gradient).

    State, in the variable collection 'ema': 'embedding' [K, dim], 'cluster_size' [K] and
    'embed_sum' [K, dim]. It starts at cluster_size = 1, embed_sum = embedding (uniform(-1/K, 1/K)),
    so embedding == embed_sum / cluster_size from the first step and a code never used decays towards
    itself rather than being divided by ~eps. With train=True and 'ema' mutable, each call does
      cluster_size <- decay * cluster_size + (1 - decay) * counts
      embed_sum    <- decay * embed_sum    + (1 - decay) * sum of the z assigned to each code
      embedding    <- embed_sum / laplace(cluster_size),
    laplace(c) = (c + eps) / (sum(c) + K * eps) * sum(c). The output uses the codebook from before
    the update. loss = commitment_weight * mean((sg[e] - z)^2).
    """
    codebook_size: int
    dim: int
    commitment_weight: float = 1.0
    decay: float = 0.99
    eps: float = 1e-5
    tile_n: Optional[int] = None
    tile_k: Optional[int] = None

    def setup(self):
        shape = (self.codebook_size, self.dim)
        init = _uniform_init(1.0 / self.codebook_size)
        self.embedding = self.variable("ema", "embedding",
                                       lambda: init(self.make_rng("params"), shape))
        self.cluster_size = self.variable("ema", "cluster_size",
                                          lambda: jnp.ones((self.codebook_size,), jnp.float32))
        self.embed_sum = self.variable("ema", "embed_sum", lambda: self.embedding.value)

    def codebook(self) -> Array:
        return lax.stop_gradient(self.embedding.value)

    def embed(self, indices: Array) -> Array:
        return _take_rows(self.codebook(), indices)

    def __call__(self, z: Array, *, train: bool) -> QuantizerOutput:
        _check_dim(z, self.dim, type(self).__name__)
        zf = z.astype(jnp.float32)
        indices, e = _quantize(zf, self.codebook(), self.tile_n, self.tile_k)
        loss = self.commitment_weight * _mse(e, zf)  # e carries no gradient
        if train and self.is_mutable_collection("ema") and not self.is_initializing():
            self._update(lax.stop_gradient(zf), indices)
        return QuantizerOutput(_straight_through(zf, e).astype(z.dtype), indices, loss)

    def _update(self, z: Array, indices: Array):
        k = self.codebook_size
        flat_idx = indices.reshape(-1)
        flat_z = z.reshape(-1, self.dim)
        # Scatter-adds, not one-hot matmuls: O(N * dim) memory; global sums under a sharded jit.
        counts = segment_sum(jnp.ones_like(flat_idx, jnp.float32), flat_idx, k)
        sums = segment_sum(flat_z, flat_idx, k)
        cluster_size = self.decay * self.cluster_size.value + (1.0 - self.decay) * counts
        embed_sum = self.decay * self.embed_sum.value + (1.0 - self.decay) * sums
        total = jnp.sum(cluster_size)
        smoothed = (cluster_size + self.eps) / (total + k * self.eps) * total
        self.cluster_size.value = cluster_size
        self.embed_sum.value = embed_sum
        self.embedding.value = embed_sum / smoothed[:, None]


def _torch_linear_bias_init(fan_in: int) -> Callable:
    """torch.nn.Linear's default bias init: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return _uniform_init(fan_in ** -0.5)


class LCQuantizer(nn.Module):
    """VQGAN-LC: a frozen codebook C [K, feature_dim] mapped into latent space by a trained projector.

    C lives in the variable collection 'frozen' ('codebook', initialised to zeros; the trainer fills
    it from the k-means .npy file). It is never a param, so it has no optimiser state, and it is
    stop_gradient'ed. The search runs over E = projector(C) with squared L2; the loss has VQGAN's form,
    so the codebook term trains the projector.
    """
    codebook_size: int
    dim: int
    feature_dim: int = 768
    commitment_weight: float = 1.0
    codebook_weight: float = 0.33
    tile_n: Optional[int] = None
    tile_k: Optional[int] = None

    def setup(self):
        self.frozen_codebook = self.variable(
            "frozen", "codebook", lambda: jnp.zeros((self.codebook_size, self.feature_dim),
                                                    jnp.float32))
        self.projector = nn.Dense(
            self.dim, name="projector",
            kernel_init=nn.initializers.normal(stddev=self.dim ** -0.5),
            bias_init=_torch_linear_bias_init(self.feature_dim))

    def codebook(self) -> Array:
        return self.projector(lax.stop_gradient(self.frozen_codebook.value))

    def embed(self, indices: Array) -> Array:
        # Project only the codes asked for: the same numbers as codebook()[indices].
        return self.projector(_take_rows(lax.stop_gradient(self.frozen_codebook.value), indices))

    def __call__(self, z: Array, *, train: bool) -> QuantizerOutput:
        del train
        return _quantize_with_codebook_loss(self, z)


QUANTIZERS = {
    "vq": VectorQuantizer,
    "fc": FactorizedQuantizer,
    "ema": EMAQuantizer,
    "lc": LCQuantizer,
}


def make_quantizer(kind: str, codebook_size: int, dim: int, **kwargs) -> nn.Module:
    """The quantizer named `kind` ('vq' | 'fc' | 'ema' | 'lc'); kwargs go to its fields."""
    if kind not in QUANTIZERS:
        raise ValueError(f"Unknown quantizer kind {kind!r}; valid kinds: {sorted(QUANTIZERS)}.")
    return QUANTIZERS[kind](codebook_size=codebook_size, dim=dim, **kwargs)
