"""What the golden scripts share to run beside this machine's torch (never imported by vqlc or
its tests)."""
import sys

import torch

_TV_SHIM_LIB = None


def import_torchvision():
    """Import torchvision even where its C ops cannot load.

    A CUDA torchvision wheel next to a CPU-only torch cannot load its ``_C``
    extension, and its import then dies registering fake kernels for
    ``torchvision::nms``/``qnms``. The golden scripts need only pure-Python
    torchvision models, so on that failure the two op schemas are declared (never run)
    and the import is retried.
    """
    try:
        import torchvision  # noqa: F401
        return
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        print(f"torchvision C ops unavailable ({e}); declaring op schemas and retrying",
              file=sys.stderr)  # stderr: benchmark workers answer on stdout
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    global _TV_SHIM_LIB  # keep the library alive, or the definitions are dropped
    _TV_SHIM_LIB = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        _TV_SHIM_LIB.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401
