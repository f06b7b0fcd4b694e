"""Writes that never leave a half-written file behind: a temporary name, then os.replace.

A reader (or a resumed run after a kill) sees either the old file or the whole new one.
"""
import json
import os
import shutil

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


def atomic_copy(src: str, dst: str) -> None:
    tmp = f"{dst}.tmp-{os.getpid()}"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
