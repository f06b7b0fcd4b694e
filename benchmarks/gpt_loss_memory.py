"""GPT output-layer loss: the plain cross-entropy (full [B, T, V] logits) against the chunked one,
peak temporary memory and time of one value_and_grad call (gradients w.r.t. hidden and head).

    python benchmarks/gpt_loss_memory.py [--vocab 101000 --batch 8 --length 256 --width 1024]
                                         [--chunks 8,16,32,64,128] [--time-chunks 32]
                                         [--dtypes float32,bfloat16] [--repeats 1] [--no-time]

Memory is XLA's own account of the compiled program (`jax.jit(...).lower(...).compile()
.memory_analysis()`): temp = the scratch buffers the program allocates beyond its arguments and
outputs (the logits, their softmax and gradient live there), args / out = argument and output
buffers, code = generated code size. It needs no run, so rows too large to execute still get a
figure. Time: the best of --repeats calls of the compiled program (compilation excluded), for
the plain loss and the chunk sizes in --time-chunks; other rows are compiled only ("-").
`hidden` is the dtype of the hidden states; the head kernel stays float32, as the parameters
of a mixed-precision GPT do. Ratios are against the plain loss of the same hidden dtype.
"""
import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vqlc.gen.objectives.next_token import (chunked_cross_entropy,  # noqa: E402
                                            plain_cross_entropy)

MB = 1e6


def make_inputs(batch, length, width, vocab, dtype, seed=0):
    k_hidden, k_kernel, k_targets = jax.random.split(jax.random.key(seed), 3)
    hidden = jax.random.normal(k_hidden, (batch, length, width), jnp.float32).astype(dtype)
    kernel = jax.random.normal(k_kernel, (width, vocab), jnp.float32) / width ** 0.5
    targets = jax.random.randint(k_targets, (batch, length), 0, vocab, jnp.int32)
    return hidden, kernel, targets


def compile_value_and_grad(loss_fn, inputs):
    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in inputs]
    return jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1))).lower(*shapes).compile()


def best_time(compiled, inputs, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*inputs))
        best = min(best, time.perf_counter() - start)
    return best


def measure(name, chunk, loss_fn, inputs, timed, repeats):
    compiled = compile_value_and_grad(loss_fn, inputs)
    memory = compiled.memory_analysis()
    seconds = best_time(compiled, inputs, repeats) if timed else None
    return dict(name=name, chunk=chunk, temp=memory.temp_size_in_bytes,
                args=memory.argument_size_in_bytes, out=memory.output_size_in_bytes,
                code=memory.generated_code_size_in_bytes, seconds=seconds)


def chunked_loss(chunk):
    return lambda h, k, t: chunked_cross_entropy(h, k, t, chunk_size=chunk)


def rows_for_dtype(args, dtype):
    inputs = make_inputs(args.batch, args.length, args.width, args.vocab, dtype)
    timed = not args.no_time
    rows = [measure("plain", "-", plain_cross_entropy, inputs, timed, args.repeats)]
    for chunk in args.chunks:
        rows.append(measure("chunked", chunk, chunked_loss(chunk), inputs,
                            timed and chunk in args.time_chunks, args.repeats))
    return rows


def print_table(dtype, rows):
    plain = rows[0]
    header = (f"{'loss':8} {'hidden':8} {'chunk':>5} {'temp MB':>9} {'temp/plain':>10} "
              f"{'args MB':>8} {'out MB':>7} {'code KB':>8} {'time s':>7} {'time/plain':>10}")
    print(header)
    print("-" * len(header))
    for row in rows:
        timing, ratio = "-", "-"
        if row["seconds"] is not None:
            timing = f"{row['seconds']:.2f}"
            if plain["seconds"] is not None:
                ratio = f"{row['seconds'] / plain['seconds']:.2f}"
        print(f"{row['name']:8} {dtype:8} {row['chunk']:>5} {row['temp'] / MB:9.1f} "
              f"{row['temp'] / plain['temp']:10.3f} {row['args'] / MB:8.1f} "
              f"{row['out'] / MB:7.1f} {row['code'] / 1e3:8.1f} {timing:>7} {ratio:>10}")
    print()


def parse_ints(text):
    return [int(x) for x in text.split(",") if x]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=101_000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--chunks", type=parse_ints, default=[8, 16, 32, 64, 128])
    parser.add_argument("--time-chunks", type=parse_ints, default=[32])
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-time", action="store_true", help="compile and report memory only")
    args = parser.parse_args()

    logits_bytes = args.batch * args.length * args.vocab * 4
    print(f"{jax.devices()[0].platform}: batch {args.batch} x {args.length} tokens, "
          f"width {args.width}, vocab {args.vocab:,}; one float32 logits copy = "
          f"{logits_bytes / MB:.0f} MB; value_and_grad w.r.t. hidden and head kernel\n")
    for dtype in args.dtypes.split(","):
        print_table(dtype, rows_for_dtype(args, jnp.dtype(dtype)))


if __name__ == "__main__":
    main()
