"""Read PyTorch checkpoint files into numpy arrays, without torch.

Two on-disk formats share one layout, a zip archive ``<prefix>/...`` holding a
pickle plus one raw little-endian file per tensor storage:

* ``torch.save`` (torch >= 1.6 zip serialization): ``<prefix>/data.pkl`` pickles
  the saved object (usually a state dict, or a training checkpoint that nests one
  under ``'state_dict'`` or ``'model'``); storages live in ``<prefix>/data/<key>``.
* TorchScript (``torch.jit.save``; OpenAI's CLIP ``ViT-L-14.pt`` is one):
  ``<prefix>/data.pkl`` pickles ``__torch__.*`` module objects whose attributes
  hold parameters, buffers and submodules; ``constants.pkl`` holds the tensors
  captured in the graph (storages in ``<prefix>/constants/<key>``).

The pickles are read with a restricted unpickler. Tensors are rebuilt from the
known torch rebuild helpers (as numpy views with the saved size, stride and
offset, then copied); every other global becomes an inert placeholder that only
records its name and arguments. Nothing from the file is ever executed.

Typical use::

    sd = load_torch_file("vqgan.ckpt")          # {"encoder.conv_in.weight": ndarray, ...}
    obj = load_torch_object("ViT-L-14.pt")      # raw tree: dicts, lists, modules, ndarrays
"""
from __future__ import annotations

import io
import os
import pickle
import zipfile
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np

__all__ = ["TorchFileError", "TorchModule", "Opaque", "LazyTensor", "load_torch_file",
           "load_torch_object", "flatten_arrays"]


class TorchFileError(ValueError):
    """A file that is not a readable PyTorch zip checkpoint."""


# torch storage class name -> numpy dtype of its raw bytes. bfloat16 is read as
# its uint16 bit pattern and widened to float32 after the view is built.
_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
    "ComplexFloatStorage": np.dtype("<c8"),
    "ComplexDoubleStorage": np.dtype("<c16"),
    "UntypedStorage": np.dtype("u1"),
}

# torch dtype name (as pickled by _rebuild_tensor_v3) -> storage class name.
_TORCH_DTYPES = {
    "float64": "DoubleStorage", "double": "DoubleStorage",
    "float32": "FloatStorage", "float": "FloatStorage",
    "float16": "HalfStorage", "half": "HalfStorage",
    "bfloat16": "BFloat16Storage",
    "int64": "LongStorage", "long": "LongStorage",
    "int32": "IntStorage", "int": "IntStorage",
    "int16": "ShortStorage", "short": "ShortStorage",
    "int8": "CharStorage", "uint8": "ByteStorage", "bool": "BoolStorage",
    "complex64": "ComplexFloatStorage", "complex128": "ComplexDoubleStorage",
}


class _StorageType:
    """Stands in for ``torch.FloatStorage`` etc. inside a persistent id."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]

    def __repr__(self):
        return f"torch.{self.name}"


class _TorchDtype:
    """Stands in for a pickled ``torch.float32`` etc. (used by _rebuild_tensor_v3)."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self):
        return f"torch.{self.name}"


class _Storage:
    """A flat storage: the raw buffer viewed as its element dtype."""

    def __init__(self, array: np.ndarray, storage_name: str):
        self.array = array
        self.storage_name = storage_name


class _LazyStorage:
    """A storage not read yet: where its bytes are in the archive (``lazy=True``)."""

    def __init__(self, path: str, member: str, storage_name: str, big_endian: bool):
        self.path = path
        self.member = member
        self.storage_name = storage_name
        self.big_endian = big_endian

    def with_name(self, storage_name: str) -> "_LazyStorage":
        return _LazyStorage(self.path, self.member, storage_name, self.big_endian)

    def read(self) -> _Storage:
        with _open_archive(self.path) as archive:
            try:
                raw = archive.read(self.member)
            except KeyError as e:
                raise TorchFileError(
                    f"{self.path}: storage {self.member!r} named in the pickle is missing from "
                    "the archive: the file is truncated or corrupt") from e
        return _Storage(_storage_array(raw, _STORAGE_DTYPES[self.storage_name],
                                       self.big_endian), self.storage_name)


