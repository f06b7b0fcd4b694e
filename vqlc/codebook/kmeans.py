"""k-means in JAX for building frozen codebooks, from a few thousand points to paper scale.

Three entry points, one Lloyd iteration underneath:
- `fit(x, K)`: data in host memory; placed once on the devices (rows sharded over all of them) and
  clustered by full-batch Lloyd, or by mini-batch k-means when `batch_size` is set.
- `fit_streaming(chunks, K)`: data larger than memory (feature shards on disk); every iteration
  streams the chunks through the devices and accumulates per-centre sums and counts.
- `fit_per_class(x, labels, k)`: the release's recipe (k centres per class), with many classes
  clustered at once as one batched computation, classes sharded over the devices.

Memory: the assignment uses the tiled `nearest_code_in_place` search, so no N x K distance
matrix and no copy of the rows exists; per-centre statistics are segment sums. Each device holds its rows, the centres and O(tile) scratch.
Many centres (`centre_shards` > 1, for `fit` and `fit_streaming`): the centres are split along K
over a `model` axis of that many devices, the rows over the rest (`data`); each device assigns
its data group's rows against its slice of the centres, the (distance, index) minima are reduced
over `model` (vqlc.neighbors.nearest_code_across), and each device sums only the rows assigned
to its own centres: no device holds all K centres or their statistics.
Determinism: a seed fixes the initial centres and every re-seeding; devices only change the order
of float32 sums (results agree to rounding, tested on 1 vs 4 devices).
"""
import functools
import logging
import time
from typing import Callable, Iterable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vqlc.neighbors import CODEBOOK_AXIS, nearest_code_across, nearest_code_in_place

_AXIS = "data"
INITS = ("random", "k-means++")
# Rows per host->device transfer when a numpy array (or memmap) is consumed in pieces.
_HOST_CHUNK_ROWS = 65_536


# ----------------------------------------------------------------------------- devices and data


def _data_mesh(devices: Optional[Sequence[jax.Device]], centre_shards: int = 1) -> Mesh:
    """(data,) over the devices, or (data, model) with the centres split `centre_shards` ways."""
    # Default: this process's devices (in a multi-process run each process clusters on its own).
    devices = list(devices) if devices is not None else jax.local_devices()
    if centre_shards == 1:
        return Mesh(np.asarray(devices), (_AXIS,))
    if centre_shards < 1 or len(devices) % centre_shards:
        raise ValueError(f"centre_shards={centre_shards} must divide the {len(devices)} devices.")
    return Mesh(np.asarray(devices).reshape(-1, centre_shards), (_AXIS, CODEBOOK_AXIS))


def _row_shards(mesh: Mesh) -> int:
    return mesh.shape[_AXIS]


def _put_centres(centres, mesh: Mesh) -> jax.Array:
    """Centres on the mesh: whole on every device, or split along K over `model`."""
    split = CODEBOOK_AXIS in mesh.axis_names
    return jax.device_put(centres, NamedSharding(mesh, P(CODEBOOK_AXIS) if split else P()))


def _put_rows(x: np.ndarray, mesh: Mesh, rows: Optional[int] = None):
    """Pads x with zero rows to `rows` (default: a multiple of the device count) and shards it.

    Returns (x on devices, weights on devices): weight 1 for real rows, 0 for padding. Zero rows
    add nothing to the sums, and their zero weight keeps them out of the counts.
    """
    n = x.shape[0]
    shards = _row_shards(mesh)
    rows = rows or -(-max(n, 1) // shards) * shards
    w = np.zeros((rows,), np.float32)
    w[:n] = 1.0
    if rows != n:
        x = np.concatenate([x, np.zeros((rows - n, x.shape[1]), np.float32)])
    sharding = NamedSharding(mesh, P(_AXIS))
    return jax.device_put(np.asarray(x, np.float32), sharding), jax.device_put(w, sharding)


def _check_data(x_shape: tuple, num_clusters: int) -> None:
    if len(x_shape) != 2:
        raise ValueError(f"k-means needs [N, D] data; got shape {x_shape}.")
    if x_shape[0] < num_clusters:
        raise ValueError(f"k-means needs N >= {num_clusters} points for {num_clusters} clusters; "
                         f"got N = {x_shape[0]}.")
    if num_clusters < 1:
        raise ValueError(f"num_clusters must be >= 1, got {num_clusters}.")


def _check_split(num_clusters: int, centre_shards: int) -> None:
    if num_clusters % centre_shards:
        raise ValueError(f"num_clusters={num_clusters} must be divisible by "
                         f"centre_shards={centre_shards}, the ways the centres are split.")


def _check_init(init: str) -> None:
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}.")


