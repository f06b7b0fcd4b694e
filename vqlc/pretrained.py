"""A trained tokenizer as three files, for people who only want to run it.

    python -m vqlc.pretrained --workdir=runs/demo [--step=N] --dst=exports/demo

    tok = Tokenizer.from_pretrained("exports/demo")      # or "owner/name" on the Hugging Face Hub
    tok.save_pretrained("exports/demo")                  # the same files from a loaded Tokenizer

A pretrained directory holds exactly:

    config.json            the run's config, plus a "vqlc" block: format, the vqlc version that
                           wrote it, and the source tokenizer's identity (workdir, step, hash)
    model.safetensors      the trained variable collections ("params", and "ema" for the EMA
                           quantizer), keys joined with "." (params.encoder.conv_in.kernel)
    codebook.safetensors   LC tokenizers only: the frozen codebook, "codebook" float32 [K, D]
                           (100,000 x 768 in the paper: stored once, never inside the model file)

Loading needs only the core install (jax, flax, numpy, safetensors, ml_collections, absl-py,
pillow, etils): no orbax, grain or optax. Writing one from a workdir reads its orbax checkpoint,
so the command needs the [train] extra.
"""
import importlib.metadata
import json
import re
import sys

import jax
import ml_collections
import numpy as np
import safetensors
import safetensors.numpy
from absl import flags
from etils import epath
from flax import traverse_util

from vqlc import atomic_io, cli, config_io, extras, parallel, rundir, storage, tokenizer
from vqlc.codebook import frozen

PROG = "vqlc.pretrained"
FORMAT = 1
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
CODEBOOK_FILE = "codebook.safetensors"
CODEBOOK_KEY = "codebook"
VQLC_BLOCK = "vqlc"  # the key of config.json's export metadata, beside the config's fields
_SEP = "."
# Hugging Face Hub repository ids: "owner/name", letters, digits, '-', '_', '.'.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$", re.ASCII)


def _version() -> str:
    try:
        return importlib.metadata.version("vqlc")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
        import vqlc
        return vqlc.__version__


# ---------------------------------------------------------------------------------------------
# Writing


def _config_json(config: ml_collections.ConfigDict, source: dict) -> str:
    data = json.loads(config.to_json_best_effort())  # config_io's form of config.json
    data[VQLC_BLOCK] = {"format": FORMAT, "version": _version(), "source": source}
    return json.dumps(data, indent=2)


def _split_variables(variables: dict) -> tuple[dict, dict]:
    """(trained, frozen) collections, as tokenizer.inference_shapes splits them."""
    trained = {k: v for k, v in variables.items() if k in tokenizer.TRAINED_COLLECTIONS}
    frozen = {k: v for k, v in variables.items() if k not in tokenizer.TRAINED_COLLECTIONS}
    return trained, frozen


def _flat_numpy(tree: dict) -> dict[str, np.ndarray]:
    flat = traverse_util.flatten_dict(tree, sep=_SEP)
    return {k: np.ascontiguousarray(jax.device_get(v)) for k, v in sorted(flat.items())}


def _frozen_codebook(frozen: dict) -> np.ndarray:
    # tokenizer.place_frozen puts the one codebook array at every frozen leaf.
    return np.ascontiguousarray(jax.device_get(jax.tree.leaves(frozen)[0]), np.float32)


def _recorded_source(directory: str) -> dict | None:
    """The source identity an existing export in `directory` records; None when there is no
    readable vqlc config.json."""
    try:
        block = storage.read_json(rundir.join(directory, CONFIG_FILE)).get(VQLC_BLOCK)
    except (OSError, ValueError, AttributeError):
        return None
    return block.get("source") if isinstance(block, dict) else None


def check_destination(directory: str, source: dict) -> None:
    """Refuses to write into `directory` when it holds anything but an export of the same run
    (same workdir and config hash: a re-export, or another step of it, replaces the files)."""
    if storage.exists(directory) and not storage.isdir(directory):
        raise NotADirectoryError(f"--dst {directory!r} is a file, not a directory.")
    if not storage.listdir(directory):
        return
    recorded = _recorded_source(directory)
    same = recorded is not None and all(
        recorded.get(k) == source.get(k) for k in ("workdir", "config_hash"))
    if not same:
        what = ("an export of another tokenizer " + _describe(recorded) if recorded
                else "files that are not a vqlc pretrained export")
        raise FileExistsError(f"{directory!r} is not empty: it holds {what}. Choose an empty "
                              "or new directory.")