class LazyTensor:
    """A tensor of a ``load_torch_object(..., lazy=True)`` tree: its shape and dtype are
    known, its values are read from the file by :meth:`load` (each call reads again)."""

    def __init__(self, storage: _LazyStorage, storage_offset, size, stride):
        self._storage = storage
        self._view = (int(storage_offset), tuple(int(s) for s in size),
                      tuple(int(s) for s in stride))

    @property
    def shape(self) -> Tuple[int, ...]:
        return self._view[1]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self) -> np.dtype:
        if self._storage.storage_name == "BFloat16Storage":
            return np.dtype(np.float32)  # widened, as the eager reader does
        return _STORAGE_DTYPES[self._storage.storage_name]

    def load(self) -> np.ndarray:
        offset, size, stride = self._view
        return _rebuild_tensor(self._storage.read(), offset, size, stride)

    def __repr__(self):
        return f"LazyTensor(shape={self.shape}, dtype={self.dtype})"


class Opaque:
    """Inert placeholder for a pickled global the reader does not know.

    The unpickler makes one subclass per qualified name; instances record the
    constructor/call arguments (``args``) and any pickled state (``state``) so the
    surrounding data (e.g. a Lightning checkpoint's hyper-parameters) still loads.
    Creating or calling one never runs code from the file.
    """

    _qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    @property
    def qualname(self) -> str:
        return type(self)._qualname

    def __repr__(self):
        return f"Opaque({self.qualname})"


class TorchModule:
    """A TorchScript ``__torch__.*`` object: its pickled attributes, in ``state``."""

    _qualname = "__torch__"

    def __init__(self, *args):
        self.state: Dict[str, Any] = {}

    def __setstate__(self, state):
        # TorchScript pickles an object's attributes as a dict passed to BUILD.
        self.state = state if isinstance(state, dict) else {"__state__": state}

    @property
    def qualname(self) -> str:
        return type(self)._qualname

    def __repr__(self):
        return f"TorchModule({self.qualname})"


def _rebuild_tensor(storage, storage_offset, size, stride, *_unused) -> np.ndarray:
    """numpy equivalent of ``torch._utils._rebuild_tensor_v2``: an owned strided copy (a
    :class:`LazyTensor` for a storage not read yet)."""
    if isinstance(storage, _LazyStorage):
        return LazyTensor(storage, storage_offset, size, stride)
    if not isinstance(storage, _Storage):
        raise TorchFileError(f"tensor rebuilt from {type(storage).__name__}, expected a storage")
    base = storage.array
    size = tuple(int(s) for s in size)
    stride = tuple(int(s) for s in stride)
    storage_offset = int(storage_offset)
    if len(size) != len(stride):
        raise TorchFileError(f"tensor size {size} and stride {stride} differ in rank")
    numel = int(np.prod(size, dtype=np.int64))
    if numel == 0:
        out = np.zeros(size, base.dtype)
    else:
        last = storage_offset + sum((s - 1) * st for s, st in zip(size, stride))
        if storage_offset < 0 or min(stride, default=0) < 0 or last >= base.size:
            raise TorchFileError(
                f"tensor view (offset {storage_offset}, size {size}, stride {stride}) reaches "
                f"outside its storage of {base.size} elements: the file is corrupt")
        item = base.dtype.itemsize
        out = np.lib.stride_tricks.as_strided(
            base[storage_offset:], shape=size, strides=tuple(st * item for st in stride),
            writeable=False).copy()
    if storage.storage_name == "BFloat16Storage":
        # bfloat16 is the top half of a float32.
        out = (out.astype(np.uint32) << 16).view(np.float32)
    return out


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None) -> np.ndarray:
    """``_rebuild_tensor_v3`` carries the dtype separately (for untyped storages)."""
    if isinstance(storage, (_Storage, _LazyStorage)) and isinstance(dtype, _TorchDtype):
        name = _TORCH_DTYPES.get(dtype.name)
        if name is None:
            raise TorchFileError(f"unsupported tensor dtype torch.{dtype.name}")
        if isinstance(storage, _LazyStorage):
            return _rebuild_tensor(storage.with_name(name), storage_offset, size, stride)
        raw = storage.array.view(np.uint8)
        width = _STORAGE_DTYPES[name].itemsize
        raw = raw[:raw.size - raw.size % width]
        storage = _Storage(raw.view(_STORAGE_DTYPES[name]), name)
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *state):
    """A Parameter is its data."""
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    """Tensor subclasses (incl. Parameter on some versions): rebuild the plain tensor."""
    return func(*args)


