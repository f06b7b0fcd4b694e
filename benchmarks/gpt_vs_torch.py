"""vqlc's `mingpt` against the release's minGPT in PyTorch (taming's), side by side: train-step
and sampling throughput, float32 on the CPU.

    python benchmarks/gpt_vs_torch.py [--sizes demo,B] [--steps 8,3] [--threads 2]
        [--torch-python /work/venv-torch/bin/python]

PyTorch runs in a worker subprocess (benchmarks/gpt_torch_worker.py, with --torch-python: torch
and taming-transformers installed); JAX in this process. Both build the same network (taming's
GPT: learned positions, pre-LN blocks, GELU MLP, untied head over codes + class ids, dropout 0)
and get the same batch of codes and labels.

  train   one optimiser step, forward + backward + AdamW (0.9, 0.95, decay on linear weights),
          inputs corrupted with pkeep 0.8. vqlc: gpt_train.make_train_step (the chunked
          cross-entropy, objective.chunk_size) from vqlc/configs/gpt_demo.py resized; PyTorch:
          the release's shared_step (F.cross_entropy over the full logits). After --warmup
          steps each (the JAX compile is in the first), the timed steps alternate between the
          frameworks so that load from other processes hits both alike; tokens/s from the
          median step (tokens = batch * codes).
  sample  a whole token map, temperature 1, top-k (--top-k, default 10% of the codes). vqlc:
          the KV-cache sampler (vqlc.gen.samplers.autoregressive.sample, compiled by an
          untimed run first). PyTorch "recompute": taming's mingpt.sample, the release's way
          (the growing prefix through the whole network each step, no cache); "past": taming's
          sample_with_past (forward_with_past's cache). Median of --repeats.
          --prefix-points P > 0 (default for B: 5) estimates PyTorch's recompute time instead
          of running it: one step of taming's `sample` timed at P prefix lengths from 1 to the
          map's length, interpolated linearly over every length and summed (each step's cost
          depends only on its prefix length).

Sizes (--sizes; --steps, --train-batch, --sample-batch, --repeats, --prefix-points give one value
per size or one for all):
  demo  vqlc/configs/gpt_demo.py: 4 layers, width 192, 4 heads, 8x8 = 64 codes of 512 + 7
        classes; train batch 32, sample batch 8, chunk 16
  B     GPT-B-like: 12 layers, width 768, 12 heads, 16x16 = 256 codes of 16,384 + 1,000 classes;
        train batch 2, sample batch 2, chunk 32

torch.set_num_threads(--threads); XLA's CPU thread pool uses every core of this process. On a
shared CPU, torch's OpenMP threads lose most when other processes take cores (see
benchmarks/train_step.py): the table gives each median's range (slowest-fastest run) to show it.
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]  # vqlc; the shared torch_worker_client
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vqlc import parallel  # noqa: E402
from vqlc.configs import gpt_demo  # noqa: E402
from vqlc.gen import gpt_train, trainer  # noqa: E402
from vqlc.gen.samplers import autoregressive as ar  # noqa: E402
from torch_worker_client import TorchWorker, machine_line  # noqa: E402

TORCH_VENV = "/work/venv-torch/bin/python"
SIZES = {
    "demo": dict(num_layers=4, width=192, num_heads=4, codebook_size=512, num_classes=7,
                 grid=8, chunk_size=16),
    "B": dict(num_layers=12, width=768, num_heads=12, codebook_size=16384, num_classes=1000,
              grid=16, chunk_size=32),
}
DEFAULTS = dict(steps="8,3", warmup="2,1", train_batch="32,2", sample_batch="8,2",
                repeats="3,1", prefix_points="0,5")


# ---------------------------------------------------------------------------------- the sizes

def make_config(size: dict, batch: int):
    """vqlc/configs/gpt_demo.py's config, resized."""
    c = gpt_demo.get_config()
    for field in ("num_layers", "width", "num_heads", "num_classes"):
        c.network[field] = size[field]
    c.objective.chunk_size = size["chunk_size"]
    c.train.batch_size = batch
    return c


def torch_spec(config, size: dict, codes: np.ndarray, labels: np.ndarray) -> dict:
    o = config.optim
    return dict(seed=config.seed, codebook_size=size["codebook_size"],
                num_classes=size["num_classes"], num_codes=codes.shape[1],
                num_layers=size["num_layers"], num_heads=size["num_heads"],
                width=size["width"], pkeep=config.objective.pkeep, lr=o.lr, b1=o.b1, b2=o.b2,
                eps=o.eps, weight_decay=o.weight_decay, codes=codes.tolist(),
                labels=labels.tolist())


