"""Vector quantizers (VQ, FC, EMA, LC) behind one interface, and the tiled nearest-code search.

Every quantizer is a Linen module with fields `codebook_size`, `dim` (plus its own) and methods
  __call__(z [..., dim], *, train) -> QuantizerOutput
  embed(indices [...]) -> [..., dim]    the code vectors a decoder gets for tokens
  codebook() -> [K, dim]                the codebook the search runs over
Build one by name with `make_quantizer(kind, codebook_size, dim, **kwargs)`.

All four assign tokens with `nearest_code`, which never holds an N x K distance matrix: K can be
100,000 codes and N a whole evaluation batch of tokens.
"""
import functools
import math
from typing import Callable, Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, PartitionSpec as P

Array = jax.Array

# Padded codes get this (finite) squared norm so they never win. +inf would also never win on CPU, but
# a HIGHEST-precision matmul on TPU splits operands into bf16 pieces and inf - inf makes NaN there.
_PAD_NORM = float(jnp.finfo(jnp.float32).max)


def _default_tiles() -> Tuple[int, int]:
    """(tile_n, tile_k) for the current backend.

    CPU: measured with benchmarks/nearest_code.py (D = 8, K = 100,000) on a 2-core Xeon: ~19k
    tokens/s (5x numpy's chunked BLAS + argmin). Blocks of ~32k distances (256x128, 128x256, 512x64,
    1024x32) are within 5% of each other; 256x256 and larger blocks run ~2x slower. XLA runs this
    loop on one core per device; more host devices with the rows sharded over them use more cores.
    GPU/TPU: wide tiles keep the chip busy; not tuned here (no accelerator was available), and the
    peak temporary is tile_n * tile_k * 4 bytes = 64 MiB.
    """
    if jax.default_backend() == "cpu":
        return 256, 128
    return 8192, 2048


