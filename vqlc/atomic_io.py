"""Writes that never leave a half-written file behind: a temporary name, then os.replace.

A reader (or a resumed run after a kill) sees either the old file or the whole new one.
"""
import json
import os

import numpy as np


def atomic_save_npy(path: str, array: np.ndarray) -> None:
    tmp = f"{path}.tmp-{os.getpid()}.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def atomic_write_json(path: str, obj, *, sort_keys: bool = False) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=sort_keys)
    os.replace(tmp, path)


def atomic_save_npz(path: str, **arrays: np.ndarray) -> None:
    """An uncompressed .npz of `arrays`, written under a hidden temporary name in the same
    folder (``.<name>.tmp-<pid>``, which no reader matches) and renamed into place."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:  # a file object: numpy appends no second .npz suffix
        np.savez(f, **arrays)
    os.replace(tmp, path)
