"""vqlc's DiT / SiT against a PyTorch DiT (facebookresearch/DiT's models.py network and
gaussian_diffusion loss and sampler, SiT's torchdiffeq ODE sampler), side by side: train-step and
sampling throughput, float32 on the CPU.

    unset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE
    python benchmarks/dit_vs_torch.py [--train-batch 8] [--sample-batch 4] [--steps 3]
        [--warmup 1] [--ddpm-steps 250] [--repeats 1] [--threads 2]
        [--geometries 16x16x8,32x32x4] [--torch-python /work/venv-torch/bin/python]

PyTorch runs in a worker subprocess (benchmarks/dit_torch_worker.py, with --torch-python: torch,
numpy and torchdiffeq installed); JAX in this process. The PyTorch network is the from-scratch
reference DiT of tests/golden/make_dit_release_golden.py (DiT's module names and forward math);
vqlc's is vqlc.gen.networks.dit.make_dit("S/2", ...). DiT-S/2: 12 blocks, width 384, 6 heads,
patch 2, 1000 classes + the null class, learned sigma (2C outputs); 32.9M parameters.

Weights: the worker draws every weight at random (N(0, 1/fan_in); DiT's adaLN-Zero init would
make the network the zero map, and the check below vacuous) and saves its state_dict; vqlc loads
it with vqlc.gen.convert_dit.release_to_params, the release converter's own mapping. Before any
timing, both networks run the same inputs (latents, DDPM and flow timesteps, labels with the
null class) and the largest output difference is printed and must be below 1e-4 (--atol), so
the two sides time the same network. Sampling uses these initial weights on both sides.

Rows (images/s from the median of the timed runs, with the range slowest-fastest when there
are several; ratio = vqlc images/s / torch images/s, > 1 means vqlc is faster):
  train HxWxC  one optimiser step at --train-batch (default 8) on latents HxWxC (16x16x8: the
          VQGAN-LC f16 tokenizer's, 64 tokens; 32x32x4: 256 tokens), DiT's loss on both sides:
          t uniform over 1000 steps, q_sample, MSE on epsilon + the hybrid VLB (KL, or the
          discretized Gaussian NLL at t = 0, in bits/dim, mean over dims, frozen epsilon) for
          the learned-range variance, batch mean; class dropout 0.1 to the null label; AdamW lr
          1e-4, betas (0.9, 0.999), no weight decay, no EMA on either side. vqlc:
          diffusion_train.make_loss_fn + trainer.make_optimizer / make_train_step, jitted with
          the state donated; PyTorch: the worker's loss (DiT's training_losses, written out),
          loss.backward(), AdamW.step(). After --warmup steps each (the JAX compile is in the
          first, excluded), --steps timed steps alternate between the frameworks so that load
          from other processes hits both alike.
  sample DDPM  DiT's ancestral sampler on the 1000-step linear schedule respaced to
          --ddpm-steps (default 250; DiT's space_timesteps / SpacedDiffusion), learned sigma,
          no guidance, no clipping, batch --sample-batch (default 4), 16x16x8. vqlc:
          samplers.ddpm.sample_ddpm inside jit with the params as an argument (compiled ahead,
          not timed); PyTorch: the worker's plain loop (warmed up by a 2-step run). --repeats
          full runs each, alternating.
  sample dopri5  SiT: the same network and weights as a velocity model (the first C output
          channels, t in [0, 1], 1 = data), the probability-flow ODE from t = 0 to 1 with
          dopri5, atol 1e-6, rtol 1e-3, from the same starting noise on both sides, batch
          --sample-batch, 16x16x8. vqlc: samplers.ode.sample_ode(method="dopri5") inside jit
          (diffrax, each sample vmapped with its own adaptive steps: the batch runs until its
          slowest sample is done; stats["nfe"] per sample); PyTorch: torchdiffeq.odeint(
          method="dopri5"), one step size and error norm shared over the batch, function
          evaluations counted. NFE may therefore differ between the sides (and torchdiffeq
          spends 2 evaluations on its first-step guess, diffrax none; see
          vqlc/gen/samplers/ode.py); the notes give both, and how far apart the two results
          land. With random weights the ODE may be easy or hard; it is the same ODE on both
          sides.

torch.set_num_threads(--threads); XLA's CPU thread pool uses every core of this process. On a
shared CPU, torch's OpenMP threads lose most when other processes take cores (see
benchmarks/train_step.py): the ranges show the spread. Runtime: the default run took 18
minutes on 2 cores shared with other jobs (load 4-12; PyTorch's 250-step DDPM run alone 7.5
minutes, each JAX train-step compile + first step about 2); not measured on idle cores. Quick
look: --ddpm-steps 50 --geometries 16x16x8 (or --ddpm-steps 0 / --no-dopri5 to skip rows).
"""
import argparse
import os
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

