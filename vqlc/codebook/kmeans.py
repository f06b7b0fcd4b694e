"""k-means in JAX: k-means++ seeding, Lloyd iterations, empty clusters re-seeded.

Assignments use the tiled `nearest_code` search, so no N x K distance matrix is ever held.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from vqlc.models.quantizers import nearest_code


def _sq_dist_to(x: jax.Array, c: jax.Array) -> jax.Array:
    return jnp.sum((x - c[None, :]) ** 2, axis=-1)


@functools.partial(jax.jit, static_argnums=(1,))
def kmeans_plus_plus(x: jax.Array, num_clusters: int, key: jax.Array) -> jax.Array:
    """k-means++ seeding: each new centre drawn with probability proportional to D(x)^2."""
    n = x.shape[0]
    first = jax.random.randint(key, (), 0, n)
    centres = jnp.zeros((num_clusters, x.shape[1]), x.dtype).at[0].set(x[first])
    d2 = _sq_dist_to(x, x[first])

    def body(i, carry):
        centres, d2 = carry
        k = jax.random.fold_in(key, i)
        total = jnp.sum(d2)
        # All points coincide with a centre: fall back to a uniform draw.
        logits = jnp.where(total > 0, jnp.log(jnp.maximum(d2, 1e-30)), jnp.zeros_like(d2))
        j = jax.random.categorical(k, logits)
        centres = centres.at[i].set(x[j])
        return centres, jnp.minimum(d2, _sq_dist_to(x, x[j]))

    centres, _ = jax.lax.fori_loop(1, num_clusters, body, (centres, d2))
    return centres


@jax.jit
def lloyd_step(x: jax.Array, centres: jax.Array, key: jax.Array):
    """One Lloyd iteration. Returns (new centres, inertia of the assignment, empty count)."""
    k = centres.shape[0]
    idx = nearest_code(x, centres)
    sums = jax.ops.segment_sum(x, idx, num_segments=k)
    counts = jax.ops.segment_sum(jnp.ones((x.shape[0],), x.dtype), idx, num_segments=k)
    inertia = jnp.sum((x - centres[idx]) ** 2)
    # Re-seed each empty cluster at a random data point so no centre is wasted.
    reseed = x[jax.random.randint(key, (k,), 0, x.shape[0])]
    empty = counts == 0
    new = jnp.where(empty[:, None], reseed, sums / jnp.maximum(counts, 1.0)[:, None])
    return new, inertia, jnp.sum(empty)


def fit(x, num_clusters: int, *, num_iters: int = 30, seed: int = 0, init: str = "k-means++",
        tol: float = 1e-4) -> np.ndarray:
    """Full-batch k-means. x: [N, D] float; returns float32 centres [num_clusters, D].

    Stops early when no centre moves by more than `tol` (the release's criterion).
    """
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 2 or x.shape[0] < num_clusters:
        raise ValueError(f"k-means needs [N, D] data with N >= {num_clusters}; got {x.shape}.")
    key = jax.random.key(seed)
    if init == "k-means++":
        centres = kmeans_plus_plus(x, num_clusters, key)
    elif init == "random":
        centres = x[jax.random.choice(key, x.shape[0], (num_clusters,), replace=False)]
    else:
        raise ValueError(f"init must be 'k-means++' or 'random', got {init!r}.")
    for i in range(num_iters):
        new, _, _ = lloyd_step(x, centres, jax.random.fold_in(key, i + 1))
        shift = float(jnp.max(jnp.linalg.norm(new - centres, axis=-1)))
        centres = new
        if shift < tol:
            break
    return np.asarray(centres, np.float32)


def inertia(x, centres) -> float:
    """Sum of squared distances of each point to its nearest centre."""
    x = jnp.asarray(x, jnp.float32)
    centres = jnp.asarray(centres, jnp.float32)
    return float(jnp.sum((x - centres[nearest_code(x, centres)]) ** 2))