class _OrderedDict(dict):
    """``collections.OrderedDict`` stand-in: a dict that also accepts pickled attributes
    (a state_dict carries ``_metadata``, restored by BUILD)."""


def _identity(value, *unused):
    return value


def _reconstruct_numpy(subtype, shape, dtype):
    """``numpy.core.multiarray._reconstruct``: an empty array that BUILD then fills."""
    if isinstance(dtype, bytes):
        dtype = dtype.decode("latin-1")
    return np.ndarray(shape, dtype=np.dtype(dtype))


# (module, name) -> callable the unpickler may use. Everything here is data-only.
_SAFE_GLOBALS = {
    ("torch._utils", "_rebuild_tensor"): lambda storage, offset, size, stride: _rebuild_tensor(
        storage, offset, size, stride),
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch._tensor", "_rebuild_from_type"): lambda func, new_type, args, d: func(*args),
    ("collections", "OrderedDict"): _OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("torch.jit._pickle", "restore_type_tag"): _identity,
    ("torch.jit._pickle", "build_intlist"): _identity,
    ("torch.jit._pickle", "build_doublelist"): _identity,
    ("torch.jit._pickle", "build_boollist"): _identity,
    ("torch.jit._pickle", "build_tensorlist"): _identity,
    ("numpy", "dtype"): np.dtype,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct_numpy,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct_numpy,
    ("numpy.core.multiarray", "scalar"): lambda dtype, data=b"": np.frombuffer(
        data, dtype=dtype)[0] if data else dtype.type(),
    ("numpy._core.multiarray", "scalar"): lambda dtype, data=b"": np.frombuffer(
        data, dtype=dtype)[0] if data else dtype.type(),
}


class _Unpickler(pickle.Unpickler):
    """Restricted unpickler: storages come from the zip, unknown globals are inert."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, storage_dir: str,
                 big_endian: bool = False, lazy_path: Optional[str] = None):
        super().__init__(io.BytesIO(data))
        self._archive = archive
        self._storage_dir = storage_dir
        self._big_endian = big_endian
        self._lazy_path = lazy_path  # set: storages are read only when a LazyTensor loads
        self._storages: Dict[str, _Storage] = {}
        self._module_classes: Dict[str, type] = {}
        self._opaque_classes: Dict[str, type] = {}

    def find_class(self, module: str, name: str):
        key = (module, name)
        if key in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[key]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "torch.storage" and name in ("UntypedStorage", "_LegacyStorage"):
            return _StorageType("UntypedStorage")
        if module == "torch" and name in _TORCH_DTYPES:
            return _TorchDtype(name)
        if module.startswith("__torch__"):
            # One placeholder class per TorchScript class: NEWOBJ + BUILD fill its state.
            qualname = f"{module}.{name}"
            if qualname not in self._module_classes:
                self._module_classes[qualname] = type(
                    name, (TorchModule,), {"_qualname": qualname})
            return self._module_classes[qualname]
        qualname = f"{module}.{name}"
        if qualname not in self._opaque_classes:
            self._opaque_classes[qualname] = type(name, (Opaque,), {"_qualname": qualname})
        return self._opaque_classes[qualname]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 4 and pid[0] == "storage"):
            raise TorchFileError(f"unsupported persistent id {pid!r} in the checkpoint pickle")
        storage_type, key = pid[1], str(pid[2])  # pid[3] is the device: always read to CPU
        if isinstance(storage_type, _TorchDtype):  # some writers pickle a dtype here
            storage_type = _StorageType(_TORCH_DTYPES.get(storage_type.name, "UntypedStorage"))
        if not isinstance(storage_type, _StorageType):
            raise TorchFileError(f"unsupported storage type {storage_type!r} for storage {key}")
        if key not in self._storages:
            name = self._storage_dir + key
            if self._lazy_path is not None:
                if name not in self._archive.NameToInfo:
                    raise TorchFileError(
                        f"storage {name!r} named in the pickle is missing from the archive: "
                        "the file is truncated or corrupt")
                return _LazyStorage(self._lazy_path, name, storage_type.name, self._big_endian)
            try:
                raw = self._archive.read(name)
            except KeyError as e:
                raise TorchFileError(
                    f"storage {name!r} named in the pickle is missing from the archive: "
                    "the file is truncated or corrupt") from e
            array = _storage_array(raw, storage_type.dtype, self._big_endian)
            self._storages[key] = _Storage(array, storage_type.name)
        return self._storages[key]


def _storage_array(raw: bytes, dtype: np.dtype, big_endian: bool) -> np.ndarray:
    """A storage's raw bytes viewed as its (little-endian) element dtype."""
    raw = raw[:len(raw) - len(raw) % dtype.itemsize]
    if big_endian and dtype.itemsize > 1:  # saved on a big-endian machine
        return np.frombuffer(raw, dtype=dtype.newbyteorder(">")).astype(dtype)
    return np.frombuffer(raw, dtype=dtype)


