"""Nearest-neighbour searches, tiled so that no N x K (or N x N) distance matrix is ever held.

- `nearest_code` / `nearest_code_in_place`: index of the nearest code for each row (quantizers,
  k-means), scanning K in tiles with a running (min, index). Under a context mesh
  (`jax.set_mesh`) with a `model` axis, the codes are split along K over that axis: each device
  searches its slice and the (distance, index) minima are reduced across the axis.
- `take_rows`: table[indices], with the table split along its rows over the `model` axis.
- `nth_nearest_codes`: ids of each row's n-th nearest codes (token replacement figure).
- `kth_nearest_distances`: distance from each row to its k-th nearest reference point (the k-NN
  radius of precision/recall), scanning the references in tiles with a running top-k.
- `within_radii` / `precision_recall`: whether each sample lies inside any reference point's
  k-NN ball (Kynkaanniemi et al. 2019, as the ADM evaluator computes it), tiled over both sets.

Distances are squared L2 in float32 at HIGHEST matmul precision, computed as |a|^2 - 2 a.b + |b|^2
after centring (less float32 cancellation for data far from the origin).
This module imports nothing from vqlc: the quantizers and the analysis code import it.
"""
import functools
import math
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, PartitionSpec as P

Array = jax.Array

# The n-th nearest search keeps n distances per token per step: n is capped to bound memory.
MAX_RANK = 1000

# Padded codes get this (finite) squared norm so they never win. +inf would also never win on CPU, but
# a HIGHEST-precision matmul on TPU splits operands into bf16 pieces and inf - inf makes NaN there.
_PAD_NORM = float(jnp.finfo(jnp.float32).max)

# The mesh axis a codebook is split over along K (vqlc.parallel.MODEL_AXIS names the same axis).
CODEBOOK_AXIS = "model"


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
    if codebook_shards() > 1:
        return _nearest_code_split(z - centre, codes, centre, tile_n=tile_n, tile_k=tile_k,
                                   precision=precision)
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


