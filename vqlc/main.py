"""Entry point: python -m vqlc.main --config=configs/<name>.py --workdir=<dir> [--config.x.y=v]

Multi-process runs (several hosts, or N processes on one machine): see launch/ and
vqlc/distributed.py; every process runs this same command.
`config.task` picks the stage, one of TASKS: each names a `run(config, workdir) -> dict | None`
that is imported only when chosen. The config is locked: overriding a field that does not
exist is an error, not a new field.
"""
import importlib

from absl import app, flags

from vqlc import cli

TASKS = {
    "codebook": "vqlc.codebook.task:run",  # features + k-means -> codebook.npy
    "tokenizer": "vqlc.train.trainer:run",  # train, then evaluate
    "evaluate": "vqlc.eval.run:run",  # a trained workdir
    "encode": "vqlc.encode_task:run",  # a dataset -> shards of tokens / latents
    "sample": "vqlc.gen.sample:run",  # a generator's samples -> samples.npz (ADM layout)
}

_CONFIG = cli.define_config(flags.FLAGS)
_WORKDIR = cli.define_workdir(flags.FLAGS)
_DISTRIBUTED = cli.define_distributed(flags.FLAGS)


def task_function(name: str):
    """The `run` function of task `name` (imported now)."""
    if name not in TASKS:
        raise app.UsageError(f"config.task={name!r}; valid tasks: {', '.join(TASKS)}.")
    module, function = TASKS[name].split(":")
    return getattr(importlib.import_module(module), function)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.setup_logging()
    from vqlc import distributed
    distributed.initialize(_DISTRIBUTED.value)  # before any JAX computation, for every task
    import jax
    config = _CONFIG.value
    run = task_function(config.task)
    results = run(config, _WORKDIR.value)
    if results is not None and jax.process_index() == 0:
        print("\n".join(f"  {k}: {v}" for k, v in results.items() if k != "protocol"))


if __name__ == "__main__":
    app.run(main)
