"""Datasets of tokens and latents written by the `encode` task, and their reader.

Layout of an encode workdir::

    manifest.json          which tokenizer (workdir, step, config hash), what was stored, the
                           augmentation, the image count, array shapes/dtypes, the dataset
    shards/shard_00012.npz images [12 * images_per_shard, 13 * images_per_shard) of the source,
                           every augmented copy of each image next to each other:
        codes    int32 [n, h, w]          (what = codes | both)
        latents  float32 [n, h, w, dim]   pre-quantisation (what = latents | both)
        labels   int32 [n]                the source's label
        indices  int64 [n]                the image's index in the source
        aug      int32 [n]                0 = the image; flip: 1 = mirrored; ten_crop: 0..9

A shard appears only when complete (written under a hidden temporary name and renamed).
``EncodedDataset`` is a grain ``RandomAccessDataSource`` over all shards: shards are uncompressed
.npz files whose arrays it memory-maps, so opening costs nothing and a random row reads only that
row. A workdir in a bucket (gs://) cannot be memory-mapped: its shards are read into memory, the
whole dataset once opened; copy it to a local disk when it is larger than host memory.
"""
from __future__ import annotations

import re
import struct
import zipfile

import numpy as np

from vqlc import rundir, storage

MANIFEST_FILE = "manifest.json"
SHARDS_DIR = "shards"
FORMAT = 1
ARRAYS = ("codes", "latents", "labels", "indices", "aug")
_SHARD_RE = re.compile(r"^shard_(\d{5,})\.npz$")
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # a zip member's local file header (30 bytes)


def shard_file(shard: int) -> str:
    return f"shard_{shard:05d}.npz"


def completed_shards(directory: str) -> dict[int, str]:
    """Shard index -> path of every complete shard in ``directory`` (temporaries ignored)."""
    done = {}
    for name in storage.listdir(directory):
        match = _SHARD_RE.match(name)
        if match:
            done[int(match.group(1))] = rundir.join(directory, name)
    return done


def read_manifest(workdir: str) -> dict:
    path = rundir.join(workdir, MANIFEST_FILE)
    if not storage.exists(path):
        raise FileNotFoundError(
            f"{path} not found: {workdir!r} is not a dataset written by the encode task "
            "(python -m vqlc.main --config=configs/encode_<...>.py --workdir=<dir> "
            "--config.tokenizer.workdir=<tokenizer run>).")
    return storage.read_json(path)


def _identity(tokenizer) -> dict:
    return tokenizer.identity() if hasattr(tokenizer, "identity") else dict(tokenizer)


def describe_tokenizer(identity: dict) -> str:
    return (f"(workdir {identity.get('workdir')!r}, step {identity.get('step')}, "
            f"config hash {identity.get('config_hash')})")


def check_tokenizer(recorded: dict, expected, where: str) -> None:
    """Refuses data made by another tokenizer than ``expected`` (a Tokenizer or its identity()).

    Compares the config hash, the workdir (absolute) and, when ``expected`` names one, the
    checkpoint step: other weights give other tokens even under the same config."""
    expected = _identity(expected)
    keys = ["config_hash", "workdir"] + (["step"] if expected.get("step") is not None else [])
    norm = lambda k, v: rundir.absolute(v) if k == "workdir" and v else v  # noqa: E731
    if any(norm(k, recorded.get(k)) != norm(k, expected.get(k)) for k in keys):
        raise ValueError(
            f"{where} was encoded by tokenizer {describe_tokenizer(recorded)}, not by the "
            f"expected tokenizer {describe_tokenizer(expected)}. Re-encode the dataset with "
            "this tokenizer (a new encode workdir), or point the generator at the tokenizer that "
            "made it.")


def _npz_memmaps(path: str) -> dict[str, np.ndarray]:
    """Read-only memory maps of the arrays of an uncompressed .npz (np.savez), no copy."""
    if storage.is_remote(path):
        with np.load(storage.local_file(path)) as archive:
            return {name: archive[name] for name in archive.files}
    out = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
        for info in archive.infolist():
            name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            if info.compress_type != zipfile.ZIP_STORED:  # np.savez_compressed: load it
                out[name] = np.load(path)[name]
                continue
            f.seek(info.header_offset)
            fields = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
            f.seek(info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1])
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                out[name] = np.load(path)[name]
                continue
            offset = f.tell()
            if int(np.prod(shape)) == 0:
                out[name] = np.zeros(shape, dtype)
            else:
                out[name] = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape,
                                      order="F" if fortran else "C")
    return out


class EncodedDataset:
    """Rows of an encode workdir, in order (shard by shard): ``len`` and ``[i] -> dict``.

    Each row: ``codes`` int32 [h, w] and/or ``latents`` float32 [h, w, dim] (as stored),
    ``label`` int32, ``index`` int64 (the image's index in the source), ``aug`` int32.
    Usable as a grain source: ``grain.MapDataset.source(EncodedDataset(dir, tok.identity()))``.

    Args:
      workdir: the encode task's workdir.
      expect_tokenizer: a Tokenizer or its ``identity()``; data made by another tokenizer is
        refused (ValueError naming both). None accepts any.
    Raises ValueError for a dataset with missing shards (an encode run still going or killed:
    re-run it to finish).
    """

    def __init__(self, workdir: str, expect_tokenizer=None):
        self.workdir = workdir
        self.manifest = read_manifest(workdir)
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{workdir}: manifest format {self.manifest.get('format')!r}, this "
                             f"reader reads format {FORMAT}.")
        if expect_tokenizer is not None:
            check_tokenizer(self.manifest["tokenizer"], expect_tokenizer, workdir)
        directory = rundir.join(workdir, SHARDS_DIR)
        done = completed_shards(directory)
        count = self.manifest["num_shards"]
        missing = [s for s in range(count) if s not in done]
        if missing:
            raise ValueError(
                f"{workdir} is incomplete: {len(missing)} of {count} shards missing (first: "
                f"{missing[:5]}). Re-run the encode command with this workdir to finish it.")
        self._paths = [done[s] for s in range(count)]
        self._keys = [k for k in ("codes", "latents") if k in self.manifest["arrays"]]
        rows = [self._arrays(i)["indices"].shape[0] for i in range(count)]
        self._offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        self._maps = {}

    @property
    def tokenizer(self) -> dict:
        """Identity of the tokenizer that made the data: workdir, step, config_hash."""
        return self.manifest["tokenizer"]

    def _arrays(self, shard: int) -> dict:
        maps = getattr(self, "_maps", {})
        if shard not in maps:
            maps[shard] = _npz_memmaps(self._paths[shard])
            self._maps = maps
        return maps[shard]

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} rows")
        shard = int(np.searchsorted(self._offsets, index, side="right") - 1)
        arrays = self._arrays(shard)
        row = index - int(self._offsets[shard])
        out = {k: np.array(arrays[k][row]) for k in self._keys}
        out.update(label=np.int32(arrays["labels"][row]), index=np.int64(arrays["indices"][row]),
                   aug=np.int32(arrays["aug"][row]))
        return out

    def column(self, name: str) -> np.ndarray:
        """One stored array over all rows, in order ('labels', 'indices', 'aug', 'codes', ...)."""
        return np.concatenate([np.asarray(self._arrays(i)[name])
                               for i in range(len(self._paths))])

    def __getstate__(self) -> dict:  # grain workers: reopen the memory maps there
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state

    def __repr__(self) -> str:
        return (f"EncodedDataset({self.workdir!r}, rows={len(self)}, "
                f"arrays={self._keys}, augment={self.manifest['augment']!r})")