from vqlc.gen import convert_dit, diffusion_train, trainer  # noqa: E402
from vqlc.gen.networks import dit  # noqa: E402
from vqlc.gen.objectives import diffusion  # noqa: E402
from vqlc.gen.samplers import ddpm, ode  # noqa: E402
from torch_worker_client import TorchWorker, machine_line  # noqa: E402

TORCH_VENV = "/work/venv-torch/bin/python"
SIZE = "S/2"
NUM_CLASSES = 1000
CLASS_DROPOUT = 0.1
LR = 1e-4
ATOL, RTOL = 1e-6, 1e-3  # SiT's dopri5 tolerances
SAMPLE_GEOMETRY = "16x16x8"


def parse_geometry(text: str):
    h, w, c = (int(v) for v in text.split("x"))
    if h != w:
        raise SystemExit(f"geometry {text!r}: DiT needs square latents")
    return h, c


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def nchw(x) -> list:
    return np.asarray(x, np.float32).transpose(0, 3, 1, 2).tolist()


def nhwc(x) -> np.ndarray:
    return np.asarray(x, np.float32).transpose(0, 2, 3, 1)


# ------------------------------------------------------------------------------- the JAX side

class JaxDiT:
    """vqlc's DiT-S/2 on one latent geometry, with the worker's weights."""

    def __init__(self, worker, name: str, side: int, channels: int, seed: int):
        self.name, self.side, self.channels = name, side, channels
        self.shape = (side, side, channels)
        self.model = dit.make_dit(SIZE, input_size=side, in_channels=channels,
                                  num_classes=NUM_CLASSES, learn_sigma=True)
        geometry = dict(input_size=side, patch=self.model.patch_size, channels=channels,
                        width=self.model.hidden_size, depth=self.model.depth,
                        heads=self.model.num_heads, num_classes=NUM_CLASSES)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "weights.npz")
            self.torch_params = worker.ask(cmd="build", name=name, geometry=geometry, seed=seed,
                                           weights=path)["params"]
            with np.load(path) as state_dict:
                params = convert_dit.release_to_params(dict(state_dict), self.model)
        self.params = jax.tree.map(jnp.asarray, params)
        self.apply = jax.jit(self.model.apply)

    def num_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self.params))

    def check_same_network(self, worker, atol: float) -> float:
        """Max |vqlc - torch| over one forward pass at DDPM and flow timesteps."""
        rng = np.random.default_rng(1)
        x = rng.standard_normal((4, *self.shape)).astype(np.float32)
        y = np.array([0, 7, 999, NUM_CLASSES], np.int32)  # the last: the null class
        worst = 0.0
        for t in (np.array([0, 417, 999, 3], np.float32), np.array([0, .37, 1, .9], np.float32)):
            mine = np.asarray(self.apply({"params": self.params}, jnp.asarray(x), jnp.asarray(t),
                                         jnp.asarray(y)))
            theirs = nhwc(worker.ask(cmd="forward", name=self.name, x=nchw(x), t=t.tolist(),
                                     y=y.tolist())["out"])
            worst = max(worst, float(np.max(np.abs(mine - theirs))))
        scale = float(np.abs(mine).mean())
        log(f"{self.name}: weight-copy check, max |vqlc - torch| = {worst:.2e} (outputs of "
            f"mean magnitude {scale:.2f}; tolerance {atol:g})")
        if not worst <= atol:
            raise SystemExit(f"{self.name}: vqlc and torch networks differ by {worst:.3g} > "
                             f"{atol:g}: the weight copy is wrong, no timing done.")
        return worst

    # -------------------------------------------------------------------------------- train

    def train_setup(self, latents: np.ndarray, labels: np.ndarray) -> None:
        config = diffusion_train.base_config()
        config.network.kind = "dit"
        config.network.size = SIZE
        config.network.num_classes = NUM_CLASSES
        config.network.class_dropout = CLASS_DROPOUT
        config.network.learn_sigma = True
        config.objective.kind = "ddpm"
        config.objective.schedule = "linear"
        config.optim = trainer.optim_config(lr=LR, weight_decay=0.0, ema_decay=0.0)
        tx = trainer.make_optimizer(config.optim, config.train.num_steps, self.params)
        loss_fn = diffusion_train.make_loss_fn(self.model, config, {"mean": 0.0, "std": 1.0})
        params = jax.tree.map(jnp.copy, self.params)  # the state is donated; keep the initial
        self.state = trainer.fresh_state(params, tx, seed=0, ema=False)
        self.step_fn = jax.jit(trainer.make_train_step(loss_fn, tx, 0.0), donate_argnums=(0,))
        self.batch = {"latents": jnp.asarray(latents), "label": jnp.asarray(labels)}

    def train(self) -> dict:
        start = time.perf_counter()
        self.state, metrics = self.step_fn(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        return {"t": time.perf_counter() - start, "loss": float(metrics["loss"])}

    # ------------------------------------------------------------------------------ sampling

    def compile_ddpm(self, keys, labels, steps: int):
        schedule = diffusion.make_schedule("linear")
        model, shape = self.model, self.shape

        def sample(params, keys, labels):
            def model_fn(x, t, y):
                return model.apply({"params": params}, x, t, y)
            return ddpm.sample_ddpm(model_fn, schedule, keys, labels, shape, learned_sigma=True,
                                    num_steps=steps)
        return jax.jit(sample).lower(self.params, keys, labels).compile()

    def compile_dopri5(self, keys, labels):
        model, shape = self.model, self.shape

        def sample(params, keys, labels):
            def model_fn(x, t, y):
                return model.apply({"params": params}, x, t, y)
            return ode.sample_ode(model_fn, keys, labels, shape, method="dopri5", atol=ATOL,
                                  rtol=RTOL)
        return jax.jit(sample).lower(self.params, keys, labels).compile()


# ------------------------------------------------------------------------------ measurements

def bench_train(worker, net: JaxDiT, batch: int, steps: int, warmup: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((batch, *net.shape)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, (batch,)).astype(np.int32)
    net.train_setup(latents, labels)
    worker.ask(cmd="train_setup", name=net.name, latents=nchw(latents), labels=labels.tolist(),
               class_dropout=CLASS_DROPOUT, lr=LR)
    start = time.perf_counter()
    first_jax = net.train()
    compile_s = time.perf_counter() - start
    first_torch = worker.ask(cmd="train", name=net.name)
    for _ in range(warmup - 1):
        worker.ask(cmd="train", name=net.name)
        net.train()
    torch_t, jax_t = [], []
    for _ in range(steps):
        torch_t.append(worker.ask(cmd="train", name=net.name)["t"])
        jax_t.append(net.train()["t"])
    return {"what": f"train {net.name}, batch {batch}", "images": batch, "vqlc": jax_t,
            "torch": torch_t,
            "note": f"median of {steps} steps after {warmup} warm-up; first loss torch "
                    f"{first_torch['loss']:.3f}, vqlc {first_jax['loss']:.3f}; vqlc compile + "
                    f"1st step {compile_s:.0f} s"}


def bench_ddpm(worker, net: JaxDiT, batch: int, steps: int, repeats: int) -> dict:
    keys = jax.random.split(jax.random.key(2), batch)
    labels = jnp.arange(batch, dtype=jnp.int32) % NUM_CLASSES
    start = time.perf_counter()
    compiled = net.compile_ddpm(keys, labels, steps)
    compile_s = time.perf_counter() - start
    worker.ask(cmd="ddpm", name=net.name, steps=2, labels=labels.tolist(), seed=0)  # warm-up
    torch_t, jax_t = [], []
    for i in range(repeats):
        torch_t.append(worker.ask(cmd="ddpm", name=net.name, steps=steps, labels=labels.tolist(),
                                  seed=i)["t"])
        start = time.perf_counter()
        jax.block_until_ready(compiled(net.params, keys, labels))
        jax_t.append(time.perf_counter() - start)
    return {"what": f"sample DDPM {steps} steps, {net.name}, batch {batch}", "images": batch,
            "vqlc": jax_t, "torch": torch_t,
            "note": f"{repeats} full run(s) each, learned sigma, no guidance; vqlc compile "
                    f"{compile_s:.0f} s (not timed)"}


def bench_dopri5(worker, net: JaxDiT, batch: int, repeats: int) -> dict:
    keys = jax.random.split(jax.random.key(3), batch)
    labels = jnp.arange(batch, dtype=jnp.int32) % NUM_CLASSES
    x0 = np.asarray(ode.initial_noise(keys, net.shape))
    start = time.perf_counter()
    compiled = net.compile_dopri5(keys, labels)
    compile_s = time.perf_counter() - start
    torch_t, jax_t = [], []
    for _ in range(repeats):
        answer = worker.ask(cmd="dopri5", name=net.name, x0=nchw(x0), labels=labels.tolist(),
                            atol=ATOL, rtol=RTOL)
        torch_t.append(answer["t"])
        start = time.perf_counter()
        x1, stats = jax.block_until_ready(compiled(net.params, keys, labels))
        jax_t.append(time.perf_counter() - start)
    nfe = np.asarray(stats["nfe"]).tolist()
    diff = float(np.max(np.abs(np.asarray(x1) - nhwc(answer["x1"]))))
    scale = float(np.abs(np.asarray(x1)).mean())
    return {"what": f"sample dopri5 (SiT), {net.name}, batch {batch}", "images": batch,
            "vqlc": jax_t, "torch": torch_t, "nfe": (nfe, answer["nfe"]),
            "note": f"NFE vqlc per sample {nfe} (batch runs to the max), torch {answer['nfe']} "
                    f"(shared steps); max |x1 vqlc - x1 torch| {diff:.1e} (|x1| mean "
                    f"{scale:.2f}); atol {ATOL:g} rtol {RTOL:g}; {repeats} run(s) each; vqlc "
                    f"compile {compile_s:.0f} s (not timed)"}


# ------------------------------------------------------------------------------------ report

def rate(images: int, times: list) -> float:
    return images / statistics.median(times)


def rate_text(images: int, times: list) -> str:
    text = f"{rate(images, times):.3g}"
    if len(times) > 1:
        text += f" ({images / max(times):.3g}-{images / min(times):.3g})"
    return text


def table(rows: list) -> str:
    lines = ["| what | vqlc img/s (range) | torch img/s (range) | ratio vqlc/torch | notes |",
             "|---|---|---|---|---|"]
    for r in rows:
        ratio = rate(r["images"], r["vqlc"]) / rate(r["images"], r["torch"])
        lines.append(f"| {r['what']} | {rate_text(r['images'], r['vqlc'])} | "
                     f"{rate_text(r['images'], r['torch'])} | {ratio:.2f}x | {r['note']} |")
    return "\n".join(lines)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 3)[3])
    parser.add_argument("--geometries", default="16x16x8,32x32x4",
                        help="latent HxWxC of the train rows")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed train steps each")
    parser.add_argument("--warmup", type=int, default=1, help="untimed train steps each")
    parser.add_argument("--sample-batch", type=int, default=4)
    parser.add_argument("--ddpm-steps", type=int, default=250,
                        help="respaced DDPM steps (0: skip the row)")
    parser.add_argument("--repeats", type=int, default=1, help="timed sampling runs each")
    parser.add_argument("--no-dopri5", action="store_true", help="skip the dopri5 row")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="largest output difference allowed by the weight-copy check")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch-python", default=TORCH_VENV if os.path.exists(TORCH_VENV)
                        else sys.executable)
    args = parser.parse_args()
    args.geometries = [g for g in args.geometries.split(",") if g]
    for g in args.geometries:
        parse_geometry(g)
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        parser.error("--warmup, --steps and --repeats must be >= 1")
    return args


