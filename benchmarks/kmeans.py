"""k-means: vqlc (JAX) vs faiss-cpu and scikit-learn, same data, same K and iterations.

    pip install faiss-cpu scikit-learn        # or: pip install -e ".[bench]"
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/kmeans.py
    python benchmarks/kmeans.py --case global --k 10000 --iters 5      # a bigger K
    python benchmarks/kmeans.py --case per_class                      # 100 classes x 100 centres
    python benchmarks/kmeans.py --dim 64 --k 20000 --iters 5 --methods jax,jax_split2,jax_split4,faiss

Every method runs in its own subprocess on identical data (a seeded Gaussian mixture, so that the
clusters are real), reports wall time (initialisation + iterations; for JAX after a 1-iteration call that compiles,
itself reported as the cold start) and peak memory above the process's footprint once its data
was generated (VmHWM reset there), and saves its centres.
The parent then scores every set of centres with one exact function: inertia = sum of squared
distances of each point to its nearest centre (for per-class, to the nearest centre of its class).

Methods:
  jax          vqlc.codebook.kmeans.fit / fit_per_class: full-batch Lloyd, random init, tol=0 so
               every method runs the same number of iterations.
  jax_mb       vqlc mini-batch k-means (same batch size as scikit-learn's).
  jax_splitM   `jax` with the centres split M ways along K over a `model` axis
               (kmeans.fit(..., centre_shards=M); global case), on max(--host-devices, M)
               devices, the rows over the rest.
  faiss        faiss.Kmeans(d, k, niter=iters): full-batch Lloyd, random init.
  sklearn_mb   sklearn.cluster.MiniBatchKMeans(init='random', n_init=1, max_iter=iters,
               max_no_improvement=None: no early stop, all `iters` passes over the data).
JAX uses one CPU device per core (XLA_FLAGS=--xla_force_host_platform_device_count) so its rows
are sharded over both cores; faiss and scikit-learn use their own threads.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

METHODS = ("jax", "jax_mb", "faiss", "sklearn_mb")


def make_data(case: str, n: int, dim: int, classes: int, per_class: int, seed: int = 0):
    """A Gaussian mixture: global case 2,000 components; per-class case 20 per class."""
    rng = np.random.default_rng(seed)
    if case == "global":
        means = rng.standard_normal((2000, dim), dtype=np.float32)
        comp = rng.integers(0, len(means), n)
        x = means[comp] + 0.6 * rng.standard_normal((n, dim), dtype=np.float32)
        return x, None
    means = rng.standard_normal((classes, 20, dim), dtype=np.float32)
    labels = np.repeat(np.arange(classes), per_class)
    comp = rng.integers(0, 20, labels.shape[0])
    x = means[labels, comp] + 0.6 * rng.standard_normal((labels.shape[0], dim), dtype=np.float32)
    return x, labels


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> None:
    """Resets VmHWM (Linux >= 4.0) so the peak counts from here, not data generation's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def cluster(args, x, labels, k: int, iters: int) -> np.ndarray:
    """Runs args.method on the data for `iters` iterations; returns the centres."""
    if args.method.startswith("jax"):
        from vqlc.codebook import kmeans
    if args.case == "global":
        if args.method == "jax":
            return kmeans.fit(x, k, num_iters=iters, seed=0, init="random", tol=0.0)
        if args.method == "jax_mb":
            return kmeans.fit(x, k, num_iters=iters, seed=0, init="random",
                              batch_size=args.batch_size)
        if args.method.startswith("jax_split"):
            return kmeans.fit(x, k, num_iters=iters, seed=0, init="random", tol=0.0,
                              centre_shards=_split_ways(args.method))
        if args.method == "faiss":
            import faiss
            km = faiss.Kmeans(args.dim, k, niter=iters, seed=1, verbose=False,
                              max_points_per_centroid=max(256, -(-args.n // k)))
            km.train(x)
            return km.centroids
        from sklearn.cluster import MiniBatchKMeans
        return MiniBatchKMeans(k, init="random", n_init=1, max_iter=iters,
                               batch_size=args.batch_size, random_state=0,
                               max_no_improvement=None,
                               compute_labels=False).fit(x).cluster_centers_
    if args.method == "jax":
        return kmeans.fit_per_class(x, labels, k, num_iters=iters, seed=0, tol=0.0)
    if args.method == "jax_mb":
        raise SystemExit("jax_mb: per-class mini-batch is not a vqlc mode; skipped")
    out = []
    for cls in range(args.classes):
        xc = np.ascontiguousarray(x[labels == cls])
        if args.method == "faiss":
            import faiss
            km = faiss.Kmeans(args.dim, k, niter=iters, seed=1, verbose=False,
                              min_points_per_centroid=1)
            km.train(xc)
            out.append(km.centroids)
        else:
            from sklearn.cluster import MiniBatchKMeans
            out.append(MiniBatchKMeans(k, init="random", n_init=1, max_iter=iters,
                                       batch_size=args.batch_size, random_state=0,
                                       max_no_improvement=None,
                                       compute_labels=False).fit(xc).cluster_centers_)
    return np.concatenate(out)


def _split_ways(method: str) -> int:
    return int(method[len("jax_split"):]) if method.startswith("jax_split") else 1


def run_worker(args) -> None:
    """One method on one case, in this process; writes centres and a JSON record to args.out."""
    if args.method.startswith("jax"):
        devices = max(args.host_devices, _split_ways(args.method))
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={devices}")
        import jax  # noqa: F401  (libraries imported before measuring the baseline)
        from vqlc.codebook import kmeans  # noqa: F401
    elif args.method == "faiss":
        import faiss  # noqa: F401
    else:
        from sklearn.cluster import MiniBatchKMeans  # noqa: F401
    x, labels = make_data(args.case, args.n, args.dim, args.classes, args.per_class)
    base = _status_mb("VmRSS")
    _reset_peak_rss()
    k = args.k
    if args.method.startswith("jax"):
        # A 1-iteration call first: compilation and device placement, timed on its own, so the
        # table shows both the cold start and the compiled speed.
        start = time.perf_counter()
        cluster(args, x, labels, k, iters=1)
        cold = time.perf_counter() - start
    start = time.perf_counter()
    c = cluster(args, x, labels, k, iters=args.iters)
    wall = time.perf_counter() - start
    peak = _status_mb("VmHWM")
    np.save(os.path.join(args.out, f"{args.method}.npy"), np.asarray(c, np.float32))
    with open(os.path.join(args.out, f"{args.method}.json"), "w") as f:
        json.dump({"wall_s": wall, "cold_1iter_s": cold if args.method.startswith("jax") else None,
                   "peak_extra_mb": peak - base, "data_mb": x.nbytes / 2**20}, f)


def score(case: str, x: np.ndarray, labels, centres: np.ndarray, k: int) -> float:
    from vqlc.codebook import kmeans
    if case == "global":
        return kmeans.inertia(x, centres)
    return sum(kmeans.inertia(x[labels == c], centres[c * k:(c + 1) * k])
               for c in range(int(labels.max()) + 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", choices=("global", "per_class"), default="global")
    p.add_argument("--n", type=int, default=200_000, help="points (global case)")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--k", type=int, default=None,
                   help="centres (global: 1000) or centres per class (per_class: 100)")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--per-class", type=int, default=2000, help="points per class")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4096, help="mini-batch methods")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--host-devices", type=int, default=os.cpu_count(),
                   help="JAX CPU devices (one per core)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.k = args.k or (1000 if args.case == "global" else 100)
    if args.worker:
        args.method = args.worker
        return run_worker(args)

    out = tempfile.mkdtemp(prefix="vqlc-kmeans-bench-")
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        cmd = [sys.executable, __file__, "--worker", m, "--out", out, "--case", args.case,
               "--n", str(args.n), "--dim", str(args.dim), "--k", str(args.k),
               "--classes", str(args.classes), "--per-class", str(args.per_class),
               "--iters", str(args.iters), "--batch-size", str(args.batch_size),
               "--host-devices", str(args.host_devices)]
        print(f"running {m} ...", flush=True)
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"  {m} failed or skipped: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")

    x, labels = make_data(args.case, args.n, args.dim, args.classes, args.per_class)
    n = x.shape[0]
    flop = 2.0 * n * args.k * args.dim * args.iters
    desc = (f"N={n:,} D={args.dim} K={args.k:,}" if args.case == "global" else
            f"{args.classes} classes x {args.per_class:,} points x {args.k} centres, D={args.dim}")
    print(f"\nk-means, {args.case}: {desc}, {args.iters} iterations, "
          f"data {x.nbytes / 2**20:.0f} MB, {os.cpu_count()} CPU cores")
    rows = []
    for m in methods:
        path = os.path.join(out, f"{m}.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            rec = json.load(f)
        rec["inertia"] = score(args.case, x, labels, np.load(os.path.join(out, f"{m}.npy")),
                               args.k)
        rows.append((m, rec))
    ref = dict(rows).get("faiss")
    print(f"{'method':<20} {'wall s':>8} {'x faiss':>8} {'cold 1-iter s':>14} "
          f"{'peak extra MB':>14} {'inertia':>14} {'vs faiss':>9} {'GFLOP/s':>8}")
    for m, r in rows:
        ratio = r["wall_s"] / ref["wall_s"] if ref else float("nan")
        rel = r["inertia"] / ref["inertia"] - 1 if ref else float("nan")
        rate = flop / r["wall_s"] / 1e9 if not m.endswith("_mb") else float("nan")
        cold = f"{r['cold_1iter_s']:14.1f}" if r.get("cold_1iter_s") else f"{'-':>14}"
        print(f"{m:<20} {r['wall_s']:8.1f} {ratio:8.2f} {cold} {r['peak_extra_mb']:14.0f} "
              f"{r['inertia']:14.6g} {rel:+9.3%} {rate:8.1f}")
    print("wall: the full run (JAX: compiled; its first 1-iteration call, compilation included, "
          "is 'cold 1-iter').\nGFLOP/s: 2*N*K*D*iters / wall (assignment matmul only; "
          "full-batch methods).")


if __name__ == "__main__":
    main()
