"""The one writer of run files: never a half-written file, on a local disk or in a bucket.

Local paths: a temporary name in the same directory, then os.replace, so a reader (or a run
resumed after a kill) sees either the old file or the whole new one. Remote paths (gs://...,
through etils.epath): object stores publish an object only when its upload completes, so a
direct write is already all-or-nothing. Parent directories are created.
"""
import io
import json
import os
import shutil

import numpy as np
from etils import epath

from vqlc.storage import is_remote


def write_bytes(path, data: bytes) -> None:
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(path):
        path.write_bytes(data)
        return
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"  # hidden: no reader's glob matches
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def atomic_save_npy(path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    write_bytes(path, buffer.getvalue())


def atomic_write_json(path, obj, *, sort_keys: bool = False) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys))


def atomic_copy(src, dst) -> None:
    write_bytes(dst, epath.Path(src).read_bytes())


def save_png(path, image: np.ndarray) -> None:
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    write_bytes(path, buffer.getvalue())


def save_figure(path, figure, **kwargs) -> None:
    """A matplotlib figure, in the format of `path`'s suffix."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format=os.path.splitext(str(path))[1][1:] or "png", **kwargs)
    write_bytes(path, buffer.getvalue())
class Chunks:
    """An array given as consecutive pieces along its first axis, for `atomic_save_npz` to
    stream (so the whole array, e.g. 50,000 images, is never in memory at once)."""

    def __init__(self, shape: tuple, dtype, chunks):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.chunks = chunks


def atomic_save_npz(path, arrays: dict) -> None:
    """An uncompressed .npz (what np.savez writes; np.load reads it, and can memory-map) of
    `arrays`, name -> np.ndarray or `Chunks`, streamed to a temporary file, then renamed into
    place (local) or uploaded (remote)."""
    import tempfile
    import zipfile
    from numpy.lib import format as npy_format
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = (os.path.join(tempfile.gettempdir(), f".{path.name}.tmp-{os.getpid()}")
           if is_remote(path) else str(path.parent / f".{path.name}.tmp-{os.getpid()}"))
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
        if is_remote(path):  # streamed up from the local temporary (not whole in memory)
            with open(tmp, "rb") as src, path.open("wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 24)
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