def _array_chunks(x: np.ndarray, rows: int = _HOST_CHUNK_ROWS) -> Callable[[], Iterator]:
    return lambda: (x[i:i + rows] for i in range(0, x.shape[0], rows))


# ----------------------------------------------------------------------------- initialisation


def random_rows(chunks: Callable[[], Iterable[np.ndarray]], num_rows: int, seed) -> np.ndarray:
    """`num_rows` distinct rows drawn uniformly at random from a stream, in one pass.

    Every row gets a uniform priority from one seeded stream of random numbers; the rows with the
    smallest priorities win (a priority reservoir). The choice depends only on the seed and the
    row order, not on how the rows are cut into chunks, so in-memory and streaming fits start
    from the same centres.
    """
    rng = np.random.default_rng(seed)
    best_p = np.zeros((0,), np.float64)
    best_x = None
    for chunk in chunks():
        chunk = np.asarray(chunk, np.float32)
        p = rng.random(chunk.shape[0])
        keep = np.argsort(p, kind="stable")[:num_rows]  # no chunk can add more than num_rows
        cand_p = np.concatenate([best_p, p[keep]])
        cand_x = chunk[keep] if best_x is None else np.concatenate([best_x, chunk[keep]])
        order = np.argsort(cand_p, kind="stable")[:num_rows]
        best_p, best_x = cand_p[order], cand_x[order]
    if best_x is None or best_x.shape[0] < num_rows:
        raise ValueError(f"Need at least {num_rows} rows to draw from; the data has fewer.")
    return best_x


@functools.partial(jax.jit, static_argnums=(1,))
def kmeans_plus_plus(x: jax.Array, num_clusters: int, key: jax.Array) -> jax.Array:
    """k-means++ seeding: each new centre drawn with probability proportional to D(x)^2.

    Sequential in K (one pass over x per centre): good for small K; for tens of thousands of
    centres over millions of points use init='random' (the release's choice).
    """
    n = x.shape[0]
    mean = jnp.mean(x, axis=0)
    xc = x - mean  # centred: |x|^2 - 2 x.c + |c|^2 then cancels little in float32
    x2 = jnp.sum(xc * xc, axis=1)

    def sq_dist_to(c):  # a matrix-vector product: ~15x faster in the loop than sum((x - c)^2)
        return jnp.maximum(x2 - 2.0 * (xc @ c) + jnp.sum(c * c), 0.0)

    first = jax.random.randint(key, (), 0, n)
    centres = jnp.zeros((num_clusters, x.shape[1]), x.dtype).at[0].set(x[first])

    def body(i, carry):
        centres, d2 = carry
        u = jax.random.uniform(jax.random.fold_in(key, i))
        # Inverse-CDF draw: one random number per centre, not one per point.
        cdf = jnp.cumsum(d2)
        j = jnp.minimum(jnp.searchsorted(cdf, u * cdf[-1], side="right"), n - 1)
        # All points coincide with a centre: fall back to a uniform draw.
        j = jnp.where(cdf[-1] > 0, j, jnp.minimum((u * n).astype(jnp.int32), n - 1))
        return centres.at[i].set(x[j]), jnp.minimum(d2, sq_dist_to(xc[j]))

    centres, _ = jax.lax.fori_loop(1, num_clusters, body, (centres, sq_dist_to(xc[first])))
    return centres


