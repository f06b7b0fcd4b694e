"""Input pipeline vs train step: does vqlc's data loader keep up with the f16 256-px model?

    python benchmarks/input_pipeline.py [--data DIR] [--num-images 256] [--batch 32]
        [--workers 0,1,2] [--batches 40] [--step-batch 2] [--steps 3] [--warmup-steps 1]
        [--codes 16384] [--gan on|off|both] [--skip-loader] [--skip-step] [--json FILE]
    python benchmarks/input_pipeline.py --from-json FILE   # the table of a saved run

What is measured:
  loader  `vqlc.data.make_train_iterator` on an image folder of ImageNet-like JPEGs (500x375 and
          375x500, quality 90, cut from scikit-image's bundled colour photos with random crops,
          scales and flips, so files differ: natural images decode like ImageNet's, noise would
          decode slower). vqlc/configs/imagenet_lc.py's data settings with kind='folder': shorter side
          resized to 256 (PIL bicubic, antialiased), random 256x256 crop, float32 batches in
          [-1, 1], at the per-host batch --batch, for each num_workers in --workers. Images/s
          over --batches batches after one warm-up batch (which pays for the worker start-up;
          the folder scan is timed apart as "setup"). Also the CPU time the loader burns
          (this process plus its grain workers, via psutil) per image: images per CPU-core-second
          is the rate that does not depend on how loaded this shared machine is.
  step    The f16 256-px model of vqlc/configs/imagenet_lc.py (ch 128, ch_mult 1,1,2,2,4, LC
          quantizer with a random frozen codebook [--codes, 768] and a linear projector to dim 8),
          the full jitted train step as the trainer runs it (L1 + LPIPS-VGG16 + 0.1 quantizer
          loss; with --gan on also the hinge GAN with the adaptive weight and the discriminator
          update, i.e. disc_start = 0; --gan off is the step before disc_start, the first half of
          the release's schedule). Set up by benchmarks/train_step.py's JAX worker (same
          codebook, batch and compile path). Images/s from the median of --steps steps after
          --warmup-steps; XLA's cost analysis gives the step's FLOPs per image (the trainer
          compiles one program with the GAN behind lax.cond, and both branches are counted, so
          GAN on and off report the same number: an upper bound for the pre-GAN step).

Prints a markdown table: each part's images/s and, for the loader, how many times what the
step consumes it delivers ("loader / step").

Caveats:
  * Without a GPU both run on this machine's CPU, one after the other. A CPU train step is
    thousands of times slower than on an accelerator, so the CPU ratio only says the loader is
    not the bottleneck HERE. What matters at scale is the loader's images per CPU-core-second
    against the per-GPU step rate: the "H100 arithmetic" lines estimate the latter from the
    measured FLOPs per image and an ASSUMED utilisation of a NOMINAL peak (not a measurement),
    and how many loader cores each GPU would then need. On a GPU machine the step runs on the
    GPU (JAX's default backend) and the ratio is the real one; pass --step-batch 8 (the
    release's per-GPU batch) there.
  * The JPEGs sit in the page cache after the first pass (the folder is small), so the loader
    is decode-bound here; ImageNet read from a slow or network disk may be I/O-bound instead.
  * Each grain worker has its own threads; on a machine with few cores (2 here, shared with
    other jobs) more workers cannot go faster than the cores allow, and the per-core rate is
    the number to scale by cores per host.
  * f16 at batch 8 needs more than 24 GB under XLA:CPU (no rematerialisation), hence the
    default --step-batch 2 here.
"""
import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import train_step as ts  # noqa: E402  (benchmarks/train_step.py: config and JAX step set-up)

# Nominal dense peak of an H100 SXM for float32 inputs on tensor cores (TF32), used only for the
# clearly labelled estimate; the assumed utilisation is a guess, not a measurement.
H100_TF32_PEAK = 495e12
ASSUMED_UTILISATION = 0.4


# ---------------------------------------------------------------------------------------------
# The image folder.

