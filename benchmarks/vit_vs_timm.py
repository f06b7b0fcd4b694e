"""vqlc's classifier ViT against timm's VisionTransformer in PyTorch, side by side: train-step
throughput and peak memory on the CPU, same network, same batch, same thread count.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/vit_vs_timm.py [--size B/16]
        [--batch 8] [--image-size 224] [--steps 5] [--warmup 2] [--threads 2] [--remat]
        [--dtype float32] [--torch-python /work/venv-torch/bin/python]

(OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE, where set to values that slow numpy down, are unset.)
PyTorch runs in a worker subprocess (benchmarks/vit_timm_worker.py, with --torch-python: torch,
timm and numpy installed), started through benchmarks/torch_worker_client.py; JAX in this
process. The network is MAE's fine-tuning ViT (B/16 at 224 px), built on each side from its own
code with its own random initialisation (both timm's, with MAE's head re-initialisation); the
parameter counts must agree.

  vqlc   vqlc.cls.vit.make_vit(size, grid_size=image/patch, num_classes=1000, stem="pixels",
         drop_path=0.1) on NHWC images; the train step is vqlc's own (trainer.make_train_step,
         as the classifier task runs it: forward with drop path, recipe.soft_cross_entropy,
         backward, recipe.make_optimizer's AdamW with layer-wise lr decay, plus its grad-norm
         metric and non-finite guard), jitted with the state donated.
  timm   timm.models.vision_transformer.VisionTransformer(img_size, patch_size, embed_dim,
         depth, num_heads, global_pool='avg', fc_norm=True, drop_path_rate=0.1,
         num_classes=1000) in train mode on NCHW images (timm's fused attention, as timm
         chooses); the same soft-target cross-entropy, loss.backward(), torch.optim.AdamW over
         the same layer-decay / weight-decay groups, opt.step(), opt.zero_grad(set_to_none=True).
Both: lr 1e-4, weight decay 0.05, layer decay 0.65, the same batch of Gaussian images and
label-smoothed (0.1) one-hot targets. --dtype bfloat16 and --remat change the vqlc side only
(its linears, conv and attention in bfloat16 with float32 parameters; nn.remat per block);
timm stays float32 without checkpointing, and the table says so.

Timing: each side takes --warmup untimed steps (vqlc's first one includes the compile, reported
apart), then --steps timed steps alternate between the frameworks so that load from other
processes hits both alike; images/s from the median step, with the range (slowest-fastest).
Threads: torch.set_num_threads(--threads); XLA's CPU thread pool uses every core this process may
run on, so with --threads below the usable cores this process (and the worker it starts) is
pinned to that many cores (with --threads 1 XLA's multi-threaded Eigen is also turned off).
Peak RSS: each process's resource.getrusage ru_maxrss at the end (the JAX process's includes the
compile).
"""
import argparse
import os
import resource
import statistics
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]  # vqlc; the shared torch_worker_client
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vqlc import parallel  # noqa: E402
from vqlc.cls import recipe, vit  # noqa: E402
from vqlc.gen import trainer  # noqa: E402
from torch_worker_client import TorchWorker, machine_line  # noqa: E402

TORCH_VENV = "/work/venv-torch/bin/python"
NUM_CLASSES = 1000
DROP_PATH = 0.1  # MAE's ViT-B fine-tuning
LR = 1e-4
LABEL_SMOOTHING = 0.1


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def limit_threads(threads: int) -> None:
    """Run this process, and the worker it will start, on `threads` cores: XLA sizes its CPU
    thread pool by the cores the process may use (call before JAX's backend starts)."""
    cores = sorted(os.sched_getaffinity(0))
    if threads > len(cores):
        raise SystemExit(f"--threads {threads}: only {len(cores)} usable cores")
    if threads < len(cores):
        os.sched_setaffinity(0, cores[:threads])
    if threads == 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false"
                                   " intra_op_parallelism_threads=1").strip()


def make_batch(batch: int, image_size: int, seed: int):
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch, image_size, image_size, 3)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, (batch,))
    targets = np.asarray(recipe.mix_targets(jnp.asarray(labels), None, NUM_CLASSES,
                                            LABEL_SMOOTHING))
    return images, targets


def max_rss_mib(kib: int) -> float:
    return kib / 1024  # Linux reports ru_maxrss in KiB


# ------------------------------------------------------------------------------- the JAX side

