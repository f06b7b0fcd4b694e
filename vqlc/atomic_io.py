"""The one writer of run files: never a half-written file, on a local disk or in a bucket.

Local paths: a temporary name in the same directory, then os.replace, so a reader (or a run
resumed after a kill) sees either the old file or the whole new one. Remote paths (gs://...,
through etils.epath): object stores publish an object only when its upload completes, so a
direct write is already all-or-nothing. Parent directories are created.
"""
import io
import json
import os

import numpy as np
from etils import epath


def is_remote(path) -> bool:
    return "://" in str(path)


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


def atomic_save_npz(path, **arrays) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
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