# ----------------------------------------------------------------------------- global k-means


@functools.lru_cache(maxsize=None)
def _stats_fn(mesh: Mesh):
    """jitted (x, w, centres) -> (per-centre sums [K, D], counts [K]) over rows sharded on mesh.

    Each device assigns and sums its own rows; one psum of K x (D + 1) numbers combines them.
    """

    def local(x, w, centres):
        k = centres.shape[0]
        idx = nearest_code_in_place(x, centres)
        sums = jax.ops.segment_sum(x, idx, num_segments=k)  # padding rows are zero vectors
        counts = jax.ops.segment_sum(w, idx, num_segments=k)
        return jax.lax.psum(sums, _AXIS), jax.lax.psum(counts, _AXIS)

    if CODEBOOK_AXIS in mesh.axis_names:
        return _split_stats_fn(mesh)
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(_AXIS), P(_AXIS), P()),
                            out_specs=(P(), P()))
    return jax.jit(sharded)


def _split_stats_fn(mesh: Mesh):
    """_stats_fn with the centres split along K over `model`: sums and counts come out split
    the same way, each reduced over `data` only (where its centres live)."""

    def local(x, w, centres, centre):
        k = centres.shape[0]  # this device's slice
        idx = nearest_code_across(x - centre, centres - centre)
        own = idx - jax.lax.axis_index(CODEBOOK_AXIS) * k
        own = jnp.where((own >= 0) & (own < k), own, k)  # other devices' centres: dropped
        sums = jax.ops.segment_sum(x, own, num_segments=k + 1)[:k]
        counts = jax.ops.segment_sum(w, own, num_segments=k + 1)[:k]
        return jax.lax.psum(sums, _AXIS), jax.lax.psum(counts, _AXIS)

    split = P(CODEBOOK_AXIS)
    # check_vma off: the search's scan carries become device-varying (no gradients here).
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(_AXIS), P(_AXIS), split, P()),
                            out_specs=(split, split), check_vma=False)
    # The centres' mean, a D-vector, is the one number every device needs of all of them.
    return jax.jit(lambda x, w, c: sharded(x, w, c, jnp.mean(c, axis=0)))


@jax.jit
def _accumulate(acc, stats):
    return jax.tree.map(jnp.add, acc, stats)


@jax.jit
def _lloyd_update(centres, sums, counts):
    """Means of the assigned points; (new centres, max centre shift, empty mask)."""
    empty = counts == 0
    new = jnp.where(empty[:, None], centres, sums / jnp.maximum(counts, 1.0)[:, None])
    shift = jnp.max(jnp.where(empty, 0.0, jnp.linalg.norm(new - centres, axis=-1)))
    return new, shift, empty


@jax.jit
def _minibatch_update(centres, seen, sums, counts):
    """Sculley's mini-batch step: each centre moves toward its batch mean at rate n / seen."""
    seen = seen + counts
    rate = jnp.where(seen > 0, counts / jnp.maximum(seen, 1.0), 0.0)[:, None]
    means = sums / jnp.maximum(counts, 1.0)[:, None]
    return centres + rate * (means - centres), seen


class _Reseeder:
    """Replaces empty clusters with data rows drawn with a seeded generator (host side)."""

    def __init__(self, draw_rows: Callable[[np.random.Generator, int], np.ndarray], seed: int):
        self._draw_rows = draw_rows
        self._rng = np.random.default_rng([seed, 1])
        self.total = 0

    def __call__(self, centres: jax.Array, empty: np.ndarray) -> jax.Array:
        n_empty = int(empty.sum())
        if not n_empty:
            return centres
        self.total += n_empty
        rows = self._draw_rows(self._rng, n_empty)
        return centres.at[np.flatnonzero(empty)].set(jnp.asarray(rows, centres.dtype))