def _row_chunks(n: int, tile_n: int) -> Tuple[int, int]:
    """Number of row chunks and rows per chunk (after padding) for n rows in chunks of <= tile_n.

    Prefers a chunk count that divides n with rows-per-chunk a multiple of 8, so no padding is
    needed and the rows of each chunk split evenly over up to 8 data shards.
    """
    nc_min = -(-n // tile_n)
    for multiple in (8, 4, 2, 1):
        for nc in range(nc_min, 2 * nc_min + 1):
            if n % nc == 0 and (n // nc) % multiple == 0:
                return nc, n // nc
    return nc_min, -(-n // nc_min)


def nearest_code(z: Array, codes: Array, *, tile_n: Optional[int] = None,
                 tile_k: Optional[int] = None,
                 precision: lax.Precision = lax.Precision.HIGHEST) -> Array:
    """Index of the nearest code (squared L2) for each row of z, without an N x K matrix.

    Args:
      z: [N, D] queries (any float dtype; the search runs in float32).
      codes: [K, D] codebook.
      tile_n: rows handled per step (over the whole, possibly sharded, batch). None: backend default.
      tile_k: codes compared per step. None: backend default.
      precision: matmul precision; HIGHEST keeps float32 distances on GPU (TF32) and TPU (bf16).

    Returns:
      int32 [N]: argmin_k |z_n - c_k|^2, the lowest index among exact ties (as jnp.argmin).

    The distance is computed as |c|^2 - 2 z.c (|z|^2 is the same for every code of a row) with |c|^2
    folded into the matmul as an extra column, so one float32 dot gives the distance block. A scan
    over K tiles keeps a running (min, index) per row; the tile's index is found as the smallest k
    where d == min, which XLA's CPU backend vectorises, unlike its variadic argmin reduce.

    Sharding (z's rows over a data axis, codes replicated), two cases:
    - Explicit mesh axes (`jax.make_mesh`'s default): z's type names its mesh and row axes, so the
      search runs per shard under `jax.shard_map`; each device tiles its own rows by tile_n.
    - Auto axes (`Mesh(...)`, sharding given to jit): the tracer does not say how z is sharded, so
      rows are cut into chunks *strided* through the batch: chunk j holds rows {i * n_chunks + j}.
      Each device's contiguous block of rows then maps onto the leading axis of
      z.reshape(rows_per_chunk, n_chunks, D), so every chunk is sharded like z and the loop runs
      without communication (no all-gather of z); contiguous chunks would put the sharded axis on
      the loop axis instead. Each device handles tile_n / n_shards rows a step.
    Small N (n <= tile_n, e.g. a training batch) is never chunked.
    """
    if z.ndim != 2 or codes.ndim != 2 or z.shape[1] != codes.shape[1]:
        raise ValueError(f"nearest_code needs z [N, D] and codes [K, D]; got {z.shape} and "
                         f"{codes.shape}.")
    default_n, default_k = _default_tiles()
    tile_n = tile_n or default_n
    tile_k = tile_k or default_k
    z = lax.stop_gradient(z).astype(jnp.float32)
    codes = lax.stop_gradient(codes).astype(jnp.float32)
    # Distances are translation invariant; centring on the codes' mean keeps |c|^2 and z.c small, so
    # the float32 cancellation in |c|^2 - 2 z.c stays small when data sit far from the origin.
    centre = jnp.mean(codes, axis=0)
    z, codes = z - centre, codes - centre
    mesh, row_axes = _explicit_row_sharding(z)
    codes = _replicate_explicit(codes)
    if row_axes:
        shards = math.prod(mesh.shape[a] for a in row_axes)
        if z.shape[0] % shards == 0:
            spec = P(row_axes if len(row_axes) > 1 else row_axes[0])
            local = functools.partial(_nearest_code_local, tile_n=tile_n, tile_k=tile_k,
                                      precision=precision)
            return jax.shard_map(local, mesh=mesh, in_specs=(spec, P()), out_specs=spec)(z, codes)
        # Rows that do not split evenly: gather them (rare; correct, not communication-free).
        z = _replicate_explicit(z)
    return _nearest_code_local(z, codes, tile_n=tile_n, tile_k=tile_k, precision=precision)


def _explicit_sharding(x: Array):
    """(mesh, spec) when x's type carries a sharding over explicit mesh axes, else (None, None)."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if not spec or all(s is None for s in spec):
        return None, None
    mesh = sharding.mesh
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    used = [a for s in spec if s is not None for a in (s if isinstance(s, tuple) else (s,))]
    if not all(types[a] == AxisType.Explicit for a in used):
        return None, None
    return mesh, spec


def _explicit_row_sharding(x: Array):
    """(mesh, mesh axes sharding x's first axis) under explicit sharding, else (None, ())."""
    mesh, spec = _explicit_sharding(x)
    if spec is None or spec[0] is None:
        return None, ()
    return mesh, (spec[0] if isinstance(spec[0], tuple) else (spec[0],))


def _replicate_explicit(x: Array) -> Array:
    """x replicated over its explicit mesh (a no-op for unsharded or auto-sharded x)."""
    mesh, spec = _explicit_sharding(x)
    if spec is None:
        return x
    return jax.sharding.reshard(x, jax.sharding.NamedSharding(mesh, P()))


def _tile_search(codes: Array, tile_k: int, precision):
    """search(rows [m, D]) -> nearest code index [m]: a scan over K tiles of the codes."""
    k, d = codes.shape
    # Codes augmented with their squared norm, padded to whole tiles: [n_tiles, tile_k, D + 1].
    tile_k = min(tile_k, k)
    n_tiles = -(-k // tile_k)
    pad_k = n_tiles * tile_k - k
    norms = jnp.sum(codes * codes, axis=1, keepdims=True)
    aug = jnp.concatenate([codes, norms], axis=1)
    if pad_k:
        pad = jnp.zeros((pad_k, d + 1), jnp.float32).at[:, d].set(_PAD_NORM)
        aug = jnp.concatenate([aug, pad], axis=0)
    aug = aug.reshape(n_tiles, tile_k, d + 1)
    offsets = jnp.arange(n_tiles, dtype=jnp.int32) * tile_k

    def search(zc: Array) -> Array:
        # [rows, D] -> [rows, D + 1] with -2 z and a 1 that picks up |c|^2.
        za = jnp.concatenate([-2.0 * zc, jnp.ones((zc.shape[0], 1), jnp.float32)], axis=1)

        def step(carry, tile):
            best_d, best_i = carry
            c_tile, offset = tile
            # [tile_k, rows]: reducing over the leading axis vectorises along rows on CPU.
            dist = jnp.dot(c_tile, za.T, precision=precision)
            tile_min = jnp.min(dist, axis=0)
            iota = lax.broadcasted_iota(jnp.int32, dist.shape, 0)
            tile_idx = jnp.min(jnp.where(dist == tile_min[None], iota, tile_k), axis=0)
            better = tile_min < best_d  # strict: an earlier tile keeps exact ties
            return (jnp.where(better, tile_min, best_d),
                    jnp.where(better, tile_idx + offset, best_i)), None

        # Built from zc so that, under shard_map, the carry has zc's (device-varying) type.
        init = (jnp.full_like(zc[:, 0], jnp.inf), jnp.zeros_like(zc[:, 0], jnp.int32))
        (_, best_i), _ = lax.scan(step, init, (aug, offsets))
        return best_i

    return search


def _nearest_code_local(z: Array, codes: Array, *, tile_n: int, tile_k: int,
                        precision) -> Array:
    """nearest_code on float32 inputs, tiled over K and (strided) over N."""
    n, d = z.shape
    if n == 0:
        return jnp.zeros((0,), jnp.int32)
    search = _tile_search(codes, tile_k, precision)
    if n <= tile_n:
        return search(z)
    n_chunks, rows = _row_chunks(n, tile_n)
    pad_n = n_chunks * rows - n
    if pad_n:  # masked rows: searched like any row, then dropped
        z = jnp.concatenate([z, jnp.zeros((pad_n, d), jnp.float32)], axis=0)
    strided = z.reshape(rows, n_chunks, d).transpose(1, 0, 2)  # chunk j = rows i * n_chunks + j
    idx = lax.map(search, strided)  # [n_chunks, rows]
    return idx.T.reshape(-1)[:n]


def nearest_code_in_place(z: Array, codes: Array, *, tile_n: Optional[int] = None,
                          tile_k: Optional[int] = None,
                          precision: lax.Precision = lax.Precision.HIGHEST) -> Array:
    """nearest_code for rows the caller holds whole: one device's array, or a shard's rows
    inside shard_map. Same result as nearest_code.

    Rows are read in contiguous chunks straight from z (dynamic slices) and centred chunk by
    chunk, so the scratch is O(tile) instead of nearest_code's centred and strided copies of z
    (which it needs for auto-sharded rows). For large N, e.g. k-means over millions of rows.
    """
    if z.ndim != 2 or codes.ndim != 2 or z.shape[1] != codes.shape[1]:
        raise ValueError(f"nearest_code_in_place needs z [N, D] and codes [K, D]; got {z.shape} "
                         f"and {codes.shape}.")
    default_n, default_k = _default_tiles()
    tile_n = tile_n or default_n
    codes = lax.stop_gradient(codes).astype(jnp.float32)
    centre = jnp.mean(codes, axis=0)  # see nearest_code: float32 cancellation
    search = _tile_search(codes - centre, tile_k or default_k, precision)
    n = z.shape[0]
    chunk = lambda a: lax.stop_gradient(a).astype(jnp.float32) - centre
    if n <= tile_n:
        return search(chunk(z))
    full = n // tile_n

    def body(j, out):
        rows = lax.dynamic_slice_in_dim(z, j * tile_n, tile_n)
        return lax.dynamic_update_slice_in_dim(out, search(chunk(rows)), j * tile_n, 0)

    out = lax.fori_loop(0, full, body, jnp.zeros_like(z[:, 0], jnp.int32))
    if n > full * tile_n:
        out = out.at[full * tile_n:].set(search(chunk(z[full * tile_n:])))
    return out


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
    """table[indices] (rows). Under explicit sharding the rows come out sharded like the indices."""
    mesh, spec = _explicit_sharding(indices)
    if spec is None:
        return jnp.take(table, indices, axis=0)
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