def save(tok, directory: str) -> dict[str, int]:
    """Writes config.json, model.safetensors and (for an LC tokenizer) codebook.safetensors of
    the Tokenizer `tok` into `directory`, each file atomically; returns {path: bytes}. Call it
    from one process. Refuses a directory holding anything but an export of the same run."""
    source = tok.identity()
    check_destination(directory, source)
    trained, frozen = _split_variables(tok.variables)
    files = {MODEL_FILE: safetensors.numpy.save(_flat_numpy(trained))}
    if frozen:
        files[CODEBOOK_FILE] = safetensors.numpy.save({CODEBOOK_KEY: _frozen_codebook(frozen)})
    # Last: a directory without config.json is visibly an unfinished export.
    files[CONFIG_FILE] = _config_json(tok.config, source).encode("utf-8")
    written = {}
    for name, data in files.items():
        path = rundir.join(directory, name)
        atomic_io.write_bytes(path, data)
        written[path] = len(data)
    return written


# ---------------------------------------------------------------------------------------------
# Reading


def _describe(source: dict) -> str:
    return (f"(workdir {source.get('workdir')!r}, step {source.get('step')}, "
            f"config hash {source.get('config_hash')})")


def looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not storage.is_remote(name)


def _download(repo_id: str) -> str:
    with extras.needed("hub", f"loading {repo_id!r} from the Hugging Face Hub; no local "
                              "directory has that name"):
        import huggingface_hub
    from huggingface_hub.utils import RepositoryNotFoundError
    try:
        return huggingface_hub.snapshot_download(
            repo_id, allow_patterns=[CONFIG_FILE, "*.safetensors"])
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(
            f"{repo_id!r} is neither a local directory nor a Hugging Face Hub repository this "
            f"machine can read ({type(e).__name__}).") from e


def resolve(directory_or_hub_id: str) -> str:
    """The directory to read: the argument itself when it is a directory (local or remote),
    else the Hub snapshot of an "owner/name" id (downloaded once, then cached)."""
    name = str(directory_or_hub_id)
    if storage.is_remote(name) or storage.isdir(name):
        return name
    if storage.exists(name):
        raise NotADirectoryError(f"{name!r} is a file; expected a directory written by "
                                 "Tokenizer.save_pretrained or python -m vqlc.pretrained.")
    if looks_like_hub_id(name):
        return _download(name)
    raise FileNotFoundError(
        f"{name!r} not found: expected a directory written by Tokenizer.save_pretrained or "
        "python -m vqlc.pretrained (or a Hugging Face Hub id, owner/name).")


def _require(directory: str, name: str, why: str) -> str:
    path = rundir.join(directory, name)
    if not storage.exists(path):
        raise FileNotFoundError(f"{path!r} not found: {why}")
    return path


def read_config(directory: str) -> tuple[ml_collections.ConfigDict, dict]:
    """(config, source identity) of the export in `directory`; its recorded config hash must be
    the one its config computes (else config.json was edited: the weights would not fit)."""
    path = _require(directory, CONFIG_FILE, "not a vqlc pretrained directory (write one with "
                    "Tokenizer.save_pretrained or python -m vqlc.pretrained).")
    try:
        data = storage.read_json(path)
    except ValueError as e:
        raise ValueError(f"{path!r} is not readable JSON ({e}).") from e
    block = data.pop(VQLC_BLOCK, None) if isinstance(data, dict) else None
    if not isinstance(block, dict):
        raise ValueError(f"{path!r} has no {VQLC_BLOCK!r} block: it is not a vqlc pretrained "
                         "export (a training workdir loads with Tokenizer.load).")
    if block.get("format") != FORMAT:
        raise ValueError(f"{path!r} is pretrained format {block.get('format')!r}; this vqlc "
                         f"({_version()}) reads format {FORMAT}.")
    config = ml_collections.ConfigDict(data)
    source = dict(block.get("source") or {})
    computed = tokenizer.config_hash(config)
    if source.get("config_hash") != computed:
        raise ValueError(f"{path!r} records config hash {source.get('config_hash')!r}, but its "
                         f"fields hash to {computed!r}: the model fields were edited after the "
                         "export, and the weights do not fit them. Re-export the tokenizer.")
    return config, source


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    try:
        if storage.is_remote(path):
            return safetensors.numpy.load(epath.Path(path).read_bytes())
        return safetensors.numpy.load_file(path)
    except safetensors.SafetensorError as e:  # truncated or not a safetensors file
        raise ValueError(f"{path!r} is not a readable safetensors file ({e}); re-export it.") from e