def main():
    args = parse_args()
    start = time.perf_counter()
    worker = TorchWorker(args.torch_python, os.path.join(HERE, "dit_torch_worker.py"),
                         args.threads)
    rows = []
    try:
        sampling = bool(args.ddpm_steps) or not args.no_dopri5
        names = list(dict.fromkeys(args.geometries + [SAMPLE_GEOMETRY] * sampling))
        nets = {}
        for name in names:
            side, channels = parse_geometry(name)
            nets[name] = JaxDiT(worker, name, side, channels, args.seed)
            net = nets[name]
            if net.torch_params != net.num_params():
                raise SystemExit(f"{name}: parameter counts differ: torch {net.torch_params}, "
                                 f"vqlc {net.num_params()}")
            log(f"{name}: DiT-{SIZE}, {net.num_params() / 1e6:.1f}M parameters")
            net.check_same_network(worker, args.atol)
        for name in args.geometries:
            log(f"train {name}")
            rows.append(bench_train(worker, nets[name], args.train_batch, args.steps,
                                    args.warmup, args.seed))
        sampler = nets.get(SAMPLE_GEOMETRY)
        if args.ddpm_steps:
            log(f"sample DDPM {args.ddpm_steps} steps")
            rows.append(bench_ddpm(worker, sampler, args.sample_batch, args.ddpm_steps,
                                   args.repeats))
        if not args.no_dopri5:
            log("sample dopri5")
            rows.append(bench_dopri5(worker, sampler, args.sample_batch, args.repeats))
        print("\n" + machine_line(worker))
    finally:
        worker.close()
    print(table(rows))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
