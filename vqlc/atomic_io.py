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


class Chunks:
    """An array given as consecutive pieces along its first axis, for `atomic_save_npz` to
    stream (so the whole array, e.g. 50,000 images, is never in memory at once)."""

    def __init__(self, shape: tuple, dtype, chunks):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.chunks = chunks


def atomic_save_npz(path: str, arrays: dict) -> None:
    """An uncompressed .npz (what np.savez writes; np.load reads it) of `arrays`, name ->
    np.ndarray or `Chunks`, written under a temporary name and renamed into place."""
    import zipfile
    from numpy.lib import format as npy_format
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, value in arrays.items():
                with archive.open(f"{name}.npy", "w", force_zip64=True) as f:
                    if not isinstance(value, Chunks):
                        npy_format.write_array(f, np.asarray(value), allow_pickle=False)
                        continue
                    header = {"descr": npy_format.dtype_to_descr(value.dtype),
                              "fortran_order": False, "shape": value.shape}
                    npy_format.write_array_header_1_0(f, header)
                    rows = 0
                    for chunk in value.chunks:
                        chunk = np.ascontiguousarray(chunk, value.dtype)
                        if chunk.shape[1:] != value.shape[1:]:
                            raise ValueError(f"{name}: chunk of shape {chunk.shape} in an array "
                                             f"of shape {value.shape}.")
                        f.write(chunk.tobytes())
                        rows += len(chunk)
                    if rows != value.shape[0]:
                        raise ValueError(f"{name}: {rows} rows written, {value.shape[0]} declared.")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
