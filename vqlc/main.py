"""Entry point: python -m vqlc.main --config=<name>[:variant] --workdir=<dir> [--config.x.y=v]
(or the `vqlc` console script; --config also takes a config file path)

Multi-process runs (several hosts, or N processes on one machine): see launch/ and
vqlc/distributed.py; every process runs this same command.
`config.task` picks the stage, one of TASKS: each names a `run(config, workdir) -> dict | None`
that is imported only when chosen. The config is locked: overriding a field that does not
exist is an error, not a new field.
"""
import importlib
import sys

from vqlc import cli, extras

TASKS = {
    "codebook": "vqlc.codebook.task:run",  # features + k-means -> codebook.npy
    "tokenizer": "vqlc.train.trainer:run",  # train, then evaluate
    "evaluate": "vqlc.eval.run:run",  # a trained workdir
    "encode": "vqlc.encode_task:run",  # a dataset -> shards of tokens / latents
    "sample": "vqlc.gen.sample:run",  # a generator's samples -> samples.npz (ADM layout)
    "gpt": "vqlc.gen.gpt_train:run",  # a GPT over the token maps of an encode workdir
    "diffusion": "vqlc.gen.diffusion_train:run",  # DiT / SiT over latents
    "classifier": "vqlc.cls.train:run",  # a ViT over token maps (MAE's fine-tuning recipe)
}

PROG = "vqlc.main"


def _flags():
    fv = cli.new_flags()
    return fv, cli.define_config(fv), cli.define_workdir(fv), cli.define_distributed(fv)


def task_function(name: str):
    """The `run` function of task `name` (imported now)."""
    if name not in TASKS:
        raise ValueError(f"config.task={name!r}; valid tasks: {', '.join(TASKS)}.")
    module, function = TASKS[name].split(":")
    return getattr(importlib.import_module(module), function)


def main(argv=None) -> int:
    """`python -m vqlc.main` and the `vqlc` console script: parses `argv` (default
    sys.argv[1:]) and runs the config's task."""
    argv = sys.argv[1:] if argv is None else argv
    fv, config_flag, workdir_flag, distributed_flag = _flags()
    positional = cli.parse(fv, argv, PROG, __doc__)
    if positional:
        cli.usage_error(PROG, f"unexpected arguments: {positional}", fv)
    cli.setup_logging()
    from vqlc import distributed
    distributed.initialize(distributed_flag.value)  # before any JAX computation, every task
    import jax
    try:
        config = config_flag.value
        task = config.task  # a config that failed to load raises on first use
    except OSError as e:  # a config file that is missing or does not load
        cli.usage_error(PROG, " ".join(str(e).split()), fv)
    try:
        run = task_function(task)
    except cli.USER_ERRORS as e:
        cli.usage_error(PROG, str(e), fv)
    try:  # a task's own errors keep their traceback; a missing optional package is one line
        results = run(config, workdir_flag.value)
    except extras.MissingExtra as e:
        cli.usage_error(PROG, str(e))
    if results is not None and jax.process_index() == 0:
        print("\n".join(f"  {k}: {v}" for k, v in results.items() if k != "protocol"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
