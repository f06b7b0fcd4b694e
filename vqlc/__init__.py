"""vqlc: VQGAN-LC image tokenizer in JAX/Flax."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so `import vqlc` stays cheap and does not pull in TensorFlow or orbax.
    if name == "Tokenizer":
        from vqlc.tokenizer import Tokenizer
        return Tokenizer
    raise AttributeError(f"module 'vqlc' has no attribute {name!r}")
