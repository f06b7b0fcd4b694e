"""Fixed-range disk shards, shared by the datasets the project writes (codebook features,
encoded tokens and latents).

Shard ``s`` holds items ``[s * per_shard, (s + 1) * per_shard)`` of the source in order, so its
content is a function of its index alone: a re-run skips every shard already on disk and redoes
the rest, and after a kill nothing is lost or duplicated. A ``spec`` (JSON) written next to the
shards records what produced them; a re-run with other settings is refused rather than mixed in.
"""
from __future__ import annotations

import json

import jax
import numpy as np
from etils import epath

from vqlc import atomic_io, rundir, storage


def shard_range(shard: int, num_items: int, per_shard: int) -> range:
    """Items of shard ``shard`` when ``num_items`` are cut into shards of ``per_shard``."""
    return range(shard * per_shard, min((shard + 1) * per_shard, num_items))


def num_shards(num_items: int, per_shard: int) -> int:
    return -(-num_items // per_shard)


def remove_unfinished(directory: str) -> None:
    """Deletes (on process 0, the one that writes) the temporary files of shard writes a kill
    cut short (atomic_io's hidden `.<name>.tmp-<pid>`, or any other `*.tmp-*`)."""
    if jax.process_index() != 0:
        return
    for name in storage.listdir(directory):
        if ".tmp-" in name:
            storage.remove(rundir.join(directory, name))


def agreed_done(done: np.ndarray) -> np.ndarray:
    """Process 0's view of which shards are complete, on every process: a process listing the
    folder after process 0 wrote a shard would otherwise skip it alone, and the collectives of
    the remaining shards would no longer match."""
    if jax.process_count() == 1:
        return done
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.broadcast_one_to_all(done))


def spec_differences(old: dict, new: dict) -> str:
    """'key: on disk X, now Y; ...' over the top-level keys that differ ('' if none)."""
    old, new = json.loads(json.dumps(old)), json.loads(json.dumps(new))  # tuples -> lists
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "; ".join(f"{k}: on disk {old.get(k)!r}, now {new.get(k)!r}" for k in keys)


def check_or_write_spec(path: str, spec: dict, *, what: str, remedy: str,
                        write: bool = True) -> None:
    """Writes ``spec`` to ``path`` (atomically) if absent, else refuses a different one.

    ``what`` names what the folder holds, ``remedy`` says what to do; both go into the error.
    ``write=False`` only checks (e.g. processes other than the one that writes).
    """
    if storage.exists(path):
        old = storage.read_json(path)
        diffs = spec_differences(old, spec)
        if diffs:
            raise ValueError(f"{epath.Path(path).parent} holds {what} written with other "
                             f"settings ({diffs}). {remedy}")
        return
    if write:
        atomic_io.atomic_write_json(path, spec, sort_keys=True)
