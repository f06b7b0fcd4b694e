"""<workdir>/config.json: written when a run starts, checked when it resumes, read by Tokenizer."""
import json
import os

import jax
import ml_collections

CONFIG_FILE = "config.json"
# Fields that change the shapes or meaning of what a checkpoint holds.
_IDENTITY = ("model", "quantizer", "codebook.feature_dim", "disc", "data.image_size")
# Fields inside those that change how a step computes, not what a checkpoint holds: a run may
# resume with other values (e.g. switch to bfloat16 compute, or to remat to fit memory).
_NOT_IDENTITY = {"model": ("dtype", "remat")}


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


def load(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path!r} not found: is {workdir!r} a vqlc training workdir?")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def check_compatible(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuses a config whose model differs from the run already in `workdir`."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return
    old = load(workdir)
    diffs = [k for k in _IDENTITY if _identity(old, k) != _identity(config, k)]
    if diffs:
        raise ValueError(
            f"{workdir!r} holds a run with a different config ({', '.join(diffs)} differ "
            f"from {path}). Use a new --workdir, or the original settings to resume.")


def write_or_check(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes config.json for a new run; for an existing one, refuses a different model."""
    check_compatible(config, workdir)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, CONFIG_FILE)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(config.to_json_best_effort(indent=2))
        os.replace(tmp, path)