def _open_archive(path: str) -> zipfile.ZipFile:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"PyTorch checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(8)
        if head[:1] == b"\x80":
            kind = "the legacy (pre-1.6, non-zip) torch.save format"
        elif head[:4] == b"PK\x03\x04":
            kind = "a corrupt or truncated zip archive"
        elif head[:3] == b"\x1f\x8b\x08" or head[:5] == b"ustar":
            kind = "a gzip/tar file (legacy torch.save tar format or a compressed archive)"
        else:
            kind = "not a PyTorch zip checkpoint"
        raise TorchFileError(
            f"{path}: {kind}. Only the zip serialization of torch >= 1.6 can be read without "
            "torch; re-save it with torch >= 1.6, e.g. "
            "`torch.save(torch.load(p, map_location='cpu'), p_new)`.")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise TorchFileError(f"{path}: corrupt zip archive ({e}); re-download or re-save it") from e


def _archive_prefix(archive: zipfile.ZipFile, path: str) -> str:
    """The top folder holding ``data.pkl`` (torch names it after the file stem)."""
    for name in archive.namelist():
        if name == "data.pkl":
            return ""
        if name.endswith("/data.pkl") and name.count("/") == 1:
            return name[: -len("data.pkl")]
    raise TorchFileError(
        f"{path}: zip archive without <prefix>/data.pkl, so not a torch.save/torch.jit.save "
        f"file (entries: {archive.namelist()[:8]})")


def _unpickle(archive: zipfile.ZipFile, path: str, member: str, storage_dir: str,
              lazy: bool = False) -> Any:
    prefix = member[: member.rfind("/") + 1]
    try:
        big = (prefix + "byteorder" in archive.namelist()
               and archive.read(prefix + "byteorder").strip() == b"big")
        data = archive.read(member)
        return _Unpickler(data, archive, storage_dir, big_endian=big,
                          lazy_path=os.fspath(path) if lazy else None).load()
    except TorchFileError as e:
        raise TorchFileError(f"{path}: {e}") from e
    except Exception as e:  # BadZipFile, zlib.error, UnpicklingError, EOFError, ...
        raise TorchFileError(f"{path}: could not read {member} ({type(e).__name__}: {e}); "
                             "the file is corrupt or not a PyTorch checkpoint") from e


def load_torch_object(path: str, constants: bool = False, lazy: bool = False) -> Any:
    """Unpickle a torch.save / torch.jit.save zip file into plain Python + numpy.

    Tensors become numpy arrays (bfloat16 widened to float32), dicts stay dicts,
    TorchScript objects become :class:`TorchModule` (attributes in ``.state``) and
    any other class (e.g. a training script's ``argparse.Namespace``) becomes an inert
    :class:`Opaque`.

    Args:
      path: the checkpoint file.
      constants: for a TorchScript archive, return ``(data, constants)`` where
        ``constants`` is the tuple pickled in ``constants.pkl`` (graph constants).
      lazy: tensors of ``data.pkl`` become :class:`LazyTensor` (shape and dtype now, values
        read by ``.load()``), so one entry of a large checkpoint (e.g. its ``'ema'``
        weights beside ``'model'`` and ``'opt'``) can be read without the rest.
    """
    with _open_archive(path) as archive:
        prefix = _archive_prefix(archive, path)
        data = _unpickle(archive, path, prefix + "data.pkl", prefix + "data/", lazy=lazy)
        if not constants:
            return data
        names = set(archive.namelist())
        consts: Any = ()
        if prefix + "constants.pkl" in names:
            has_dir = any(n.startswith(prefix + "constants/") for n in names)
            # Older TorchScript writers kept constant storages in data/.
            consts = _unpickle(archive, path, prefix + "constants.pkl",
                               prefix + ("constants/" if has_dir else "data/"))
        return data, consts


