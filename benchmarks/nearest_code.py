"""Nearest-code search: vqlc's tiled `nearest_code` against numpy and jnp brute force.

    python benchmarks/nearest_code.py [--n 65536 --k 100000 --d 8] [--tiles 256x128,512x256]
                                      [--np-chunks 4096,256] [--split 1,2,4 --devices 4]

--split M,...: also the search with the codebook split M ways along K over the `model` axis of
a (devices / M, M) mesh of virtual CPU devices (rows over `data`); M = 1 splits only the rows.
Those rows add the compiled program's memory per device (arguments + temporaries, from XLA) and
the largest array it all-gathers (the rows of a `model` group; never the codebook).

Each method runs in its own fresh subprocess on the same seeded data, so memory numbers do not
leak between methods. A worker builds its inputs and compiles first, then measures:
  - time: best of up to --repeats runs (tokens/s = N / time);
  - peak extra memory: the peak resident set size during the first run minus the resident set
    just before it. The peak is the larger of ru_maxrss (when the run set a new high-water mark)
    and a 1 ms poll of /proc/self/statm, so neither a peak hidden under an earlier high-water mark
    nor a short spike between polls is missed.
Indices are checked against numpy's (same float32 data; differences can only be exact or
near-exact ties).

numpy baseline: rows in chunks (--np-chunks; the first is the reference for the ratios),
d = |c|^2 - 2 z c^T via BLAS, then argmin.
jnp brute force: jnp.argmin over the full [N, K] matrix; if that would need more than --naive-mb,
it runs on the first rows that fit (marked in the table), which is enough for a rate.

On a machine where OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are set to values that slow numpy down,
run with `env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/nearest_code.py`.
"""
import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

PAGE = os.sysconf("SC_PAGE_SIZE")


def make_data(n, k, d, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, d), dtype=np.float32)
    codes = rng.standard_normal((k, d), dtype=np.float32)
    return z, codes


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def maxrss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class PeakRSS:
    """Polls the resident set every millisecond in a background thread."""

    def __enter__(self):
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def numpy_method(z, codes, chunk):
    codes_t = np.ascontiguousarray(codes.T)
    norms = np.einsum("kd,kd->k", codes, codes)

    def run():
        out = np.empty(len(z), np.int64)
        for i in range(0, len(z), chunk):
            dist = z[i:i + chunk] @ codes_t
            dist *= -2.0
            dist += norms
            out[i:i + chunk] = dist.argmin(1)
            del dist  # free this chunk's block before the next one is allocated
        return out
    return run


