"""The LC quantizer's frozen codebook: load, validate and save .npy files; nothing else.

The workdir keeps one copy, <workdir>/codebook.npy, written once; checkpoints do not hold it.
Building one (the codebook task, or a recipe nested in a tokenizer config) is
vqlc.codebook.task's job.
"""

import ml_collections
import numpy as np

from vqlc import atomic_io, rundir, storage

WORKDIR_FILE = rundir.CODEBOOK
INFO_FILE = rundir.CODEBOOK_INFO


def load_codebook(path: str, codebook_size: int, feature_dim: int) -> np.ndarray:
    """Reads a float32 [codebook_size, feature_dim] .npy file, with a clear error when it is not."""
    if not path:
        raise ValueError(
            "quantizer.kind='lc' needs a frozen codebook: set --config.codebook.path=<file.npy> "
            "(float32 [K, D], e.g. from vqlc/configs/codebook_imagenet.py), or "
            "--config.codebook.build=task with a codebook.task config to build one from the "
            "training data.")
    if not storage.exists(path):
        raise FileNotFoundError(
            f"Codebook file not found: {path!r}. Build one with the codebook task "
            "(python -m vqlc.main --config=codebook_imagenet --workdir=<dir>) "
            "or point --config.codebook.path at an existing float32 [K, D] .npy file.")
    try:
        codes = storage.load_npy(path, mmap=True)
    except (ValueError, OSError, EOFError) as e:  # pickles, text, truncated files
        raise ValueError(f"Codebook {path!r} is not a readable .npy array file ({e}); it must "
                         "hold a float32 [K, D] array (numpy.save).") from e
    if not isinstance(codes, np.ndarray):  # an .npz archive
        raise ValueError(f"Codebook {path!r} is an .npz archive; it must be a single float32 "
                         "[K, D] array saved with numpy.save.")
    return validate_codebook(codes, path, codebook_size, feature_dim)


def validate_codebook(codes: np.ndarray, path: str, codebook_size: int,
                      feature_dim: int) -> np.ndarray:
    """The float32 [codebook_size, feature_dim] codebook read from `path` (any file format), or
    a ValueError saying what is wrong with it."""
    if codes.shape != (codebook_size, feature_dim):
        raise ValueError(
            f"Codebook {path!r} has shape {codes.shape}, but the config asks for "
            f"quantizer.codebook_size={codebook_size} x codebook.feature_dim={feature_dim}. "
            "Fix the config or the file.")
    if not np.issubdtype(codes.dtype, np.floating):  # token ids or labels, not centres
        raise ValueError(f"Codebook {path!r} has dtype {codes.dtype}; k-means centres are "
                         "floating point (float32).")
    codes = np.asarray(codes, np.float32)
    bad = ~np.isfinite(codes).all(axis=1)
    if bad.any():
        raise ValueError(f"Codebook {path!r} contains NaN or Inf values (in {int(bad.sum())} of "
                         f"its {codebook_size} rows, first row {int(np.argmax(bad))}).")
    return codes


def check_codebook(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Validates the frozen-codebook settings before any compute (and before anything is written
    to `workdir`): the file the run would use exists and matches the config, and a resumed run is
    not silently given a different codebook than the one it trained with."""
    q, cb = config.quantizer, config.codebook
    if q.kind != "lc":
        return
    target = rundir.codebook(workdir)
    if storage.exists(target):
        stored = load_codebook(target, q.codebook_size, cb.feature_dim)
        if cb.path and not np.array_equal(
                stored, load_codebook(cb.path, q.codebook_size, cb.feature_dim)):
            raise ValueError(
                f"codebook.path={cb.path!r} differs from the codebook this workdir's run was "
                f"started with ({target}). Use a new --workdir for a new codebook, or drop "
                "--config.codebook.path to resume with the stored one.")
        return
    if cb.path:
        load_codebook(cb.path, q.codebook_size, cb.feature_dim)
    elif cb.build and cb.build != "task":
        raise ValueError(f"codebook.build={cb.build!r} is unknown; valid: '', 'task'.")
    elif cb.build == "task" and not cb.task:
        raise ValueError("codebook.build='task' needs a codebook-task config in codebook.task "
                         "(e.g. vqlc.codebook.recipes.vgg16_demo(), as vqlc/configs/default.py).")
    elif not cb.build:
        load_codebook(cb.path, q.codebook_size, cb.feature_dim)  # raises the 'set a path' error


def save_codebook(workdir: str, codes: np.ndarray, info: dict) -> str:
    """Writes <workdir>/codebook.npy (float32) and codebook.json, each atomically; returns the
    .npy path."""
    target = rundir.codebook(workdir)
    atomic_io.atomic_save_npy(target, np.asarray(codes, np.float32))
    atomic_io.atomic_write_json(rundir.codebook_info(workdir), info)
    return target
