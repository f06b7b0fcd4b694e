"""Entry point: python -m vqlc.main --config=configs/<name>.py --workdir=<dir> [--config.x.y=v]

Multi-process runs (several hosts, or N processes on one machine): see launch/ and
vqlc/distributed.py; every process runs this same command.
`config.task` picks the stage: codebook (features + k-means -> codebook.npy), tokenizer (train,
then evaluate) or evaluate (a trained workdir).
The config is locked: overriding a field that does not exist is an error, not a new field.
"""
import logging

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, outputs.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", None,
    "Join JAX's multi-process runtime (jax.distributed.initialize). Unset: VQLC_DISTRIBUTED=1/0 "
    "decides, else on when VQLC_COORDINATOR_ADDRESS is set or a multi-process SLURM step or "
    "TPU VM slice is detected (see vqlc/distributed.py and launch/).")
flags.mark_flags_as_required(["config", "workdir"])

TASKS = ("codebook", "tokenizer", "evaluate")


class _QuietLibraries(logging.Filter):
    """Keeps orbax's and grain's per-save INFO chatter out of the console; warnings pass."""

    def filter(self, record):
        return record.levelno >= logging.WARNING or not any(
            f"/{lib}/" in record.pathname for lib in ("orbax", "grain", "jax"))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_QuietLibraries())
    from vqlc import distributed
    distributed.initialize(_DISTRIBUTED.value)  # before any JAX computation, for every task
    import jax
    config = _CONFIG.value
    if config.task not in TASKS:
        raise app.UsageError(f"config.task={config.task!r}; valid tasks: {', '.join(TASKS)}.")
    if config.task == "codebook":
        from vqlc.codebook.task import build_codebook
        results = build_codebook(config, _WORKDIR.value)
    elif config.task == "tokenizer":
        from vqlc.train.trainer import train_and_evaluate
        _, results = train_and_evaluate(config, _WORKDIR.value)
    else:
        from vqlc.eval.run import evaluate_workdir
        results = evaluate_workdir(config, _WORKDIR.value)
    if results is not None and jax.process_index() == 0:
        print("\n".join(f"  {k}: {v}" for k, v in results.items() if k != "protocol"))


if __name__ == "__main__":
    app.run(main)