def codebook_shards() -> int:
    """How many ways the context mesh (`jax.set_mesh`) splits a codebook along K: the size of its
    `model` axis, 1 without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or CODEBOOK_AXIS not in mesh.axis_names:
        return 1
    return int(mesh.shape[CODEBOOK_AXIS])


def _row_spec(n: int) -> Tuple[P, bool]:
    """(spec, rows split over `model` too) for n rows under the context mesh: split over every
    axis (as batches are, vqlc.parallel.batch_sharded) where that divides n; else over the axes
    other than `model` (each `model` group of devices then holds the same rows); else whole."""
    mesh = jax.sharding.get_abstract_mesh()
    every = tuple(a for a in mesh.axis_names if mesh.shape[a] > 1)
    others = tuple(a for a in every if a != CODEBOOK_AXIS)
    for axes in (every, others):
        if axes and n % math.prod(mesh.shape[a] for a in axes) == 0:
            return P(axes if len(axes) > 1 else axes[0]), CODEBOOK_AXIS in axes
    return P(), False


def _nearest_code_split(z: Array, codes: Array, centre: Array, *, tile_n: int, tile_k: int,
                        precision) -> Array:
    """nearest_code with the codes split along K over the `model` axis of the context mesh.

    Each device searches its slice of K (a K / shards slice of the codes is all it holds) and
    the minima are reduced across the axis (nearest_code_across). Rows split over `model` as
    well (a batch over every device) are first gathered within each `model` group, which then
    searches them together, and each device keeps its own. When K does not divide evenly, the codes are padded with copies of code 0, which
    lose every tie to it (their indices are larger), so padding never wins.
    """
    shards = codebook_shards()
    k, d = codes.shape
    pad = -k % shards
    if pad:
        codes = jnp.concatenate([codes, jnp.broadcast_to(codes[:1], (pad, d))], axis=0)
    rows, rows_over_model = _row_spec(z.shape[0])

    def local(z, codes, centre):
        n_own = z.shape[0]
        if rows_over_model:  # the group's rows: [shards * n_own, D], this device's block at
            z = lax.all_gather(z, CODEBOOK_AXIS, tiled=True)  # position axis_index
        idx = nearest_code_across(z, codes - centre, tile_n=tile_n, tile_k=tile_k,
                                  precision=precision)
        shard = lax.axis_index(CODEBOOK_AXIS)
        return lax.dynamic_slice_in_dim(idx, shard * n_own, n_own) if rows_over_model else idx

    # check_vma off: the per-shard scan carries start replicated and become device-varying; no
    # gradient flows through a search.
    return jax.shard_map(local, in_specs=(rows, P(CODEBOOK_AXIS, None), P()), out_specs=rows,
                         check_vma=False)(z, codes, centre)


def nearest_code_across(z: Array, codes: Array, *, axis: str = CODEBOOK_AXIS,
                        tile_n: Optional[int] = None, tile_k: Optional[int] = None,
                        precision=lax.Precision.HIGHEST) -> Array:
    """Inside shard_map: the global nearest-code index of each row of z, where every device of
    `axis` holds the same rows z [N, D] and its own slice `codes` [K / shards, D] of a codebook
    split along K (slice i = codes i * K/shards ...). z and codes must be centred on the same
    point (e.g. the whole codebook's mean), so distances compare across devices.

    Each device searches its slice, then two all-reduces over `axis` pick the smallest distance
    and, among the devices that reach it, the lowest index (the unsplit search's tie rule)."""
    default_n, default_k = _default_tiles()
    dist, idx = _nearest_code_local(z, codes, tile_n=tile_n or default_n,
                                    tile_k=tile_k or default_k, precision=precision,
                                    with_distance=True)
    idx = idx + lax.axis_index(axis) * codes.shape[0]
    best = lax.pmin(dist, axis)
    return lax.pmin(jnp.where(dist == best, idx, jnp.iinfo(jnp.int32).max), axis)


def take_rows(table: Array, indices: Array) -> Array:
    """table[indices] along rows: [K, ...] and int [...] -> [..., ...], differentiable in table.

    Under a context mesh with a `model` axis of size > 1, the table is taken to be split along K
    over it (as codebooks are): each device picks the rows it holds (zeros elsewhere) and a sum
    over the axis completes them, so the whole table is never gathered onto one device (only
    the indices move).
    """
    shards = codebook_shards()
    if shards == 1:
        return jnp.take(table, indices, axis=0)
    k = table.shape[0]
    if k % shards:
        raise ValueError(f"take_rows over a codebook split {shards} ways needs K divisible by "
                         f"{shards}; got K = {k}.")
    flat = indices.reshape(-1).astype(jnp.int32)
    rows, rows_over_model = _row_spec(flat.shape[0])

    def local(table, ids):
        if rows_over_model:  # the ids of the whole `model` group (see _nearest_code_split)
            ids = lax.all_gather(ids, CODEBOOK_AXIS, tiled=True)
        ids = ids - lax.axis_index(CODEBOOK_AXIS) * table.shape[0]
        mine = (ids >= 0) & (ids < table.shape[0])
        picked = jnp.take(table, jnp.where(mine, ids, 0), axis=0)
        mask = mine.reshape(mine.shape + (1,) * (picked.ndim - 1))
        picked = jnp.where(mask, picked, jnp.zeros_like(picked))
        if rows_over_model:  # sum over the group, each device keeping its own block of rows
            return lax.psum_scatter(picked, CODEBOOK_AXIS, tiled=True)
        return lax.psum(picked, CODEBOOK_AXIS)

    out = jax.shard_map(local, in_specs=(P(CODEBOOK_AXIS), rows), out_specs=rows)(table, flat)
    return out.reshape(indices.shape + table.shape[1:])


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
    """search(rows [m, D]) -> (|c|^2 - 2 z.c of the nearest code [m], its index [m]): a scan
    over K tiles of the codes."""
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
        (best_d, best_i), _ = lax.scan(step, init, (aug, offsets))
        return best_d, best_i

    return search


def _nearest_code_local(z: Array, codes: Array, *, tile_n: int, tile_k: int,
                        precision, with_distance: bool = False):
    """nearest_code on float32 inputs, tiled over K and (strided) over N; with_distance: also
    the nearest code's |c|^2 - 2 z.c (a float32 [N])."""
    n, d = z.shape
    if n == 0:
        empty = jnp.zeros((0,), jnp.int32)
        return (empty.astype(jnp.float32), empty) if with_distance else empty
    search = _tile_search(codes, tile_k, precision)
    if n <= tile_n:
        out = search(z)
        return out if with_distance else out[1]
    n_chunks, rows = _row_chunks(n, tile_n)
    pad_n = n_chunks * rows - n
    if pad_n:  # masked rows: searched like any row, then dropped
        z = jnp.concatenate([z, jnp.zeros((pad_n, d), jnp.float32)], axis=0)
    strided = z.reshape(rows, n_chunks, d).transpose(1, 0, 2)  # chunk j = rows i * n_chunks + j
    dist, idx = lax.map(search, strided)  # [n_chunks, rows] each
    unstride = lambda a: a.T.reshape(-1)[:n]
    return (unstride(dist), unstride(idx)) if with_distance else unstride(idx)


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
        return search(chunk(z))[1]
    full = n // tile_n

    def body(j, out):
        rows = lax.dynamic_slice_in_dim(z, j * tile_n, tile_n)
        return lax.dynamic_update_slice_in_dim(out, search(chunk(rows))[1], j * tile_n, 0)

    out = lax.fori_loop(0, full, body, jnp.zeros_like(z[:, 0], jnp.int32))
    if n > full * tile_n:
        out = out.at[full * tile_n:].set(search(chunk(z[full * tile_n:]))[1])
    return out


# ----------------------------------------------------------------------------------------------
# n-th nearest codes

def _default_tile_n(k: int) -> int:
    """Tokens per chunk: the chunk's [tile_n, K] distance block is ~16 MB on CPU (measured: 32
    and 128 tokens a chunk run at the same speed), ~256 MB on accelerators."""
    budget = 2**22 if jax.default_backend() == "cpu" else 2**26
    return int(np.clip(budget // k, 8, 8192))


@functools.partial(jax.jit, static_argnames=("cols", "n_max"))
def _nth_nearest_chunk(z, codes, norms, *, cols: tuple, n_max: int):
    """Ranks `cols` (0-based) of each row's codes sorted by squared distance: [rows, len(cols)]."""
    # |z|^2 is the same for every code of a row: |c|^2 - 2 z.c ranks codes as |z - c|^2 does.
    dist = norms[None, :] - 2.0 * jnp.dot(z, codes.T, precision=lax.Precision.HIGHEST)
    # top_k keeps the lower index among equal values: exact ties go to the lowest code id, as
    # argmin and quantizers.nearest_code.
    _, idx = lax.top_k(-dist, n_max)
    return idx[:, jnp.asarray(cols)]


def nth_nearest_codes(z, codes, ns: Sequence[int], *, tile_n: Optional[int] = None) -> np.ndarray:
    """int32 [N, len(ns)]: for each row of z [N, D], the id of its n-th nearest code (squared L2,
    n = 1 the nearest) in codes [K, D], for each n in ns (each in [1, min(K, MAX_RANK)]).

    Memory is bounded for any N: rows go in chunks of tile_n (default: ~16 MB of distances on
    CPU, e.g. 41 rows at K = 100,000), each chunk a [tile_n, K] distance block and one top-max(ns)
    selection. Distances are |c|^2 - 2 z.c after centring on the codes' mean (as
    quantizers.nearest_code), float32 at HIGHEST precision. Exact ties rank the lower id first.
    Measured on a busy 2-core CPU at K = 100,000, D = 8: ~1,100 tokens/s for max(ns) = 50,
    ~320 tokens/s for max(ns) = 1000.
    """
    z = np.asarray(z, np.float32)
    codes = np.asarray(codes, np.float32)
    if z.ndim != 2 or codes.ndim != 2 or z.shape[1] != codes.shape[1]:
        raise ValueError(f"nth_nearest_codes needs z [N, D] and codes [K, D]; got {z.shape} "
                         f"and {codes.shape}.")
    ns = tuple(int(n) for n in ns)
    k, d = codes.shape
    if not ns or min(ns) < 1 or max(ns) > min(k, MAX_RANK):
        raise ValueError(f"Each n must lie in [1, min(K, {MAX_RANK})] = [1, {min(k, MAX_RANK)}]; "
                         f"got {list(ns)}.")
    tile_n = tile_n or _default_tile_n(k)
    # Centring keeps |c|^2 and z.c small: less float32 cancellation for data far from 0.
    centre = codes.mean(axis=0)
    c = jnp.asarray(codes - centre)
    norms = jnp.sum(c * c, axis=1)
    cols = tuple(n - 1 for n in ns)
    out = np.zeros((z.shape[0], len(ns)), np.int32)
    zc = z - centre
    for start in range(0, z.shape[0], tile_n):
        rows = zc[start:start + tile_n]
        m = rows.shape[0]
        if m < tile_n and z.shape[0] > tile_n:  # one shape for every chunk: one compilation
            rows = np.concatenate([rows, np.zeros((tile_n - m, d), np.float32)])
        out[start:start + m] = np.asarray(
            _nth_nearest_chunk(jnp.asarray(rows), c, norms, cols=cols, n_max=max(ns)))[:m]
    return out


# ----------------------------------------------------------------------------------------------
# k-NN radii and precision/recall (Kynkaanniemi et al. 2019; the ADM evaluator's ManifoldEstimator)


def _default_pair_tiles() -> Tuple[int, int]:
    """(rows, cols) of one pairwise distance block: 4 MiB of float32 on CPU, 64 MiB elsewhere."""
    if jax.default_backend() == "cpu":
        return 1024, 1024
    return 4096, 4096


def _pad_rows(x: np.ndarray, multiple: int) -> np.ndarray:
    pad = (-x.shape[0]) % multiple
    if pad:
        x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
    return x


def _pair_sq_dist(a: Array, a_norm: Array, b: Array, b_norm: Array) -> Array:
    """[rows, cols] squared L2 distances, float32, clamped at 0 (cancellation can go below)."""
    ab = jnp.dot(a, b.T, precision=lax.Precision.HIGHEST)
    return jnp.maximum(a_norm[:, None] + b_norm[None, :] - 2.0 * ab, 0.0)


def _prepare(x, refs) -> Tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, np.float32)
    refs = np.asarray(refs, np.float32)
    if x.ndim != 2 or refs.ndim != 2 or x.shape[1] != refs.shape[1]:
        raise ValueError(f"expected x [N, D] and refs [M, D]; got {x.shape} and {refs.shape}.")
    centre = refs.mean(axis=0, dtype=np.float64).astype(np.float32) if len(refs) else 0.0
    return x - centre, refs - centre


def _row_mesh(mesh) -> Tuple[Optional[object], int]:
    if mesh is None:
        return None, 1
    axis = mesh.axis_names[0]
    return mesh, int(mesh.shape[axis])


def _shard_rows(fn, mesh, n_row_args: int, n_rep_args: int, out_row: int, out_rep: int = 0,
                reduce_rep=None):
    """fn over row shards of its first n_row_args inputs (the rest replicated) under shard_map."""
    if mesh is None:
        return fn
    axis = mesh.axis_names[0]
    in_specs = (P(axis),) * n_row_args + (P(),) * n_rep_args
    out_specs = (P(axis),) * out_row + (P(),) * out_rep
    if len(out_specs) == 1:
        out_specs = out_specs[0]
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


@functools.partial(jax.jit, static_argnames=("k", "tile_rows", "tile_cols", "mesh"))
def _kth_nearest_jit(x, refs, n_refs, *, k: int, tile_rows: int, tile_cols: int, mesh):
    def local(x, refs, n_refs):
        n, d = x.shape
        ref_tiles = refs.reshape(-1, tile_cols, d)
        ref_norms = jnp.sum(ref_tiles * ref_tiles, axis=-1)
        cols = jnp.arange(ref_tiles.shape[0] * tile_cols, dtype=jnp.int32).reshape(-1, tile_cols)

        def one_row_tile(rows):
            r_norm = jnp.sum(rows * rows, axis=-1)

            def step(best, tile):
                b, b_norm, idx = tile
                dist = _pair_sq_dist(rows, r_norm, b, b_norm)
                dist = jnp.where(idx[None, :] < n_refs, dist, jnp.inf)  # padded refs never win
                both = jnp.concatenate([best, dist], axis=1)
                neg, _ = lax.top_k(-both, k)  # the k smallest so far, ascending
                return -neg, None

            init = jnp.full((rows.shape[0], k), jnp.inf, jnp.float32) + 0.0 * rows[:, :1]
            best, _ = lax.scan(step, init, (ref_tiles, ref_norms, cols))
            return best[:, k - 1]

        return lax.map(one_row_tile, x.reshape(-1, tile_rows, d)).reshape(n)

    fn = _shard_rows(local, mesh, 1, 2, 1)
    return fn(x, refs, n_refs)


def kth_nearest_distances(x, refs, k: int, *, tile_rows: Optional[int] = None,
                          tile_cols: Optional[int] = None, mesh=None) -> np.ndarray:
    """float32 [N]: squared L2 distance from each row of x [N, D] to its k-th nearest row of
    refs [M, D] (k = 1: the nearest; a row of x that is also in refs is its own nearest, at 0).

    No N x M matrix: x goes in row tiles; for each, refs are scanned in column tiles keeping a
    running top-k, so memory is O(tile_rows * (tile_cols + k)) besides the inputs. Distances are
    float32 (HIGHEST precision), |a|^2 + |b|^2 - 2 a.b after centring on refs' mean, clamped at
    0. With ``mesh`` (a 1-D jax Mesh), x's row tiles are split over its devices (refs
    replicated). For precision/recall's k-NN radius use :func:`manifold_radii`.
    """
    x, refs = _prepare(x, refs)
    k = int(k)
    if not 1 <= k <= refs.shape[0]:
        raise ValueError(f"k must lie in [1, {refs.shape[0]}] (the number of refs); got {k}.")
    n = x.shape[0]
    if n == 0:
        return np.zeros((0,), np.float32)
    dr, dc = _default_pair_tiles()
    mesh, shards = _row_mesh(mesh)
    tile_rows = min(tile_rows or dr, -(-n // shards))
    tile_cols = min(tile_cols or dc, refs.shape[0])
    xp = _pad_rows(x, tile_rows * shards)
    rp = _pad_rows(refs, tile_cols)
    out = _kth_nearest_jit(jnp.asarray(xp), jnp.asarray(rp), jnp.int32(refs.shape[0]), k=k,
                           tile_rows=tile_rows, tile_cols=tile_cols, mesh=mesh)
    return np.asarray(out)[:n]


def manifold_radii(features, k: int = 3, **kwargs) -> np.ndarray:
    """float32 [N]: squared distance from each feature to its k-th nearest *other* feature of
    the same set (the radius of its k-NN ball), as the ADM evaluator's ``manifold_radii``: the
    (k + 1)-th smallest distance with the point itself counted (an exact duplicate counts as a
    neighbour at distance 0)."""
    return kth_nearest_distances(features, features, int(k) + 1, **kwargs)


@functools.partial(jax.jit, static_argnames=("tile_rows", "tile_cols", "mesh"))
def _mutual_jit(a, radii_a, b, radii_b, *, tile_rows: int, tile_cols: int, mesh):
    axis = None if mesh is None else mesh.axis_names[0]

    def local(a, radii_a, b, radii_b):
        n, d = a.shape
        b_tiles = b.reshape(-1, tile_cols, d)
        b_norms = jnp.sum(b_tiles * b_tiles, axis=-1)
        rb_tiles = radii_b.reshape(-1, tile_cols)

        def one_row_tile(b_in, row_tile):
            rows, ra = row_tile
            r_norm = jnp.sum(rows * rows, axis=-1)

            def step(a_in, tile):
                bt, bn, rb, b_in_t = tile
                dist = _pair_sq_dist(rows, r_norm, bt, bn)
                a_in = a_in | jnp.any(dist <= rb[None, :], axis=1)
                b_in_t = b_in_t | jnp.any(dist <= ra[:, None], axis=0)
                return a_in, b_in_t

            init = jnp.zeros((rows.shape[0],), bool) & (ra > jnp.inf)
            a_in, b_in = lax.scan(step, init, (b_tiles, b_norms, rb_tiles, b_in))
            return b_in, a_in

        b_in0 = jnp.zeros(rb_tiles.shape, bool) & (radii_a[0] > jnp.inf)
        b_in, a_in = lax.scan(one_row_tile, b_in0,
                              (a.reshape(-1, tile_rows, d), radii_a.reshape(-1, tile_rows)))
        b_in = b_in.reshape(-1)
        if axis is not None:  # each device saw its own rows of a: OR over devices
            b_in = lax.pmax(b_in.astype(jnp.int32), axis).astype(bool)
        return a_in.reshape(n), b_in

    fn = _shard_rows(local, mesh, 2, 2, 1, 1)
    return fn(a, radii_a, b, radii_b)


def mutual_within_radii(a, radii_a, b, radii_b, *, tile_rows: Optional[int] = None,
                        tile_cols: Optional[int] = None, mesh=None) -> Tuple[np.ndarray,
                                                                            np.ndarray]:
    """(a_in [Na], b_in [Nb]) bool: a_in[i] = some b_j has |a_i - b_j|^2 <= radii_b[j] (a_i lies
    in the union of b's k-NN balls); b_in[j] = some a_i has |a_i - b_j|^2 <= radii_a[i].

    One pass over Na x Nb distances in tiles (both directions from the same block, as ADM's
    ``evaluate_pr``), never the whole matrix. Radii are squared distances (:func:`manifold_radii`).
    With ``mesh``, a's row tiles are split over the devices and b_in is OR-ed across them.
    """
    a, b = _prepare(a, b)
    radii_a = np.asarray(radii_a, np.float32).reshape(-1)
    radii_b = np.asarray(radii_b, np.float32).reshape(-1)
    if radii_a.shape[0] != a.shape[0] or radii_b.shape[0] != b.shape[0]:
        raise ValueError(f"need one radius per row: a {a.shape[0]} vs {radii_a.shape[0]}, "
                         f"b {b.shape[0]} vs {radii_b.shape[0]}.")
    na, nb = a.shape[0], b.shape[0]
    if na == 0 or nb == 0:
        return np.zeros((na,), bool), np.zeros((nb,), bool)
    dr, dc = _default_pair_tiles()
    mesh, shards = _row_mesh(mesh)
    tile_rows = min(tile_rows or dr, -(-na // shards))
    tile_cols = min(tile_cols or dc, nb)
    # Padded rows get radius -1: they contain nothing (distances are >= 0) and are dropped.
    ap, bp = _pad_rows(a, tile_rows * shards), _pad_rows(b, tile_cols)
    rap = np.full((ap.shape[0],), -1.0, np.float32)
    rap[:na] = radii_a
    rbp = np.full((bp.shape[0],), -1.0, np.float32)
    rbp[:nb] = radii_b
    a_in, b_in = _mutual_jit(jnp.asarray(ap), jnp.asarray(rap), jnp.asarray(bp),
                             jnp.asarray(rbp), tile_rows=tile_rows, tile_cols=tile_cols,
                             mesh=mesh)
    return np.asarray(a_in)[:na], np.asarray(b_in)[:nb]


def precision_recall(real, fake, k: int = 3, **kwargs) -> Tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of ``fake`` against ``real``
    features, as the ADM evaluator computes them: precision = fraction of fake points inside
    the union of real points' k-NN balls, recall = fraction of real points inside the union of
    fake points' k-NN balls (k = 3, radii counted without the point itself).

    ``kwargs`` (tile_rows, tile_cols, mesh) go to the tiled searches.
    """
    radii_real = manifold_radii(real, k, **kwargs)
    radii_fake = manifold_radii(fake, k, **kwargs)
    real_in, fake_in = mutual_within_radii(real, radii_real, fake, radii_fake, **kwargs)
    return float(np.mean(fake_in)), float(np.mean(real_in))
