"""<workdir>/config.json: written when a run starts, checked when it resumes, read by Tokenizer."""
import json

import jax
import ml_collections
from etils import epath

from vqlc import atomic_io, rundir

CONFIG_FILE = rundir.CONFIG
# Fields that change the shapes or meaning of what a checkpoint holds, per config.task (the
# tokenizer's for configs without a task of their own).
_IDENTITY = ("model", "quantizer", "codebook.feature_dim", "disc", "data.image_size")
_IDENTITY_BY_TASK = {"gpt": ("network", "optim.ema_decay"),
                     "diffusion": ("network", "objective", "optim.ema_decay"),
                     "classifier": ("network",)}
# Fields inside those that change how a step computes, not what a checkpoint holds: a run may
# resume with other values (e.g. switch to bfloat16 compute, or to remat to fit memory).
_NOT_IDENTITY = {"model": ("dtype", "remat")}


def _identity_fields(config) -> tuple:
    return _IDENTITY_BY_TASK.get(config.get("task"), _IDENTITY)


def _get(config, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


def _normalise(value):
    return json.loads(json.dumps(value.to_dict() if hasattr(value, "to_dict") else value,
                                 default=list))


def _identity(config, dotted: str):
    value = _normalise(_get(config, dotted))
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if k not in _NOT_IDENTITY.get(dotted, ())}
    return value


def identity(config: ml_collections.ConfigDict) -> dict:
    """The fields that define what a run's checkpoints compute, as plain JSON values."""
    return {k: _identity(config, k) for k in _identity_fields(config)}


def load(workdir: str) -> ml_collections.ConfigDict:
    path = epath.Path(rundir.config(workdir))
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} not found: is {workdir!r} a vqlc training "
                                "workdir?")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def check_compatible(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuses a config whose model differs from the run already in `workdir`."""
    path = rundir.config(workdir)
    if not epath.Path(path).exists():
        return
    old, new = identity(load(workdir)), identity(config)
    diffs = [k for k in new if old.get(k) != new[k]]
    if diffs:
        raise ValueError(
            f"{workdir!r} holds a run with a different config ({', '.join(diffs)} differ "
            f"from {path}). Use a new --workdir, or the original settings to resume.")


def write_or_check(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes config.json for a new run; for an existing one, refuses a different model."""
    check_compatible(config, workdir)
    if jax.process_index() == 0:
        atomic_io.write_text(rundir.config(workdir), config.to_json_best_effort(indent=2))