def split_method(z, codes, shards, devices):
    """(run, per-device memory, all-gathers) for the search over a (devices / shards, shards)
    mesh: the codebook split along K over `model`, the rows over `data`."""
    import jax
    from vqlc import parallel
    from vqlc.neighbors import nearest_code
    mesh = parallel.make_mesh(devices // shards, model=shards)
    with jax.set_mesh(mesh):
        zj = jax.device_put(z, parallel.batch_sharded(mesh))
        cj = jax.device_put(codes, parallel.codebook_sharding(mesh))
        compiled = jax.jit(nearest_code).lower(zj, cj).compile()
    stats = compiled.memory_analysis()
    per_device = stats.argument_size_in_bytes + stats.temp_size_in_bytes
    gathered = [int(np.prod([int(v) for v in dims.split(",") if v])) * 4 for dims in
                re.findall(r"= \w+\[([\d,]*)\][^=]* all-gather\(", compiled.as_text())]
    gathers = max(gathered, default=0)

    def run():
        with jax.set_mesh(mesh):
            return np.asarray(compiled(zj, cj).block_until_ready())
    return run, per_device, gathers


def jax_method(name, z, codes, tile_n, tile_k):
    import jax
    import jax.numpy as jnp

    if name == "vqlc":
        from vqlc.neighbors import nearest_code

        def fn(z, codes):
            return nearest_code(z, codes, tile_n=tile_n, tile_k=tile_k)
    else:
        def fn(z, codes):
            dist = jnp.sum(codes * codes, 1)[None] - 2.0 * z @ codes.T
            return jnp.argmin(dist, axis=1).astype(jnp.int32)

    zj, cj = jnp.asarray(z), jnp.asarray(codes)
    compiled = jax.jit(fn).lower(zj, cj).compile()  # compile before the memory baseline

    def run():
        return np.asarray(compiled(zj, cj).block_until_ready())
    return run


def worker(args):
    z, codes = make_data(args.n, args.k, args.d)
    if args.method == "naive":
        z = z[:args.rows]
    extra = {}
    if args.method == "numpy":
        run = numpy_method(z, codes, args.np_chunk)
    elif args.method.startswith("split"):
        run, extra["device_bytes"], extra["all_gathers"] = split_method(
            z, codes, int(args.method[5:]), args.devices)
    else:
        run = jax_method(args.method, z, codes, args.tile_n, args.tile_k)
    before, maxrss_before = rss_bytes(), maxrss_bytes()
    with PeakRSS() as poll:
        t0 = time.perf_counter()
        idx = run()
        times = [time.perf_counter() - t0]
    maxrss_after = maxrss_bytes()
    peak = max(poll.peak, maxrss_after if maxrss_after > maxrss_before else 0)
    started = time.perf_counter()
    while len(times) < args.repeats and time.perf_counter() - started < args.time_budget:
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    np.save(args.out, np.asarray(idx, np.int64))
    print(json.dumps({"rows": len(z), "times": times, "extra_bytes": peak - before, **extra}))


def launch(method, args, out, rows=None, tile=(None, None)):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--out", out,
           "--n", str(args.n), "--k", str(args.k), "--d", str(args.d),
           "--np-chunk", str(args.np_chunk), "--repeats", str(args.repeats),
           "--time-budget", str(args.time_budget)]
    if rows is not None:
        cmd += ["--rows", str(rows)]
    env = dict(os.environ)
    if method.startswith("split"):
        cmd += ["--devices", str(args.devices)]
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            f" --xla_force_host_platform_device_count={args.devices}")
    if method == "numpy":
        cmd[cmd.index("--np-chunk") + 1] = str(tile[0])
    elif tile[0]:
        cmd += ["--tile-n", str(tile[0]), "--tile-k", str(tile[1])]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=65536, help="query vectors (tokens)")
    p.add_argument("--k", type=int, default=100_000, help="codebook size")
    p.add_argument("--d", type=int, default=8, help="vector dimension")
    p.add_argument("--tiles", default="default",
                   help="comma list of TILE_NxTILE_K for vqlc rows, or 'default'")
    p.add_argument("--np-chunks", default="4096,256",
                   help="comma list of numpy rows per chunk; the first is the ratios' base")
    p.add_argument("--np-chunk", type=int, default=4096, help=argparse.SUPPRESS)
    p.add_argument("--naive-mb", type=int, default=2048,
                   help="largest N x K matrix (MB) the jnp brute force may build")
    p.add_argument("--split", default="",
                   help="comma list of ways to split the codebook over the model axis")
    p.add_argument("--devices", type=int, default=4, help="virtual CPU devices for --split")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--time-budget", type=float, default=60.0,
                   help="seconds of extra timing runs per method after the first")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    p.add_argument("--tile-n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--tile-k", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.method = args.worker
        return worker(args)

    tiles = [(None, None)] if args.tiles == "default" else [
        tuple(int(v) for v in t.split("x")) for t in args.tiles.split(",")]
    naive_rows = min(args.n, max(1, args.naive_mb * 2**20 // (args.k * 4 * 2)))
    runs = [("numpy", f"numpy, {c} rows a chunk", None, (c, None))
            for c in (int(v) for v in args.np_chunks.split(","))]
    for t in tiles:
        label = "vqlc nearest_code" + (f" (tiles {t[0]}x{t[1]})" if t[0] else " (default tiles)")
        runs.append(("vqlc", label, None, t))
    naive_label = "jnp brute force" + (
        f" (first {naive_rows} rows; all {args.n} would need "
        f"{args.n * args.k * 4 / 2**30:.1f} GiB)" if naive_rows < args.n else "")
    runs.append(("naive", naive_label, naive_rows, (None, None)))
    for m in (int(v) for v in args.split.split(",") if v):
        runs.append((f"split{m}", f"vqlc, codebook split {m} ways (mesh {args.devices // m} x "
                                  f"{m} virtual devices)", None, (None, None)))

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (method, label, rows, tile) in enumerate(runs):
            out = os.path.join(tmp, f"{i}.npy")
            print(f"running {label} ...", file=sys.stderr, flush=True)
            r = launch(method, args, out, rows, tile)
            r["label"], r["idx"] = label, np.load(out)
            results.append(r)
    base = results[0]
    base_rate = base["rows"] / min(base["times"])
    print(f"\nnearest code: N={args.n}, K={args.k}, D={args.d}, float32, "
          f"{os.cpu_count()} CPUs\n")
    print("| method | tokens/s | time (s) | peak extra memory (MB) | speed vs numpy "
          "| memory vs numpy | same index as numpy | per device (MB) | largest all-gather (MB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        best = min(r["times"])
        rate = r["rows"] / best
        agree = np.mean(r["idx"] == base["idx"][:r["rows"]])
        mem = r["extra_bytes"] / 2**20
        split = (f" {r['device_bytes'] / 2**20:,.1f} | {r['all_gathers'] / 2**20:,.2f} |"
                 if "device_bytes" in r else " | |")
        print(f"| {r['label']} | {rate:,.0f} | {best:.2f} | {mem:,.0f} | {rate / base_rate:.2f}x "
              f"| {mem / max(base['extra_bytes'] / 2**20, 1e-9):.3f}x | {agree:.5f} |{split}")


if __name__ == "__main__":
    main()