def _lloyd(stats_of: Callable[[jax.Array], tuple], centres: jax.Array, reseed: _Reseeder, *,
           num_iters: int, tol: float, label: str) -> jax.Array:
    """Lloyd iterations; stats_of(centres) -> (sums, counts) over the whole data set."""
    start = time.perf_counter()
    for it in range(num_iters):
        sums, counts = stats_of(centres)
        new, shift, empty = _lloyd_update(centres, sums, counts)
        empty = np.asarray(empty)
        centres = reseed(new, empty)
        shift = float(shift)
        logging.info("%s iteration %d/%d: max centre shift %.3g, %d empty clusters re-seeded "
                     "(%.1f s)", label, it + 1, num_iters, shift, int(empty.sum()),
                     time.perf_counter() - start)
        if shift < tol and not empty.any():
            break
    return centres


def fit(x, num_clusters: int, *, num_iters: int = 30, seed: int = 0,
        batch_size: Optional[int] = None, init: str = "k-means++", tol: float = 1e-4,
        devices: Optional[Sequence[jax.Device]] = None, centre_shards: int = 1) -> np.ndarray:
    """k-means of in-memory data. Returns float32 centres [num_clusters, D].

    Args:
      x: [N, D] array (numpy, memmap or jax); rows are sharded over `devices` (default: all).
      num_clusters: K.
      num_iters: Lloyd iterations (full batch), or passes over the data (mini-batch).
      seed: fixes the initial centres, the mini-batches and every re-seeding.
      batch_size: None for full-batch Lloyd; else rows per mini-batch step (global, over devices).
      init: 'k-means++' (D^2 sampling; sequential in K) or 'random' (K distinct data rows, the
        release's and faiss's choice).
      tol: full batch stops once no centre moves by more than tol (the release's criterion).
      centre_shards: split the centres along K over this many devices (see the module
        docstring); the rows go over the rest. k-means++ builds its initial centres on one
        device before they are split; init='random' never holds them whole on a device.
    """
    x = np.asarray(x, np.float32) if not isinstance(x, np.ndarray) else x
    _check_data(x.shape, num_clusters)
    _check_init(init)
    mesh = _data_mesh(devices, centre_shards)
    _check_split(num_clusters, centre_shards)
    if init == "random":
        centres = random_rows(_array_chunks(x), num_clusters, seed)
    else:
        centres = kmeans_plus_plus(jnp.asarray(x, jnp.float32), num_clusters, jax.random.key(seed))
    centres = _put_centres(centres, mesh)
    reseed = _Reseeder(lambda rng, n: x[np.sort(rng.choice(x.shape[0], n, replace=False))], seed)
    stats = _stats_fn(mesh)
    if batch_size:
        centres = _minibatch(x, centres, reseed, stats, mesh, batch_size=batch_size,
                             epochs=num_iters, seed=seed)
    else:
        xs, ws = _put_rows(np.asarray(x, np.float32), mesh)
        centres = _lloyd(lambda c: stats(xs, ws, c), centres, reseed, num_iters=num_iters,
                         tol=tol, label="k-means")
    return np.asarray(centres, np.float32)


