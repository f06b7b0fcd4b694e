"""Input data: image sources (demo photos, folders, tfds) and grain pipelines.

The names below are imported on first use, so that `vqlc.data.transforms` (what inference
needs) imports without grain (the [train] extra)."""
import importlib

_EXPORTS = {
    "make_eval_iterator": "pipeline", "make_eval_source_iterator": "pipeline",
    "make_source": "pipeline", "make_train_iterator": "pipeline",
    "num_eval_batches": "pipeline", "num_eval_examples": "pipeline",
    "BadDataError": "sources", "DemoPhotos": "sources", "ImageFolder": "sources",
    "TfdsImages": "sources",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vqlc.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"vqlc.data.{_EXPORTS[name]}"), name)
