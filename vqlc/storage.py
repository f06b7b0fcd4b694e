"""Reading and listing run files on a local disk or in a bucket (gs://..., through etils.epath).

Writes go through vqlc.atomic_io. Local arrays are memory-mapped where the caller asks; a remote
object cannot be, so it is read into memory (callers that stream large files read them shard by
shard).
"""
import io
import json

import numpy as np
from etils import epath


def is_remote(path) -> bool:
    return "://" in str(path)


def exists(path) -> bool:
    return epath.Path(path).exists()


def isdir(path) -> bool:
    return epath.Path(path).is_dir()


def listdir(path) -> list[str]:
    """Names in the folder `path`, sorted; [] when it does not exist."""
    path = epath.Path(path)
    if not path.is_dir():
        return []
    return sorted(p.name for p in path.iterdir())


def makedirs(path) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def remove(path) -> None:
    """Deletes a file or a whole folder; nothing when it is already gone."""
    path = epath.Path(path)
    if path.is_dir():
        path.rmtree(missing_ok=True)
    elif path.exists():
        path.unlink(missing_ok=True)


def read_text(path) -> str:
    return epath.Path(path).read_text()


def read_json(path):
    return json.loads(read_text(path))


def load_npy(path, *, mmap: bool = False):
    """np.load of a .npy (or .npz) file; memory-mapped when `mmap` and the file is local."""
    mmap_mode = "r" if mmap and not is_remote(path) else None
    return np.load(local_file(path), mmap_mode=mmap_mode, allow_pickle=False)


def local_file(path) -> str | io.BytesIO:
    """What np.load and zipfile open: the path itself when local, else the object's bytes."""
    return str(path) if not is_remote(path) else io.BytesIO(epath.Path(path).read_bytes())