def _walk(obj: Any, prefix: str, seen: set) -> Iterator[Tuple[str, np.ndarray]]:
    if isinstance(obj, (np.ndarray, LazyTensor)):
        yield prefix, obj
        return
    if id(obj) in seen:  # shared submodules / cycles: first name wins
        return
    if isinstance(obj, (dict, list, tuple, TorchModule)):
        seen.add(id(obj))
    if isinstance(obj, TorchModule):
        obj = obj.state
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return
    for k, v in items:
        yield from _walk(v, f"{prefix}.{k}" if prefix else str(k), seen)


# ------------------------------------------------------------------ torch layouts -> Flax

TORCH_LAYOUTS = ("linear", "conv", None)


def key_mismatch(missing, unexpected, misshaped, missing_ema=()) -> str:
    """The converters' one wording of a checkpoint that does not fit a model ('' when it fits):
    missing (model parameters with no key), missing EMA copies, unexpected keys (sorted),
    shapes that disagree."""
    problems = []
    if missing:
        problems.append(f"missing (vqlc parameters with no checkpoint key): {list(missing)}")
    if missing_ema:
        problems.append(f"missing EMA copies (--weights=ema): {list(missing_ema)}")
    if unexpected:
        problems.append(f"unexpected checkpoint keys: {sorted(unexpected)}")
    if misshaped:
        problems.append(f"shapes that disagree: {list(misshaped)}")
    return "; ".join(problems)


def to_flax_layout(array: np.ndarray, layout: Optional[str]) -> np.ndarray:
    """A torch weight in Flax's layout: "linear" [out, in] -> [in, out]; "conv" [out, in, kh,
    kw] -> [kh, kw, in, out]; None as it is (biases, norms, embeddings)."""
    if layout == "linear":
        return array.T
    if layout == "conv":
        return array.transpose(2, 3, 1, 0)
    if layout is not None:
        raise ValueError(f"layout {layout!r}; valid: {TORCH_LAYOUTS}.")
    return array


def flax_shape(shape: tuple, layout: Optional[str]) -> tuple:
    """The shape `to_flax_layout` gives an array of `shape` (without reading it)."""
    if layout == "linear":
        return tuple(shape[::-1])
    if layout == "conv" and len(shape) == 4:
        return tuple(shape[i] for i in (2, 3, 1, 0))
    return tuple(shape)


def flatten_arrays(obj: Any) -> Dict[str, np.ndarray]:
    """All numpy (and :class:`LazyTensor`) leaves of a loaded tree, keyed by their '.'-joined
    path."""
    return dict(_walk(obj, "", set()))


def load_torch_file(path: str, key: Optional[str] = None) -> Dict[str, np.ndarray]:
    """Read a PyTorch checkpoint into ``{name: np.ndarray}``, without torch.

    Handles ``torch.save`` zip files (a state dict, or a checkpoint nesting one
    under ``'state_dict'`` or ``'model'``) and TorchScript archives (the module's
    parameters and buffers, named like ``state_dict()`` keys). Nested dicts and
    submodules are flattened with '.'; non-tensor entries are dropped.

    Args:
      path: the ``.pt`` / ``.pth`` / ``.ckpt`` file.
      key: take this entry of the top-level dict (e.g. ``'ema'``) instead of the
        automatic ``'state_dict'`` / ``'model'`` choice.

    Raises:
      FileNotFoundError: no such file.
      TorchFileError: legacy (non-zip) format, corrupt archive, or ``key`` absent.
    """
    obj = load_torch_object(path)
    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            found = list(obj) if isinstance(obj, dict) else type(obj).__name__
            raise TorchFileError(f"{path}: no entry {key!r} at the top level (found {found})")
        obj = obj[key]
    elif isinstance(obj, dict):
        for nested in ("state_dict", "model"):
            if isinstance(obj.get(nested), (dict, TorchModule)) and flatten_arrays(obj[nested]):
                obj = obj[nested]
                break
    return flatten_arrays(obj)
