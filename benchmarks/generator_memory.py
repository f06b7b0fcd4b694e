"""Training-state memory of the paper's generators per device, replicated against FSDP
(`mesh.shard_params`), from the shardings the trainer gives the state on N virtual devices.

    python benchmarks/generator_memory.py [--devices 8]
        [--configs gpt_lc_imagenet,dit_lc_imagenet@16x16x8,ldm_lc_imagenet:f8@32x32x4]

A config is a shipped config name ([:variant]); a diffusion config takes the latent geometry
after '@' (h x w x C: the LC f16 tokenizer's is 16x16x8, f8's 32x32x4), a gpt config the
codebook size and token count with --codebook-size / --tokens. The state is what the trainer
keeps (vqlc.gen.trainer.TrainState): float32 parameters, AdamW's two moments, the EMA of the
weights (when the config keeps one), the step and RNG. Nothing is allocated: shapes come from
jax.eval_shape and bytes per device from each array's shard shape, so the paper's sizes cost
seconds. Activations are not counted (they depend on the batch, remat and the compiler).
"""
import argparse
import os
import sys

DEFAULT_CONFIGS = ("gpt_lc_imagenet,llamagen_imagenet:XL,dit_lc_imagenet@16x16x8,"
                   "sit_lc_imagenet@16x16x8,ldm_lc_imagenet:f16@16x16x8,"
                   "ldm_lc_imagenet:f8@32x32x4")
MIB = 2 ** 20


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--configs", default=DEFAULT_CONFIGS)
    p.add_argument("--codebook-size", type=int, default=100_000)
    p.add_argument("--tokens", type=int, default=256)
    return p.parse_args(argv)


def state_shapes(spec: str, codebook_size: int, tokens: int):
    """(config, shapes of the initial TrainState) of one 'name[:variant][@hxwxc]'."""
    import jax
    from vqlc import cli
    from vqlc.gen import trainer
    name, _, geometry = spec.partition("@")
    config = cli.shipped_config(name)
    if config.task == "gpt":
        from vqlc.gen import gpt_train
        model = gpt_train.make_model(config, codebook_size, tokens)
        init_params = gpt_train.init_params_fn(model)
    elif config.task == "diffusion":
        from vqlc.gen import diffusion_train
        if not geometry:
            raise SystemExit(f"{spec}: a diffusion config needs its latent geometry, "
                             f"e.g. {name}@16x16x8.")
        shape = tuple(int(s) for s in geometry.split("x"))
        model = diffusion_train.make_model(config.network, config.model, shape)
        init_params = diffusion_train.init_params_fn(model, shape)
    else:
        raise SystemExit(f"{spec}: task {config.task!r} is not a generator.")
    steps = config.train.num_steps

    def init():
        params = init_params(jax.random.key(0))
        tx = trainer.make_optimizer(config.optim, steps, params)
        return trainer.fresh_state(params, tx, seed=0, ema=bool(config.optim.ema_decay))
    return config, jax.eval_shape(init)


def bytes_per_device(shapes, shardings) -> int:
    import jax
    import numpy as np
    return sum(int(np.prod(sh.shard_shape(s.shape), dtype=np.int64)) * s.dtype.itemsize
               for s, sh in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)))


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
    import jax
    from vqlc import parallel
    from vqlc.gen import trainer
    mesh = parallel.make_mesh(args.devices)
    print(f"{args.devices} virtual devices; MiB per device of the training state (params, "
          "AdamW moments, EMA)")
    print("| config | parameters | replicated / device | FSDP / device | ratio |\n"
          "|---|---|---|---|---|")
    for spec in args.configs.split(","):
        config, shapes = state_shapes(spec, args.codebook_size, args.tokens)
        params = sum(x.size for x in jax.tree.leaves(shapes.params))
        rows = {}
        for shard in (False, True):
            shardings = parallel.state_shardings(mesh, shapes, shard, trainer.SHARDED_FIELDS)
            rows[shard] = bytes_per_device(shapes, shardings)
        print(f"| {spec} | {params / 1e6:.1f}M | {rows[False] / MIB:,.0f} | "
              f"{rows[True] / MIB:,.0f} | "
              f"{rows[True] / rows[False]:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
