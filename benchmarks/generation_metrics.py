"""Generation metrics: precision/recall search and Inception throughput.

    python benchmarks/generation_metrics.py [--n 50000 --d 2048] [--brute-n 5000]
        [--images 64 --image-size 256 --devices 1,4]

1. Precision/recall (k = 3) between two sets of N synthetic D-d features (pool3-like: ReLU'd
   Gaussians): vqlc.neighbors.precision_recall (tiled: radii of both sets + one mutual pass, never
   N x N; timed on its second call, the first (which compiles) is shown too) against a numpy brute force that holds the full N x N float32 distance matrices (as
   np.partition needs them). The brute force runs at min(N, --brute-n); when that is smaller
   than N its time and peak memory are extrapolated by (N / brute_n)^2 (both are dominated by
   the N x N matrices), and the table says so. Both give the same precision and recall on the common N.
2. Inception throughput (the adm path: pool3 + sFID features, TF resize of --image-size px uint8
   images, random weights) through vqlc.eval.generation.Extractor with the batch sharded over 1
   and over 4 devices (virtual CPU devices: XLA_FLAGS=--xla_force_host_platform_device_count).
   On a CPU host the virtual devices share the same cores: this shows the sharded path runs and
   what it costs, not an accelerator speed-up.

Each measurement runs in its own subprocess; peak memory = peak resident set during the
measured run (1 ms poll of /proc/self/statm and ru_maxrss) minus the resident set before it.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time

import numpy as np

PAGE = os.sysconf("SC_PAGE_SIZE")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class _Peak:
    def __enter__(self):
        self.start = _rss()
        self.peak = self.start
        self._max0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if maxrss > self._max0:
            self.peak = max(self.peak, maxrss)
        self.extra = self.peak - self.start


def features(n, d, seed):
    rng = np.random.default_rng(seed)
    # Two overlapping ReLU'd Gaussians (the second shifted a little): precision and recall
    # between 0 and 1.
    return np.maximum(rng.standard_normal((n, d), dtype=np.float32) + 0.02 * (seed - 1), 0.0)


def numpy_precision_recall(real, fake, k=3):
    """Brute force on full matrices: |a|^2 + |b|^2 - 2 a.b, k-th radii by np.partition."""
    def sq(a, b):
        d = -2.0 * (a @ b.T)
        d += np.einsum("nd,nd->n", a, a)[:, None]
        d += np.einsum("nd,nd->n", b, b)[None, :]
        return np.maximum(d, 0.0, out=d)

    r_real = np.partition(sq(real, real), k, axis=1)[:, k]
    r_fake = np.partition(sq(fake, fake), k, axis=1)[:, k]
    d = sq(real, fake)
    return float(np.mean((d <= r_real[:, None]).any(0))), float(np.mean((d <= r_fake).any(1)))


def worker(args):
    out = {}
    if args.worker == "pr_vqlc":
        from vqlc import neighbors
        real, fake = features(args.n, args.d, 1), features(args.n, args.d, 2)
        t = time.perf_counter()
        neighbors.precision_recall(real, fake)  # compiles the tile programs for these shapes
        out["first_seconds"] = time.perf_counter() - t
        with _Peak() as p:
            t = time.perf_counter()
            out["pr"] = neighbors.precision_recall(real, fake)
            out["seconds"] = time.perf_counter() - t
        out["peak_extra"] = p.extra
    elif args.worker == "pr_numpy":
        real, fake = features(args.n, args.d, 1), features(args.n, args.d, 2)
        with _Peak() as p:
            t = time.perf_counter()
            out["pr"] = numpy_precision_recall(real, fake)
            out["seconds"] = time.perf_counter() - t
        out["peak_extra"] = p.extra
    elif args.worker == "inception":
        import jax
        from vqlc import parallel
        from vqlc.eval import generation
        from vqlc.models import inception
        mesh = parallel.make_mesh(int(args.devices))
        params, fc = inception.random_params(0)
        ex = generation.Extractor(params, fc, "tf", spatial=True, mesh=mesh,
                                  batch_size=args.batch)
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (args.images, args.image_size, args.image_size, 3),
                              dtype=np.uint8)
        ex(iter([images[:ex.batch_size]]), generation.Features(True, False, True))  # compile
        t = time.perf_counter()
        f = ex(iter([images]), generation.Features(True, False, True))
        out["seconds"] = time.perf_counter() - t
        out["images_per_s"] = args.images / out["seconds"]
        out["devices"] = len(jax.devices())
        assert f.pool.count == args.images
    print("RESULT " + json.dumps(out))


def run_worker(name, args, **extra):
    env = dict(os.environ)
    cmd = [sys.executable, __file__, "--worker", name, "--n", str(extra.get("n", args.n)),
           "--d", str(args.d), "--images", str(args.images), "--image-size",
           str(args.image_size), "--batch", str(args.batch)]
    if "devices" in extra:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            f" --xla_force_host_platform_device_count={extra['devices']}")
        env.setdefault("JAX_PLATFORMS", "cpu")
        cmd += ["--devices", str(extra["devices"])]
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    if p.returncode or not lines:
        raise RuntimeError(f"{name} failed:\n{p.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50_000, help="features per set")
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--brute-n", type=int, default=5000,
                    help="largest N the numpy brute force runs at (then extrapolated)")
    ap.add_argument("--images", type=int, default=64, help="images per Inception timing")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32, help="images per Inception call")
    ap.add_argument("--devices", default="1,4", help="device counts for Inception")
    ap.add_argument("--fid-images", type=int, default=0,
                    help="also time `python -m vqlc.fid` (clean protocol, real weights, no "
                         "cache) on this many 32 px demo-size images per side: a PNG folder "
                         "vs a sample .npz")
    ap.add_argument("--skip-pr", action="store_true")
    ap.add_argument("--skip-inception", action="store_true")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    mb = 2.0 ** 20
    if not args.skip_pr:
        v = run_worker("pr_vqlc", args)
        bn = min(args.n, args.brute_n)
        b = run_worker("pr_numpy", args, n=bn)
        scale = (args.n / bn) ** 2
        note = "" if bn == args.n else f" (run at N={bn}, extrapolated x{scale:.0f})"
        print(f"\nPrecision/recall, k=3, N={args.n:,} per set, D={args.d} (feature inputs "
              f"{2 * args.n * args.d * 4 / mb:.0f} MiB not counted)")
        print(f"{'method':<52} {'time (s)':>10} {'peak extra (MiB)':>18} {'precision':>10} "
              f"{'recall':>8}")
        print(f"{'vqlc.neighbors (tiled; first call ' + format(v['first_seconds'], '.1f') + ' s)':<52} {v['seconds']:10.1f} {v['peak_extra'] / mb:18.0f} "
              f"{v['pr'][0]:10.4f} {v['pr'][1]:8.4f}")
        peak = b["peak_extra"] * scale  # dominated by its N x N matrices
        print(f"{'numpy brute force' + note:<52} {b['seconds'] * scale:10.1f} {peak / mb:18.0f} "
              f"{b['pr'][0] if bn == args.n else float('nan'):10.4f} "
              f"{b['pr'][1] if bn == args.n else float('nan'):8.4f}")
    if not args.skip_inception:
        print(f"\nInception (adm path: pool3 + sFID features), {args.images} random "
              f"{args.image_size}px images, batch {args.batch}, random weights")
        print(f"{'devices':>8} {'images/s':>10} {'time (s)':>10}")
        for k in (int(x) for x in args.devices.split(",")):
            r = run_worker("inception", args, devices=k)
            print(f"{r['devices']:>8} {r['images_per_s']:10.2f} {r['seconds']:10.1f}")
    if args.fid_images:
        time_fid_cli(args.fid_images)


def time_fid_cli(n: int) -> None:
    """Wall time of the command line on n vs n demo-size (32 px) crops of scikit-image photos."""
    import tempfile

    import PIL.Image
    import skimage.data
    rng = np.random.default_rng(0)
    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()]

    def crops(count):
        out = np.empty((count, 32, 32, 3), np.uint8)
        for i in range(count):
            p = photos[i % len(photos)]
            y, x = rng.integers(0, p.shape[0] - 32), rng.integers(0, p.shape[1] - 32)
            out[i] = p[y:y + 32, x:x + 32]
        return out

    with tempfile.TemporaryDirectory() as d:
        folder = os.path.join(d, "a")
        os.makedirs(folder)
        for i, im in enumerate(crops(n)):
            PIL.Image.fromarray(im).save(os.path.join(folder, f"{i:06d}.png"))
        npz = os.path.join(d, "b.npz")
        np.savez(npz, arr_0=crops(n))
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "vqlc.fid", folder, npz, "--no_cache",
                            "--json", os.path.join(d, "r.json")], env=env, capture_output=True,
                           text=True)
        seconds = time.perf_counter() - t
    if p.returncode:
        print(f"\npython -m vqlc.fid failed (weights missing?): {p.stderr.strip()[-500:]}")
        return
    print(f"\npython -m vqlc.fid, clean protocol, {n:,} PNG vs {n:,} .npz images of 32 px, no "
          f"cache: {seconds:.1f} s wall ({2 * n / seconds:.1f} images/s, start-up and "
          f"compilation included)")


if __name__ == "__main__":
    main()