def _photos():
    """scikit-image's bundled colour photos (no download), as uint8 [H, W, 3]."""
    from skimage import data
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(),
              data.hubble_deep_field(), data.retina(), data.immunohistochemistry(),
              data.stereo_motorcycle()[0]]
    return [np.ascontiguousarray(p[..., :3]) for p in photos]


def make_folder(root: str, count: int, seed: int = 0) -> int:
    """Writes ``count`` ImageNet-like JPEGs under root/<class>/ (8 classes); reuses a finished one.

    Each file is a random crop (random scale, 4:3 or 3:4) of a random photo, resized to 500x375
    or 375x500 (ImageNet's most common sizes) and randomly flipped, saved at quality 90.
    """
    from PIL import Image
    marker = os.path.join(root, ".complete")
    if os.path.exists(marker):
        return int(open(marker).read())
    rng = np.random.default_rng(seed)
    photos = _photos()
    for i in range(count):
        photo = photos[rng.integers(len(photos))]
        h, w = photo.shape[:2]
        landscape = rng.random() < 0.7
        aspect = 4 / 3 if landscape else 3 / 4  # width / height
        crop_h = int(min(h, w / aspect) * rng.uniform(0.5, 1.0))
        crop_w = int(crop_h * aspect)
        top = int(rng.integers(0, h - crop_h + 1))
        left = int(rng.integers(0, w - crop_w + 1))
        image = Image.fromarray(photo[top:top + crop_h, left:left + crop_w])
        image = image.resize((500, 375) if landscape else (375, 500), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        folder = os.path.join(root, f"n{i % 8:08d}")
        os.makedirs(folder, exist_ok=True)
        image.save(os.path.join(folder, f"img_{i:05d}.JPEG"), quality=90)
    with open(marker, "w") as f:
        f.write(str(count))
    return count


# ---------------------------------------------------------------------------------------------
# Loader.

def _cpu_seconds(proc) -> float:
    """CPU time (user + system) of ``proc`` and its live descendants (the grain workers)."""
    import psutil
    total = 0.0
    for p in [proc] + proc.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def bench_loader(data_cfg, batch: int, workers: int, batches: int) -> dict:
    import psutil
    from vqlc.data import make_train_iterator
    cfg = data_cfg.copy_and_resolve_references()
    cfg.num_workers = workers
    me = psutil.Process()
    start = time.perf_counter()
    it = make_train_iterator(cfg, batch_size=batch, seed=0)
    setup_s = time.perf_counter() - start
    try:
        start = time.perf_counter()
        first = next(it)  # warm-up: worker start-up and the first prefetch
        warmup_s = time.perf_counter() - start
        assert first["image"].shape == (batch, cfg.image_size, cfg.image_size, 3)
        assert first["image"].dtype == np.float32
        cpu0, start = _cpu_seconds(me), time.perf_counter()
        for _ in range(batches):
            next(it)
        wall = time.perf_counter() - start
        # Measured before the workers are closed; their prefetching past the last timed batch
        # counts too, so this over-states the CPU per image a little (conservative).
        cpu = _cpu_seconds(me) - cpu0
    finally:
        it.close()
    images = batches * batch
    return dict(workers=workers, batch=batch, batches=batches, setup_s=setup_s,
                warmup_s=warmup_s, wall_s=wall, cpu_s=cpu, images_per_s=images / wall,
                images_per_cpu_s=images / cpu if cpu > 0 else float("nan"),
                load_average=os.getloadavg()[0])


# ---------------------------------------------------------------------------------------------
# Train step.

@contextlib.contextmanager
def _config_override(gan: bool):
    """Makes train_step's JAX worker build its f16_gan setting with the GAN on or off.

    train_step.load_config('f16_gan', ...) sets disc_start = 0; for the pre-GAN step it is put
    back to vqlc/configs/imagenet_lc.py's value. Restored on exit.
    """
    original = ts.load_config

    def load(setting, codes, batch):
        config = original(setting, codes, batch)
        if not gan:
            config.loss.disc_start = original("f16", codes, batch).loss.disc_start
        return config

    ts.load_config = load
    try:
        yield
    finally:
        ts.load_config = original


def _flops(compiled) -> float:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports costs
        return float("nan")
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


def bench_step(gan: bool, batch: int, codes: int, steps: int, warmup: int) -> dict:
    import jax
    with _config_override(gan):
        config = ts.load_config("f16_gan", codes, batch)
        spec = ts.model_spec(config)
        worker_args = argparse.Namespace(setting="f16_gan", f16_codes=codes, f16_batch=batch)
        start = time.perf_counter()
        worker = ts.JaxWorker(worker_args, spec)  # builds, initialises and compiles the step
        setup_s = time.perf_counter() - start
    assert (spec["disc_start"] == 0) == gan
    flops = _flops(worker.compiled)
    warm = [ts.timed(worker.step) for _ in range(warmup)]
    times = []
    for i in range(steps):
        times.append(ts.timed(worker.step))
        log(f"    step {i}: {times[-1]:.2f} s")
    del worker
    gc.collect()
    median = statistics.median(times)
    return dict(gan=gan, batch=batch, codes=codes, backend=jax.default_backend(),
                setup_s=setup_s, warmup_s=warm, times_s=times, median_s=median,
                images_per_s=batch / median, flops_per_image=flops / batch,
                peak_rss_gb=ts.peak_rss_gb(), load_average=os.getloadavg()[0])


# ---------------------------------------------------------------------------------------------
# Report.

def log(msg):
    print(msg, file=sys.stderr, flush=True)


def report(loaders, steps, args) -> str:
    cores = len(os.sched_getaffinity(0))
    lines = []
    step_cols = [f"loader / step ({'GAN on' if s['gan'] else 'pre-GAN'})" for s in steps]
    loads = [r["load_average"] for r in loaders + steps if "load_average" in r]
    load = (f"; 1-min load average {min(loads):.1f}-{max(loads):.1f} after the measurements"
            if loads else "")
    lines += [f"Input pipeline vs f16 256-px train step ({cores} CPU cores visible{load})", "",
              "| part | images/s | images per CPU-core-s | "
              + " | ".join(step_cols + ["notes"]) + " |",
              "|---|---:|---:|" + "---:|" * len(step_cols) + "---|"]
    for r in loaders:
        ratios = [f"{r['images_per_s'] / s['images_per_s']:.0f}x" for s in steps]
        lines.append(
            f"| loader, num_workers={r['workers']}, batch {r['batch']} | "
            f"{r['images_per_s']:.1f} | {r['images_per_cpu_s']:.1f} | " + "".join(
                f"{x} | " for x in ratios)
            + f"{r['batches']} batches; setup (folder scan) {r['setup_s']:.2f} s, "
            f"first batch {r['warmup_s']:.2f} s |")
    for s in steps:
        what = ("full step, GAN on (disc_start 0)" if s["gan"]
                else "step before disc_start (no GAN)")
        lines.append(
            f"| train step f16 256 px, {what}, batch {s['batch']}, K {s['codes']}, "
            f"{s['backend']} | {s['images_per_s']:.3f} | - | " + "- | " * len(steps)
            + f"median of {len(s['times_s'])} steps "
            f"({', '.join(f'{t:.1f}' for t in s['times_s'])} s); set-up + compile "
            f"{s['setup_s']:.0f} s; {s['flops_per_image'] / 1e9:.0f} GFLOP/image (XLA cost "
            f"analysis); process peak RSS so far {s['peak_rss_gb']:.1f} GB |")
    if loaders and steps:
        best = max(loaders, key=lambda r: r["images_per_cpu_s"])
        lines += ["", "Loader / step = how many times what the step consumes the loader "
                  "delivers (both measured here, one after the other)."]
        if all(s["backend"] == "cpu" for s in steps):
            lines += ["On a GPU the step is orders of magnitude faster than on this CPU, so "
                      "what decides is the loader's images per CPU-core-second against the "
                      "per-GPU step rate:"]
            # The trainer compiles one program with the GAN behind lax.cond(step >= disc_start),
            # and XLA's cost analysis counts both branches: one FLOP count (an upper bound for
            # the pre-GAN step), so one estimate.
            for flops in sorted({s["flops_per_image"] for s in steps
                                 if np.isfinite(s["flops_per_image"])}):
                gpu_ips = ASSUMED_UTILISATION * H100_TF32_PEAK / flops
                lines.append(
                    f"- H100 ARITHMETIC, not a measurement: {flops / 1e9:.0f} GFLOP/image "
                    "(the compiled step, GAN branch included) / "
                    f"({ASSUMED_UTILISATION:.0%} assumed utilisation x "
                    f"{H100_TF32_PEAK / 1e12:.0f} TFLOP/s nominal TF32 peak) = ~{gpu_ips:.0f} "
                    f"images/s per GPU, i.e. ~{gpu_ips / best['images_per_cpu_s']:.1f} loader "
                    f"cores per GPU at {best['images_per_cpu_s']:.0f} images per core-second "
                    f"(num_workers={best['workers']}); that GPU rate is "
                    f"{gpu_ips / max(s['images_per_s'] for s in steps):.0f}x this CPU's step.")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("--data", default="",
                        help="image folder to use (created there if it has no .complete marker); "
                        "default /tmp/vqlc_input_pipeline_<num-images>")
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32, help="loader's per-host batch")
    parser.add_argument("--workers", default="0,1,2", help="num_workers values to time")
    parser.add_argument("--batches", type=int, default=40,
                        help="timed loader batches (many more than the prefetch buffer's 8)")
    parser.add_argument("--step-batch", type=int, default=2, help="train-step batch")
    parser.add_argument("--steps", type=int, default=3, help="timed train steps")
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--codes", type=int, default=16384, help="codebook size K")
    parser.add_argument("--gan", choices=("on", "off", "both"), default="on")
    parser.add_argument("--skip-loader", action="store_true")
    parser.add_argument("--skip-step", action="store_true")
    parser.add_argument("--json", default="", help="also write the raw results here")
    parser.add_argument("--from-json", default="",
                        help="only print the table of results saved earlier with --json")
    args = parser.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        print(report(saved["loaders"], saved["steps"], args))
        return

    loaders, steps = [], []
    if not args.skip_loader:
        root = args.data or f"/tmp/vqlc_input_pipeline_{args.num_images}"
        start = time.perf_counter()
        count = make_folder(root, args.num_images)
        log(f"folder {root}: {count} JPEGs ({time.perf_counter() - start:.1f} s)")
        config = ts.load_config("f16", args.codes, args.step_batch)  # vqlc/configs/imagenet_lc.py
        data_cfg = config.data
        data_cfg.kind, data_cfg.path = "folder", root
        assert data_cfg.image_size == 256 and data_cfg.resize_shorter == 256
        # The loader runs before JAX starts its thread pools, so the two do not compete.
        for w in (int(x) for x in args.workers.split(",")):
            loaders.append(bench_loader(data_cfg, args.batch, w, args.batches))
            r = loaders[-1]
            log(f"  loader num_workers={w}: {r['images_per_s']:.1f} images/s, "
                f"{r['images_per_cpu_s']:.1f} images per CPU-s")
    if not args.skip_step:
        for gan in {"on": (True,), "off": (False,), "both": (True, False)}[args.gan]:
            log(f"  train step, GAN {'on' if gan else 'off'}, batch {args.step_batch} ...")
            steps.append(bench_step(gan, args.step_batch, args.codes, args.steps,
                                    args.warmup_steps))
            log(f"    {steps[-1]['images_per_s']:.3f} images/s")
    print(report(loaders, steps, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(loaders=loaders, steps=steps), f, indent=1)


if __name__ == "__main__":
    main()