def make_batch(size: dict, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, size["codebook_size"], (batch, size["grid"] ** 2), dtype=np.int32)
    labels = rng.integers(0, size["num_classes"], (batch,), dtype=np.int32)
    return codes, labels


# ------------------------------------------------------------------------------- the JAX side

class JaxGPT:
    def __init__(self, config, size: dict, codes: np.ndarray, labels: np.ndarray):
        self.codebook_size = size["codebook_size"]
        self.model = gpt_train.make_model(config, self.codebook_size, codes.shape[1])
        params_shape = jax.eval_shape(lambda: self.model.init(
            jax.random.key(0), jnp.zeros((1,), jnp.int32),
            jnp.zeros((1, codes.shape[1]), jnp.int32))["params"])
        tx = trainer.make_optimizer(config.optim, config.train.num_steps, params_shape)
        self.state = gpt_train.init_state(self.model, tx, seed=config.seed, ema=False,
                                          mesh=parallel.make_mesh(1))
        self.step_fn = jax.jit(gpt_train.make_train_step(self.model, tx, config,
                                                         self.codebook_size),
                               donate_argnums=(0,))
        self.batch = {"codes": jnp.asarray(codes), "label": jnp.asarray(labels)}

    def num_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self.state.params))

    def train(self) -> dict:
        start = time.perf_counter()
        self.state, metrics = self.step_fn(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        return {"t": time.perf_counter() - start, "loss": float(metrics["loss"])}

    def sample(self, batch: int, top_k: int) -> dict:
        keys = jax.random.split(jax.random.key(2), batch)
        labels = jnp.arange(batch, dtype=jnp.int32) % self.model.num_classes
        start = time.perf_counter()
        codes = ar.sample(self.model, {"params": self.state.params}, keys, labels,
                          temperature=1.0, top_k=top_k)
        jax.block_until_ready(codes)
        return {"t": time.perf_counter() - start, "tokens": int(codes.size)}


# ------------------------------------------------------------------------------ measurements

def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def bench_train(worker, jgpt, batch: int, num_codes: int, steps: int, warmup: int) -> dict:
    start = time.perf_counter()
    first_jax = jgpt.train()
    compile_s = time.perf_counter() - start
    first_torch = worker.ask(cmd="train")
    for _ in range(warmup - 1):
        worker.ask(cmd="train")
        jgpt.train()
    torch_t, jax_t = [], []
    for _ in range(steps):
        torch_t.append(worker.ask(cmd="train")["t"])
        jax_t.append(jgpt.train()["t"])
    tokens = batch * num_codes
    return {"what": f"train step, batch {batch}", "tokens": tokens, "torch": torch_t,
            "vqlc": jax_t,
            "note": f"median of {steps} steps after {warmup} warm-up; first loss "
                    f"torch {first_torch['loss']:.3f} vqlc {first_jax['loss']:.3f}; "
                    f"vqlc first step (compile) {compile_s:.0f} s"}


def recompute_estimate(worker, batch: int, num_codes: int, top_k: int, points: int) -> float:
    """Seconds of taming's `sample` over a whole map, from one step at `points` prefix lengths:
    the step producing code t reads a prefix of t tokens (class token + t - 1 codes)."""
    lengths = np.unique(np.linspace(1, num_codes, points).round().astype(int))
    worker.ask(cmd="prefix", batch=batch, length=int(lengths[-1]), top_k=top_k)  # warm-up
    costs = [worker.ask(cmd="prefix", batch=batch, length=int(n), top_k=top_k)["t"]
             for n in lengths]
    return float(np.interp(np.arange(1, num_codes + 1), lengths, costs).sum())


def bench_sample(worker, jgpt, batch: int, num_codes: int, top_k: int, repeats: int,
                 points: int) -> list:
    start = time.perf_counter()
    jgpt.sample(batch, top_k)
    compile_s = time.perf_counter() - start
    worker.ask(cmd="sample", how="past", batch=batch, top_k=top_k)  # warm-up
    times = {"recompute": [], "past": [], "vqlc": []}
    for _ in range(repeats):
        if not points:
            times["recompute"].append(
                worker.ask(cmd="sample", how="recompute", batch=batch, top_k=top_k)["t"])
        times["past"].append(worker.ask(cmd="sample", how="past", batch=batch, top_k=top_k)["t"])
        times["vqlc"].append(jgpt.sample(batch, top_k)["t"])
    if points:
        times["recompute"].append(recompute_estimate(worker, batch, num_codes, top_k, points))
    tokens = batch * num_codes
    how = (f"est. from {points} prefix lengths" if points
           else f"median of {repeats} full maps")
    note = f"batch {batch}, top-k {top_k}; vqlc median of {repeats} (compile+1st run " \
           f"{compile_s:.0f} s)"
    return [{"what": "sample: torch recompute (release) vs vqlc KV cache",
             "tokens": tokens, "torch": times["recompute"], "vqlc": times["vqlc"],
             "note": f"{note}; torch {how}"},
            {"what": "sample: torch sample_with_past vs vqlc KV cache",
             "tokens": tokens, "torch": times["past"], "vqlc": times["vqlc"],
             "note": f"{note}; torch median of {repeats}"}]


def bench_size(args, worker, name: str, i: int) -> list:
    size = SIZES[name]
    batch = args.train_batch[i]
    config = make_config(size, batch)
    codes, labels = make_batch(size, batch)
    log(f"{name}: building (train batch {batch})")
    torch_params = worker.ask(cmd="build", spec=torch_spec(config, size, codes, labels))["params"]
    jgpt = JaxGPT(config, size, codes, labels)
    if torch_params != jgpt.num_params():
        log(f"warning: parameter counts differ: torch {torch_params}, vqlc {jgpt.num_params()}")
    rows = [bench_train(worker, jgpt, batch, codes.shape[1], args.steps[i], args.warmup[i])]
    log(f"{name}: train done; sampling")
    top_k = args.top_k or max(1, size["codebook_size"] // 10)
    rows += bench_sample(worker, jgpt, args.sample_batch[i], codes.shape[1], top_k,
                         args.repeats[i], args.prefix_points[i])
    for row in rows:
        row.update(size=name, params=torch_params)
    log(f"{name}: done")
    return rows


# ------------------------------------------------------------------------------------ report

def rate(tokens: int, times: list) -> float:
    return tokens / statistics.median(times)


def rate_text(tokens: int, times: list) -> str:
    """Median tokens/s, with the range over the timed runs when there are several."""
    text = f"{rate(tokens, times):.1f}"
    if len(times) > 1:
        text += f" ({tokens / max(times):.0f}-{tokens / min(times):.0f})"
    return text


def table(rows: list) -> str:
    lines = ["| size | params | what | torch tok/s (range) | vqlc tok/s (range) | vqlc / torch "
             "| notes |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = rate(r["tokens"], r["vqlc"]) / rate(r["tokens"], r["torch"])
        lines.append(f"| {r['size']} | {r['params'] / 1e6:.1f}M | {r['what']} | "
                     f"{rate_text(r['tokens'], r['torch'])} | "
                     f"{rate_text(r['tokens'], r['vqlc'])} | {ratio:.2f}x | {r['note']} |")
    return "\n".join(lines)


def per_size(text: str, sizes: list, flag: str) -> list:
    """One value per size: one value for all, one per size, or the default's value by name."""
    values = [int(v) for v in text.split(",")]
    if text == DEFAULTS[flag]:
        return [values[list(SIZES).index(s)] for s in sizes]
    if len(values) == 1:
        return values * len(sizes)
    if len(values) != len(sizes):
        raise SystemExit(f"--{flag.replace('_', '-')} {text!r}: give one value, or one per size.")
    return values


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("--sizes", default="demo,B")
    parser.add_argument("--torch-python", default=TORCH_VENV if os.path.exists(TORCH_VENV)
                        else sys.executable)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--top-k", type=int, default=0, help="0: 10%% of the codes")
    for flag, default in DEFAULTS.items():
        parser.add_argument("--" + flag.replace("_", "-"), default=default,
                            help="per size, or one for all")
    args = parser.parse_args()
    args.sizes = args.sizes.split(",")
    unknown = [s for s in args.sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown sizes {unknown}; valid: {', '.join(SIZES)}")
    for flag in DEFAULTS:
        setattr(args, flag, per_size(getattr(args, flag), args.sizes, flag))
    return args


def main():
    args = parse_args()
    start = time.perf_counter()
    worker = TorchWorker(args.torch_python, os.path.join(HERE, "gpt_torch_worker.py"),
                         args.threads)
    try:
        rows = [row for i, name in enumerate(args.sizes) for row in bench_size(args, worker,
                                                                              name, i)]
        print("\n" + machine_line(worker))
    finally:
        worker.close()
    print(table(rows))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
