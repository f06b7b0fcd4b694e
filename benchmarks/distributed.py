"""Per-step cost of the multi-process path on one CPU machine, same global batch.

    python benchmarks/distributed.py [--variant demo|tiny] [--steps N] [--warmup N] [--rounds R]

Runs the trainer's jitted train step (vqlc.train.step.make_train_step, state donated, the global
batch assembled from process-local numpy with parallel.global_batch, as the trainer does) in two
layouts of the same four CPU devices:

  1 x 4  one process, four virtual CPU devices (XLA_FLAGS device count 4);
  2 x 2  two processes of two devices each, joined by jax.distributed (localhost coordinator,
         gloo CPU collectives), each feeding its half of the batch.

Same config, codebook (random, fixed seed), initial state and global batch in both. Each layout
is run `--rounds` times, alternating, so that load from other processes hits both alike; the
table gives the median step time over all timed steps of all rounds (seconds) and the ratio.
A persistent compilation cache (--cache-dir) keeps the repeated rounds from recompiling.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _worker(args) -> None:
    sys.path.insert(0, ROOT)
    from vqlc import distributed
    distributed.initialize(None)  # the parent's VQLC_* variables decide
    import jax
    import numpy as np

    from vqlc.configs import default as default_config
    from vqlc import parallel
    from vqlc.data import make_train_iterator
    from vqlc.models import lpips as lpips_lib
    from vqlc.train import trainer
    from vqlc.train.step import make_train_step

    config = _config(default_config, args.variant, args.codebook)
    mesh = parallel.make_mesh(-1)
    model, disc, g_tx, d_tx, state, frozen = trainer.setup_model(config, args.workdir, mesh)
    lpips_params = jax.device_put(lpips_lib.load_vgg16_lpips_params(), parallel.replicated(mesh))
    step = jax.jit(make_train_step(model, disc, g_tx, d_tx, config.loss,
                                   lambda p, x, y: lpips_lib.lpips(x, y, params=p)),
                   donate_argnums=(0,))
    local = next(make_train_iterator(
        config.data, batch_size=parallel.local_batch_size(config.train.batch_size),
        seed=config.seed, shard_index=jax.process_index(), shard_count=jax.process_count()))
    local = {k: np.asarray(v) for k, v in local.items()}
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        state, metrics = step(state, parallel.global_batch(local, mesh), frozen, lpips_params)
        jax.block_until_ready((state, metrics))
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    if jax.process_index() == 0:
        with open(args.out, "w") as f:
            json.dump({"times": times, "loss": float(metrics["loss"]),
                       "devices": jax.device_count(), "processes": jax.process_count()}, f)


def _config(default_config, variant: str, codebook: str):
    c = default_config.get_config("tiny" if variant == "tiny" else "")
    c.codebook.build = ""
    c.codebook.path = codebook
    return c


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_layout(args, processes: int, devices: int, codebook: str, tmp: str) -> dict:
    workdir = tempfile.mkdtemp(dir=tmp)
    out = os.path.join(workdir, "times.json")
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_COMPILATION_CACHE_DIR=args.cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", TF_CPP_MIN_LOG_LEVEL="3")
    for name in ("VQLC_DISTRIBUTED", "VQLC_COORDINATOR_ADDRESS", "VQLC_NUM_PROCESSES",
                 "VQLC_PROCESS_ID"):
        env.pop(name, None)
    address = f"localhost:{_free_port()}"
    procs = []
    for i in range(processes):
        penv = dict(env)
        if processes > 1:
            penv.update(VQLC_COORDINATOR_ADDRESS=address, VQLC_NUM_PROCESSES=str(processes),
                        VQLC_PROCESS_ID=str(i))
        procs.append(subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", "--variant", args.variant,
             "--steps", str(args.steps), "--warmup", str(args.warmup), "--codebook", codebook,
             "--workdir", workdir, "--out", out], cwd=ROOT, env=penv,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"{processes} x {devices} failed:\n" + "\n".join(
            log[-3000:] for log in logs))
    with open(out) as f:
        return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="demo", choices=("demo", "tiny"),
                        help="demo: vqlc/configs/default.py (batch 16, 32 px, no LPIPS in the loss); "
                             "tiny: its :tiny variant (batch 8, 16 px, LPIPS on)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(),
                                                            "vqlc-bench-jax-cache"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--codebook", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return

    import numpy as np
    sys.path.insert(0, ROOT)
    from vqlc.configs import default as default_config
    config = _config(default_config, args.variant, "")
    layouts = ((1, 4), (2, 2))
    times = {layout: [] for layout in layouts}
    losses = {}
    with tempfile.TemporaryDirectory() as tmp:
        codebook = os.path.join(tmp, "codebook.npy")
        np.save(codebook, np.random.default_rng(0).standard_normal(
            (config.quantizer.codebook_size, config.codebook.feature_dim)).astype(np.float32))
        for r in range(args.rounds):
            for layout in layouts:
                start = time.time()
                result = _run_layout(args, *layout, codebook, tmp)
                times[layout] += result["times"]
                losses[layout] = result["loss"]
                print(f"round {r + 1}: {layout[0]} x {layout[1]}: median step "
                      f"{statistics.median(result['times']):.4f} s ({time.time() - start:.0f} s "
                      "with start-up and compile)", file=sys.stderr)
    base = statistics.median(times[(1, 4)])
    print(f"\nTrain step, `vqlc/configs/default.py{':tiny' if args.variant == 'tiny' else ''}`, "
          f"global batch {config.train.batch_size}, {config.data.image_size} px, 4 CPU devices "
          f"({os.cpu_count()} cores); {args.rounds} rounds x {args.steps} timed steps each\n")
    print("| layout | median step (s) | p10-p90 (s) | vs 1 x 4 | loss after the steps |")
    print("|---|---:|---:|---:|---:|")
    for (p, d), ts in times.items():
        med = statistics.median(ts)
        lo, hi = np.percentile(ts, [10, 90])
        print(f"| {p} process{'es' if p > 1 else ''} x {d} devices | {med:.4f} | "
              f"{lo:.4f}-{hi:.4f} | {med / base:.2f}x | {losses[(p, d)]:.6f} |")


if __name__ == "__main__":
    main()
