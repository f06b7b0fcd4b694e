"""A gs:// bucket for tests: etils.epath serves `gs://<bucket>/...` from a local folder.

Code that reaches a gs:// path with plain os/open/np.load (instead of etils.epath, as a real
bucket needs) finds nothing there and fails, which is what the tests look for. Renames are
refused: an object store has no atomic rename, so nothing may rely on one in a bucket.
"""
import os

import pytest
from etils.epath import backend, gpath


class LocalBucket(backend._OsPathBackend):

    def __init__(self, root: str):
        self.root = root
        self.opened = []  # every gs:// path opened, in order

    def local(self, path) -> str:
        path = os.fspath(path)
        assert path.startswith("gs://"), path
        return os.path.join(self.root, path[len("gs://"):])

    def open(self, path, mode):
        self.opened.append((os.fspath(path), mode))
        return super().open(self.local(path), mode)

    def exists(self, path):
        return super().exists(self.local(path))

    def isdir(self, path):
        return super().isdir(self.local(path))

    def listdir(self, path):
        return super().listdir(self.local(path))

    def glob(self, path):
        return ["gs://" + os.path.relpath(p, self.root) for p in super().glob(self.local(path))]

    def walk(self, top, *, top_down=True, on_error=None):
        for dirpath, dirs, files in super().walk(self.local(top), top_down=top_down,
                                                 on_error=on_error):
            yield "gs://" + os.path.relpath(os.fspath(dirpath), self.root), dirs, files

    def makedirs(self, path, *, exist_ok=False, mode=None):
        super().makedirs(self.local(path), exist_ok=exist_ok, mode=mode)

    def mkdir(self, path, *, exist_ok=False, mode=None):
        super().mkdir(self.local(path), exist_ok=exist_ok, mode=mode)

    def rmtree(self, path):
        super().rmtree(self.local(path))

    def remove(self, path):
        super().remove(self.local(path))

    def rename(self, path, dst):
        raise AssertionError(f"rename in a bucket: {path} -> {dst}")

    replace = rename

    def copy(self, path, dst, overwrite):
        super().copy(self.local(path), self.local(dst), overwrite)

    def stat(self, path):
        return super().stat(self.local(path))


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """The LocalBucket behind gs://; gs://b/x is tmp_path/bucket/b/x."""
    fake = LocalBucket(str(tmp_path / "bucket"))
    os.makedirs(fake.root)
    monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", fake)
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
    return fake
