"""vqlc: VQGAN-LC image tokenizer in JAX/Flax."""

from importlib import metadata as _metadata

try:  # the one version is pyproject.toml's, as installed
    __version__ = _metadata.version("vqlc")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"


def __getattr__(name):
    # Lazy so `import vqlc` stays cheap and does not pull in TensorFlow or orbax.
    if name == "Tokenizer":
        from vqlc.tokenizer import Tokenizer
        return Tokenizer
    if name == "Generator":
        from vqlc.gen.loaded import Generator
        return Generator
    if name == "Classifier":
        from vqlc.cls.loaded import Classifier
        return Classifier
    raise AttributeError(f"module 'vqlc' has no attribute {name!r}")