class JaxViT:
    """vqlc's ViT and its classifier train step on one fixed batch."""

    def __init__(self, args, images: np.ndarray, targets: np.ndarray):
        self.model = vit.make_vit(args.size, grid_size=args.image_size // args.patch,
                                  num_classes=NUM_CLASSES, stem="pixels", drop_path=DROP_PATH,
                                  dtype=args.dtype, remat=args.remat)
        model = self.model
        params_shape = vit.param_shapes(model)
        tx = recipe.make_optimizer(params_shape, LR, depth=model.depth)

        def loss_fn(params, batch, key):
            logits = model.apply({"params": params}, batch["images"], train=True,
                                 rngs={"dropout": key})
            return recipe.soft_cross_entropy(logits, batch["targets"]), {}

        self.state = trainer.init_state(lambda key: vit.init_params(model, key), tx,
                                        seed=args.seed, ema=False, mesh=parallel.make_mesh(1))
        self.step_fn = jax.jit(trainer.make_train_step(loss_fn, tx, 0.0), donate_argnums=(0,))
        self.batch = {"images": jnp.asarray(images), "targets": jnp.asarray(targets)}

    def num_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self.state.params))

    def train(self) -> dict:
        start = time.perf_counter()
        self.state, metrics = self.step_fn(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        return {"t": time.perf_counter() - start, "loss": float(metrics["loss"])}


# ------------------------------------------------------------------------------ measurements

def build(args, worker):
    images, targets = make_batch(args.batch, args.image_size, args.seed)
    depth, width, num_heads = vit.SIZES[args.size.split("/")[0]]
    spec = dict(seed=args.seed, image_size=args.image_size, patch_size=args.patch, width=width,
                depth=depth, num_heads=num_heads, drop_path=DROP_PATH, num_classes=NUM_CLASSES,
                lr=LR, weight_decay=recipe.WEIGHT_DECAY, layer_decay=recipe.LAYER_DECAY)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "batch.npz")
        np.savez(path, images=images.transpose(0, 3, 1, 2), targets=targets)
        torch_params = worker.ask(cmd="build", spec=spec, batch=path)["params"]
    net = JaxViT(args, images, targets)
    if torch_params != net.num_params():
        raise SystemExit(f"parameter counts differ: timm {torch_params}, vqlc "
                         f"{net.num_params()}: not the same network, no timing done.")
    log(f"ViT-{args.size} at {args.image_size} px: {net.num_params():,} parameters on both "
        "sides")
    return net


def bench(args, worker, net: JaxViT) -> dict:
    start = time.perf_counter()
    first_jax = net.train()
    compile_s = time.perf_counter() - start
    first_torch = worker.ask(cmd="train")
    for _ in range(args.warmup - 1):
        worker.ask(cmd="train")
        net.train()
    torch_t, jax_t = [], []
    for _ in range(args.steps):
        answer = worker.ask(cmd="train")
        torch_t.append(answer["t"])
        jax_t.append(net.train()["t"])
    return {"torch": torch_t, "vqlc": jax_t, "compile_s": compile_s,
            "first_loss": (first_jax["loss"], first_torch["loss"]),
            "rss": (max_rss_mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss),
                    max_rss_mib(answer["max_rss_kib"]))}


# ------------------------------------------------------------------------------------ report

def rate(images: int, times: list) -> float:
    return images / statistics.median(times)


def rate_text(images: int, times: list) -> str:
    text = f"{rate(images, times):.3g}"
    if len(times) > 1:
        text += f" ({images / max(times):.3g}-{images / min(times):.3g})"
    return text


def table(args, params: int, r: dict) -> str:
    ratio = rate(args.batch, r["vqlc"]) / rate(args.batch, r["torch"])
    vqlc_extra = [f"vqlc {args.dtype}" if args.dtype != "float32" else "",
                  "vqlc remat" if args.remat else ""]
    vqlc_extra = ", ".join(e for e in vqlc_extra if e)
    note = (f"median of {args.steps} steps after {args.warmup} warm-up; first loss vqlc "
            f"{r['first_loss'][0]:.3f}, timm {r['first_loss'][1]:.3f}; vqlc compile + 1st "
            f"step {r['compile_s']:.0f} s" +
            (f"; {vqlc_extra} (timm float32, no checkpointing)" if vqlc_extra else ""))
    return "\n".join([
        "| what | vqlc img/s (range) | timm img/s (range) | ratio vqlc/timm | vqlc peak RSS "
        "| timm peak RSS | notes |",
        "|---|---|---|---|---|---|---|",
        f"| train ViT-{args.size}, {args.image_size} px, {params / 1e6:.1f}M params, batch "
        f"{args.batch} | {rate_text(args.batch, r['vqlc'])} | "
        f"{rate_text(args.batch, r['torch'])} | {ratio:.2f}x | {r['rss'][0]:.0f} MiB | "
        f"{r['rss'][1]:.0f} MiB | {note} |"])


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("--size", default="B/16",
                        help=f"<size>/<patch>, size one of {', '.join(vit.SIZES)}")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=5, help="timed train steps each")
    parser.add_argument("--warmup", type=int, default=2, help="untimed train steps each")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch.set_num_threads, and the cores both processes run on")
    parser.add_argument("--remat", action="store_true", help="vqlc: recompute each block")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="vqlc's compute dtype (timm stays float32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch-python", default=TORCH_VENV if os.path.exists(TORCH_VENV)
                        else sys.executable)
    args = parser.parse_args()
    try:
        size, patch = args.size.split("/")
        args.patch = int(patch)
    except ValueError:
        parser.error(f"--size {args.size!r}: want <size>/<patch>, e.g. B/16")
    if size not in vit.SIZES:
        parser.error(f"--size {args.size!r}: size one of {', '.join(vit.SIZES)}")
    if args.image_size % args.patch:
        parser.error(f"--image-size {args.image_size} is not a multiple of the patch "
                     f"{args.patch}")
    if args.warmup < 1 or args.steps < 1 or args.batch < 1 or args.threads < 1:
        parser.error("--warmup, --steps, --batch and --threads must be >= 1")
    return args


def main():
    args = parse_args()
    limit_threads(args.threads)
    start = time.perf_counter()
    worker = TorchWorker(args.torch_python, os.path.join(HERE, "vit_timm_worker.py"),
                         args.threads)
    try:
        net = build(args, worker)
        result = bench(args, worker, net)
        print("\n" + machine_line(worker, f" (timm {worker.hello['timm']})", args.dtype))
    finally:
        worker.close()
    print(table(args, net.num_params(), result))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
