"""GPT sampling throughput: the KV-cache sampler against recomputing the prefix every step.

    python benchmarks/gpt_sampling.py [--sizes demo,B] [--batch 8,2] [--kind mingpt]
        [--recompute-steps 0,4] [--repeats 2] [--codes 1024,16384]

Both samplers (vqlc.gen.samplers.autoregressive: `sample` and `sample_recompute`) run the same
model, parameters, batch, keys and settings (temperature 1, top-k 10% of the codes):
  - cache: one prefill, then one decode step per code in one jitted loop;
  - recompute: every step runs the network over the whole static-length code buffer and reads
    the position it needs (the release recomputes too, over a prefix that grows, so it does
    on average half the work per step of this static-length version: the table's last column
    divides the ratio by 2 as an estimate of the speed-up over the release's way).
Each step of the recompute path costs the same (static shapes), so --recompute-steps N > 0
times only the first N codes and reports tokens/s from those (0 = the whole map).

Sizes (--sizes, comma-separated; --batch, --codes and --recompute-steps give one value per
size, or one for all):
  demo  4 layers, width 256, 4 heads, an 8x8 token map (64 codes)
  B     12 layers, width 768, 12 heads, a 16x16 token map (256 codes)
  L     24 layers, width 1024, 16 heads, 16x16 (GPT-LC's geometry; slow on a CPU)

Reported: tokens/s (codes drawn per second over the batch) from the best of --repeats timed
runs after one untimed run that compiles, and the cache / recompute ratio.
"""
import argparse
import time

import jax
import jax.numpy as jnp

from vqlc.gen.networks import gpt
from vqlc.gen.samplers import autoregressive as ar

SIZES = {
    "demo": dict(num_layers=4, width=256, num_heads=4, grid=8),
    "B": dict(num_layers=12, width=768, num_heads=12, grid=16),
    "L": dict(num_layers=24, width=1024, num_heads=16, grid=16),
}
NUM_CLASSES = 10


def build(kind: str, size: str, codes: int):
    spec = SIZES[size]
    model = gpt.make_gpt(kind, codebook_size=codes, num_classes=NUM_CLASSES,
                         block_size=1 + spec["grid"] ** 2, num_layers=spec["num_layers"],
                         num_heads=spec["num_heads"], width=spec["width"])
    labels = jnp.zeros((1,), jnp.int32)
    tokens = jnp.zeros((1, model.num_codes), jnp.int32)
    variables = jax.jit(model.init)(jax.random.key(0), labels, tokens)
    if kind == "llamagen":  # its head starts at zero: every logit equal is no benchmark
        head = jax.random.normal(jax.random.key(1), gpt.head_kernel(variables).shape) * 0.02
        variables["params"]["head"]["kernel"] = head
    return model, variables


def best_time(run, repeats: int, warmup=None) -> float:
    """Seconds of the fastest of `repeats` runs, after one untimed run of `warmup` (default:
    `run`) that compiles."""
    jax.block_until_ready((warmup or run)())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return min(times)


def measure(kind: str, size: str, batch: int, codes: int, recompute_steps: int,
            repeats: int) -> dict:
    model, variables = build(kind, size, codes)
    keys = jax.random.split(jax.random.key(2), batch)
    labels = jnp.arange(batch, dtype=jnp.int32) % NUM_CLASSES
    settings = dict(temperature=1.0, top_k=max(1, codes // 10))
    steps = recompute_steps or model.num_codes
    cached = best_time(lambda: ar.sample(model, variables, keys, labels, **settings), repeats)
    recompute = lambda max_steps: lambda: ar.sample_recompute(  # noqa: E731
        model, variables, keys, labels, max_steps=max_steps, **settings)
    # max_steps is traced: one step compiles the same program the timed runs use.
    recomputed = best_time(recompute(steps), repeats, warmup=recompute(1))
    return {"size": size, "batch": batch, "tokens": model.num_codes, "codes": codes,
            "params": gpt.param_counts(model)["total"],
            "cache": batch * model.num_codes / cached, "recompute": batch * steps / recomputed,
            "recompute_steps": steps}


def per_size(text: str, sizes: list, cast=int) -> list:
    values = [cast(v) for v in text.split(",")]
    if len(values) == 1:
        return values * len(sizes)
    if len(values) != len(sizes):
        raise SystemExit(f"{text!r}: give one value, or one per size ({len(sizes)}).")
    return values


def table(rows: list) -> str:
    lines = ["| size | params | batch | tokens | codes | cache tok/s | recompute tok/s "
             "(steps timed) | cache / recompute | vs growing prefix (est.) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["cache"] / r["recompute"]
        lines.append(f"| {r['size']} | {r['params'] / 1e6:.1f}M | {r['batch']} | {r['tokens']} "
                     f"| {r['codes']} | {r['cache']:.1f} | {r['recompute']:.2f} "
                     f"({r['recompute_steps']}) | {ratio:.1f}x | {ratio / 2:.1f}x |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("--sizes", default="demo,B")
    parser.add_argument("--batch", default="8,2", help="per size, or one for all")
    parser.add_argument("--codes", default="1024,16384", help="codebook size, per size")
    parser.add_argument("--recompute-steps", default="0,4",
                        help="codes the recompute path times (0 = all), per size")
    parser.add_argument("--kind", default="mingpt", choices=sorted(gpt.KINDS))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    sizes = args.sizes.split(",")
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise SystemExit(f"unknown sizes {unknown}; valid: {', '.join(SIZES)}.")
    rows = []
    for size, batch, codes, steps in zip(sizes, per_size(args.batch, sizes),
                                         per_size(args.codes, sizes),
                                         per_size(args.recompute_steps, sizes)):
        start = time.perf_counter()
        rows.append(measure(args.kind, size, batch, codes, steps, args.repeats))
        print(f"{size}: {time.perf_counter() - start:.0f} s", flush=True)
    print(f"\n{args.kind} on {jax.devices()[0].platform}, {jax.device_count()} device(s)")
    print(table(rows))


if __name__ == "__main__":
    main()