def _minibatch(x: np.ndarray, centres: jax.Array, reseed: _Reseeder, stats, mesh: Mesh, *,
               batch_size: int, epochs: int, seed: int) -> jax.Array:
    """Mini-batch k-means: batches drawn without replacement within each epoch."""
    n = x.shape[0]
    batch_size = min(batch_size, n)
    rows = -(-batch_size // _row_shards(mesh)) * _row_shards(mesh)
    rng = np.random.default_rng([seed, 2])
    seen = jnp.zeros((centres.shape[0],), jnp.float32)
    steps = -(-n // batch_size)
    for epoch in range(epochs):
        order = rng.permutation(n)
        for s in range(steps):
            idx = np.sort(order[s * batch_size:(s + 1) * batch_size])  # sorted: memmap-friendly
            xs, ws = _put_rows(np.asarray(x[idx], np.float32), mesh, rows)
            sums, counts = stats(xs, ws, centres)
            centres, seen = _minibatch_update(centres, seen, sums, counts)
        # Centres no batch has reached this far are re-seeded at data rows.
        never = np.asarray(seen == 0)
        centres = reseed(centres, never)
        logging.info("mini-batch k-means epoch %d/%d: %d centres re-seeded", epoch + 1, epochs,
                     int(never.sum()))
    return centres


def fit_streaming(chunks: Callable[[], Iterable[np.ndarray]], num_clusters: int, *,
                  num_iters: int = 30, seed: int = 0, init: str = "random", tol: float = 1e-4,
                  devices: Optional[Sequence[jax.Device]] = None,
                  centre_shards: int = 1) -> np.ndarray:
    """Full-batch k-means of data streamed from disk (larger than memory).

    Args:
      chunks: zero-argument callable returning a fresh iterator over float32 [n_i, D] arrays
        (e.g. `FeatureShards(dir).iter_chunks`-style); called once for the initial centres and
        once per iteration. Chunks should be of similar size: each distinct size compiles once.
      Other arguments as `fit`; init must be 'random' (k-means++ needs the data in memory).

    Host -> device transfer of the next chunk overlaps with the search on the current one
    (JAX dispatch is asynchronous), so reading the shards is the only extra cost.
    """
    if init != "random":
        raise ValueError("fit_streaming supports init='random' only: k-means++ needs every point "
                         "in memory for each of the K draws. Use fit() for k-means++.")
    if num_clusters < 1:
        raise ValueError(f"num_clusters must be >= 1, got {num_clusters}.")
    mesh = _data_mesh(devices, centre_shards)
    _check_split(num_clusters, centre_shards)
    centres = _put_centres(random_rows(chunks, num_clusters, seed), mesh)
    stats = _stats_fn(mesh)
    reseed = _Reseeder(lambda rng, n: random_rows(chunks, n, int(rng.integers(2**62))), seed)

    def stats_of(c):
        acc = None
        for chunk in chunks():
            chunk = np.asarray(chunk, np.float32)
            if chunk.ndim != 2 or chunk.shape[1] != c.shape[1]:
                raise ValueError(f"Chunks must be [n, {c.shape[1]}]; got {chunk.shape}.")
            s = stats(*_put_rows(chunk, mesh), c)
            acc = s if acc is None else _accumulate(acc, s)
        return acc

    return np.asarray(_lloyd(stats_of, centres, reseed, num_iters=num_iters, tol=tol,
                             label="streaming k-means"), np.float32)


# ----------------------------------------------------------------------------- per-class k-means


def _class_stats(x: jax.Array, mask: jax.Array, centres: jax.Array):
    """One class: rows x [n, D] (mask [n]) and centres [k, D] -> (sums [k, D], counts [k]).

    Distances as [k, n] (|c|^2 - 2 c.x) so the min runs over the leading axis, which XLA's CPU
    backend vectorises along the rows; the index is the smallest k reaching the min (exact, as
    argmin). See _classes_per_step for how classes are batched.
    """
    k = centres.shape[0]
    d = (jnp.sum(centres * centres, axis=-1)[:, None]
         - 2.0 * jnp.dot(centres, x.T, precision=jax.lax.Precision.HIGHEST))
    best = jnp.min(d, axis=0, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, d.shape, 0)
    idx = jnp.min(jnp.where(d == best, iota, k), axis=0)
    sums = jax.ops.segment_sum(x, idx, num_segments=k)  # padding rows are zero vectors
    return sums, jax.ops.segment_sum(mask, idx, num_segments=k)


def _classes_per_step(num_classes: int) -> Optional[int]:
    """Classes searched together. CPU: one at a time (plain 2-D matmuls measured 1.7x faster
    than a batched one); accelerators: the whole block as one batched matmul, which keeps them
    busy (there a converged class is masked rather than skipped)."""
    return None if jax.default_backend() == "cpu" else num_classes


def _per_class_lloyd(x, mask, counts, centres, labels, seed, num_iters, tol):
    """Lloyd on a block of classes at once. x [C, n, D] (rows of class c first, then zero padding),
    mask [C, n], counts [C] real rows, centres [C, k, D], labels [C] (keys re-seeding); seed,
    num_iters and tol are traced scalars, so one compiled program serves every setting.

    A class stops moving once its max centre shift drops below tol, so its result equals running
    it alone; the loop ends when every class has converged or after num_iters.
    """
    num_classes, n, _ = x.shape
    k = centres.shape[1]
    keys = jax.vmap(lambda l: jax.random.fold_in(jax.random.key(seed), l))(labels)

    def step(carry):
        it, centres, done = carry
        # A converged class skips its search: classes converge at different iterations.
        def stats_unless_done(a):
            xc, mc, cc, dc = a
            return jax.lax.cond(dc, lambda: (jnp.zeros_like(cc), jnp.zeros_like(cc[:, 0])),
                                lambda: _class_stats(xc, mc, cc))

        sums, cnt = jax.lax.map(stats_unless_done, (x, mask, centres, done),
                                batch_size=_classes_per_step(num_classes))
        new = sums / jnp.maximum(cnt, 1.0)[..., None]
        # Empty clusters restart at random rows of their class (keyed by class and iteration).
        pick = jax.vmap(lambda key, m: jax.random.randint(
            jax.random.fold_in(key, it), (k,), 0, m))(keys, counts)
        reseed = jnp.take_along_axis(x, pick[..., None], axis=1)
        empty = cnt == 0
        new = jnp.where(empty[..., None], reseed, new)
        shift = jnp.max(jnp.where(empty, 0.0, jnp.linalg.norm(new - centres, axis=-1)), axis=-1)
        converged = (shift < tol) & ~jnp.any(empty, axis=-1)
        new = jnp.where(done[:, None, None], centres, new)
        return it + 1, new, done | converged

    def cond(carry):
        it, _, done = carry
        return (it < num_iters) & ~jnp.all(done)

    done = counts < 0  # all False; built from an input so that, under shard_map, it is per-device
    _, centres, _ = jax.lax.while_loop(cond, step, (jnp.int32(0), centres, done))
    return centres


@functools.lru_cache(maxsize=None)
def _per_class_fn(mesh: Mesh):
    """The per-class Lloyd with classes split over the devices; no communication at all."""
    spec = P(_AXIS)
    return jax.jit(jax.shard_map(_per_class_lloyd, mesh=mesh,
                                 in_specs=(spec,) * 5 + (P(),) * 3, out_specs=spec))


def fit_per_class(x, labels, clusters_per_class: int, *, num_iters: int = 30, seed: int = 0,
                  init: str = "random", tol: float = 1e-4,
                  classes_per_block: Optional[int] = None, block_bytes: int = 256 << 20,
                  devices: Optional[Sequence[jax.Device]] = None) -> np.ndarray:
    """k centres per class, as the release builds its 100 x 1,000-class codebook.

    Args:
      x: [N, D] features (numpy or memmap: rows are gathered class by class, never all at once).
      labels: [N] integer class of each row.
      clusters_per_class: k. Every class needs at least k rows.
      init: 'random' (k distinct rows of the class; the release) or 'k-means++'.
      classes_per_block: classes clustered together as one batched computation; default: as
        many as fit in `block_bytes` of padded data. Blocks are sharded over `devices`.

    Returns float32 [num_classes * k, D]: the k centres of each class, classes in sorted label
    order. Each class's result depends only on its own rows, the seed and its label.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != x.shape[0]:
        raise ValueError(f"labels must be [N] with N = {x.shape[0]} rows; got {labels.shape}.")
    _check_data(x.shape, clusters_per_class)
    _check_init(init)
    classes, class_counts = np.unique(labels, return_counts=True)
    if class_counts.min() < clusters_per_class:
        small = classes[class_counts < clusters_per_class]
        raise ValueError(f"{len(small)} classes have fewer than {clusters_per_class} rows "
                         f"(e.g. class {small[0]} has {class_counts.min()}); lower "
                         "clusters_per_class or use global k-means.")
    order = np.argsort(labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(class_counts)])
    mesh = _data_mesh(devices)
    shards = mesh.devices.size
    dim = x.shape[1]
    if classes_per_block is None:
        # Equal blocks under block_bytes of padded rows + distances, so none is mostly padding.
        per_class = int(class_counts.max()) * (dim + clusters_per_class) * 4
        num_blocks = -(-len(classes) * per_class // block_bytes)
        classes_per_block = -(-len(classes) // num_blocks)
    classes_per_block = -(-min(classes_per_block, len(classes)) // shards) * shards
    sharding = NamedSharding(mesh, P(_AXIS))
    lloyd = _per_class_fn(mesh)
    out = []
    for b in range(0, len(classes), classes_per_block):
        ids = list(range(b, min(b + classes_per_block, len(classes))))
        # Pad the block with copies of its last class so it splits evenly over the devices
        # and keeps one compiled shape; the copies' results are dropped.
        ids += [ids[-1]] * (classes_per_block - len(ids))
        n_max = int(class_counts[ids].max())
        xb = np.zeros((len(ids), n_max, dim), np.float32)
        mask = np.zeros((len(ids), n_max), np.float32)
        init_c = np.zeros((len(ids), clusters_per_class, dim), np.float32)
        for j, c in enumerate(ids):
            rows = np.sort(order[starts[c]:starts[c + 1]])
            xb[j, :len(rows)] = x[rows]
            mask[j, :len(rows)] = 1.0
            init_c[j] = _init_class(xb[j, :len(rows)], clusters_per_class, init,
                                    seed, int(classes[c]))
        put = lambda a: jax.device_put(a, sharding)
        key_data = (classes[ids].astype(np.int64) % (2**31)).astype(np.uint32)
        centres = lloyd(put(xb), put(mask), put(class_counts[ids].astype(np.int32)),
                        put(init_c), put(key_data), jnp.uint32(seed % (2**32)),
                        jnp.int32(num_iters), jnp.float32(tol))
        n_real = min(classes_per_block, len(classes) - b)
        out.append(np.asarray(centres[:n_real], np.float32).reshape(-1, dim))
        logging.info("per-class k-means: classes %d-%d of %d done", b + 1, b + n_real,
                     len(classes))
    return np.concatenate(out)


def _init_class(x: np.ndarray, k: int, init: str, seed: int, label: int) -> np.ndarray:
    """Initial centres of one class, from its rows only (so per-class == alone)."""
    if init == "random":
        return random_rows(_array_chunks(x), k, seed=[seed, 3, label])
    key = jax.random.fold_in(jax.random.key(seed), label % (2**31))
    return np.asarray(kmeans_plus_plus(jnp.asarray(x), k, key))


# ----------------------------------------------------------------------------- evaluation


@jax.jit
def _sq_error(x, w, centres):
    idx = nearest_code_in_place(x, centres)
    return jnp.sum(w * jnp.sum((x - centres[idx]) ** 2, axis=-1))


def inertia(x, centres) -> float:
    """Sum of squared distances of each point to its nearest centre.

    x: an [N, D] array (consumed in chunks of rows, so a memmap works) or a zero-argument callable
    returning an iterator over [n_i, D] chunks, as fit_streaming takes. Summed in float64.
    """
    centres = jnp.asarray(centres, jnp.float32)
    chunks = x if callable(x) else _array_chunks(x)
    total = 0.0
    for chunk in chunks():
        chunk = np.asarray(chunk, np.float32)
        rows = -(-chunk.shape[0] // 256) * 256  # few distinct shapes: few compilations
        w = np.zeros((rows,), np.float32)
        w[:chunk.shape[0]] = 1.0
        padded = np.zeros((rows, chunk.shape[1]), np.float32)
        padded[:chunk.shape[0]] = chunk
        total += float(_sq_error(padded, w, centres))
    return total
