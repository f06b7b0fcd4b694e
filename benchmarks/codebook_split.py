"""The demo tokenizer's train step with a 1,000,000-code LC codebook split over devices.

    python benchmarks/codebook_split.py [--codes 1000000] [--devices 4] [--layouts 4x1,2x2,1x4]
                                        [--steps 10] [--eval-images 512]

The demo model (vqlc/configs/default.py: 32 px crops, batch 16, 8x8 tokens, L1 + quantizer
loss) with an LC codebook of --codes frozen features (feature dim 256, as the demo's VGG16
codebook; here standard-normal rows, seeded, because the demo's photographs hold far fewer than
a million features to cluster). Each layout is a mesh of --devices virtual CPU devices,
DATAxMODEL: the batch over all of them, the codebook split along K over MODEL (4x1 keeps it whole
on every device). Per layout: the codebook's bytes per device (from its shards), the compiled
step's memory per device (XLA's arguments + temporaries), steps/s over --steps steps after a
warm-up, the loss, and the codes the trained-for-a-few-steps model uses on --eval-images
held-out demo crops. With a million codes and a few thousand tokens, utilisation is bounded by
tokens / codes: the table gives tokens per code so the percentage reads correctly.

The virtual devices share this machine's cores: steps/s compares layouts with each other, not
with real devices.
"""
import argparse
import os
import sys
import tempfile
import time


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--codes", type=int, default=1_000_000)
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--layouts", default="4x1,2x2,1x4", help="comma list of DATAxMODEL")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--eval-images", type=int, default=512)
    return p.parse_args()


def main():
    args = parse()
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax
    import numpy as np

    from vqlc import parallel, tokenizer
    from vqlc.configs import default as default_config
    from vqlc.data import make_eval_iterator, make_train_iterator
    from vqlc.models import lpips as lpips_lib
    from vqlc.train import trainer
    from vqlc.train.step import make_train_step

    config = default_config.get_config()
    config.quantizer.codebook_size = args.codes
    config.codebook.build = ""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        config.codebook.path = os.path.join(tmp, "codebook.npy")
        rng = np.random.default_rng(0)
        np.save(config.codebook.path, rng.standard_normal(
            (args.codes, config.codebook.feature_dim), dtype=np.float32))
        batch = next(make_train_iterator(config.data, batch_size=config.train.batch_size,
                                         seed=0))
        eval_it = make_eval_iterator(config.data, batch_size=args.eval_images)
        eval_images = next(iter(eval_it))["image"][:args.eval_images]
        for layout in args.layouts.split(","):
            data, model = (int(v) for v in layout.split("x"))
            print(f"layout {data}x{model} ...", file=sys.stderr, flush=True)
            mesh = parallel.make_mesh(data, model=model)
            config.mesh.model = model
            net, disc, g_tx, d_tx, state, frozen = trainer.setup_model(
                config, os.path.join(tmp, layout), mesh)
            codebook = frozen["frozen"]["quantizer"]["codebook"]
            per_device = max(s.data.nbytes for s in codebook.addressable_shards)
            with jax.set_mesh(mesh):
                sharding = jax.tree.map(lambda x: x.sharding, state)
                lp = jax.device_put(lpips_lib.load_vgg16_lpips_params(),
                                    parallel.replicated(mesh))
                step = jax.jit(make_train_step(net, disc, g_tx, d_tx, config.loss,
                                               lambda p, x, y: lpips_lib.lpips(x, y, params=p)),
                               donate_argnums=(0,),
                               out_shardings=(sharding, parallel.replicated(mesh)))
                gbatch = parallel.global_batch(batch, mesh)
                compiled = step.lower(state, gbatch, frozen, lp).compile()
                stats = compiled.memory_analysis()
                state, metrics = compiled(state, gbatch, frozen, lp)  # warm-up
                jax.block_until_ready(metrics)
                start = time.perf_counter()
                for _ in range(args.steps):
                    state, metrics = compiled(state, gbatch, frozen, lp)
                loss = float(metrics["loss"])
                seconds = time.perf_counter() - start
                encode = jax.jit(tokenizer.encode_fn(net))
                codes = np.asarray(encode(trainer.model_variables(state, frozen),
                                          parallel.global_batch({"x": eval_images}, mesh)["x"]))
            used = len(np.unique(codes))
            rows.append((layout, per_device, stats.argument_size_in_bytes +
                         stats.temp_size_in_bytes, args.steps / seconds, loss, codes.size, used))
            del state, frozen, codebook
    mb = 2 ** 20
    print(f"\nLC demo tokenizer, K = {args.codes:,} codes x {config.codebook.feature_dim} "
          f"features, batch {config.train.batch_size}, {args.devices} virtual CPU devices on "
          f"{os.cpu_count()} cores\n")
    print("| mesh data x model | codebook per device (MB) | step memory per device (MB) "
          "| steps/s | loss | eval tokens | codes used | tokens per code | utilisation |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for layout, cb, mem, rate, loss, tokens, used in rows:
        print(f"| {layout} | {cb / mb:,.0f} | {mem / mb:,.0f} | {rate:.2f} | {loss:.4f} "
              f"| {tokens:,} | {used:,} | {tokens / args.codes:.4f} "
              f"| {100 * used / args.codes:.3f}% |")


if __name__ == "__main__":
    main()