def _differences(arrays: dict, expected: dict) -> list[str]:
    """Keys missing, unexpected or of another shape/dtype in `arrays` than `expected`."""
    def form(a):
        return f"{tuple(a.shape)} {np.dtype(a.dtype).name}"
    diffs = []
    for key in sorted(set(arrays) | set(expected)):
        if key not in arrays:
            diffs.append(f"missing {key} {form(expected[key])}")
        elif key not in expected:
            diffs.append(f"unexpected {key} {form(arrays[key])}")
        elif form(arrays[key]) != form(expected[key]):
            diffs.append(f"{key}: file {form(arrays[key])}, model {form(expected[key])}")
    return diffs


def _check_finite(arrays: dict, path: str) -> None:
    bad = [k for k, a in arrays.items()
           if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all()]
    if bad:
        raise ValueError(f"{path!r} holds NaN or Inf values in {len(bad)} arrays (first: "
                         f"{bad[0]}).")


def read_trained(directory: str, trained_shapes: dict) -> dict:
    """model.safetensors, checked against the shapes of the model config.json builds."""
    path = _require(directory, MODEL_FILE, "the export is incomplete; re-export the tokenizer.")
    arrays = _read_safetensors(path)
    expected = traverse_util.flatten_dict(trained_shapes, sep=_SEP)
    diffs = _differences(arrays, expected)
    if diffs:
        raise ValueError(
            f"{path!r} does not fit the model its config.json describes ({len(diffs)} "
            f"differences, first: {'; '.join(diffs[:3])}).")
    _check_finite(arrays, path)
    return traverse_util.unflatten_dict(arrays, sep=_SEP)


def read_codebook(directory: str, config: ml_collections.ConfigDict) -> np.ndarray:
    path = _require(directory, CODEBOOK_FILE, "an LC tokenizer's export holds its frozen "
                    "codebook there; re-export the tokenizer.")
    arrays = _read_safetensors(path)
    if set(arrays) != {CODEBOOK_KEY}:
        raise ValueError(f"{path!r} holds arrays {sorted(arrays)}; expected one, "
                         f"{CODEBOOK_KEY!r}.")
    return frozen.validate_codebook(arrays[CODEBOOK_KEY], path,
                                    config.quantizer.codebook_size, config.codebook.feature_dim)


def load(directory_or_hub_id: str, *, mesh=None) -> "tokenizer.Tokenizer":
    """The Tokenizer an export holds (see Tokenizer.from_pretrained), replicated on `mesh`."""
    directory = resolve(directory_or_hub_id)
    config, source = read_config(directory)
    mesh = parallel.make_mesh(1) if mesh is None else mesh
    model, trained_shapes, frozen_shapes = tokenizer.inference_shapes(config)
    variables = jax.device_put(read_trained(directory, trained_shapes),
                               parallel.replicated(mesh))
    if frozen_shapes:
        variables.update(tokenizer.place_frozen(frozen_shapes, read_codebook(directory, config),
                                                mesh))
    # identity() is the source run's {workdir, step, config_hash}, not this directory's: the
    # export computes exactly what that checkpoint computes, so datasets and samples it made
    # (encoded.check_tokenizer compares all three) stay usable, and the reverse.
    return tokenizer.Tokenizer(config, model, variables, source.get("step"), mesh=mesh,
                               workdir=source.get("workdir"))


# ---------------------------------------------------------------------------------------------
# Command line


def _define_flags() -> flags.FlagValues:
    fv = cli.new_flags()
    cli.define_export_source(fv)
    flags.DEFINE_string("dst", None, "Directory to write the export to: new, empty, or an "
                        "earlier export of the same workdir.", flag_values=fv)
    flags.mark_flag_as_required("dst", flag_values=fv)
    return fv


def export(workdir: str, dst: str, step: int | None = None) -> tuple[dict[str, int], dict]:
    """Writes the export of `workdir` (its checkpoint `step`, default newest) into `dst`;
    returns ({path: bytes}, the exported tokenizer's identity)."""
    config = config_io.load(workdir)
    # Before restoring the checkpoint: a refused destination costs nothing.
    check_destination(dst, {"workdir": rundir.absolute(workdir),
                            "config_hash": tokenizer.config_hash(config)})
    tok = tokenizer.Tokenizer.load(workdir, step)
    return save(tok, dst), tok.identity()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    fv = _define_flags()
    positional = cli.parse(fv, argv, PROG, __doc__)
    if positional:
        cli.usage_error(PROG, f"unexpected arguments: {' '.join(positional)}", fv)

    def run() -> int:
        written, source = export(fv.workdir, fv.dst, fv.step)
        print(f"exported {source['workdir']} step {source['step']} (config hash "
              f"{source['config_hash']}):")
        width = max(map(len, written))
        for path, size in written.items():
            print(f"  {path:<{width}}  {size / 2**20:9.2f} MB")
        return 0

    return cli.main_wrapper(PROG, run)()


if __name__ == "__main__":
    sys.exit(main())
