"""Writes notebooks/demo.ipynb from the cells below, so the notebook is reviewed as Python.

    python notebooks/make_demo_notebook.py

The notebook is plain nbformat 4.5 JSON (no outputs stored), written without the nbformat
package; tests/test_notebook.py checks that this script reproduces it byte for byte and runs it.
"""
import json
import os

NOTEBOOK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.ipynb")

# (kind, source) in order; kind is "markdown" or "code".
CELLS = [
    ("markdown", """\
# vqlc: tokenize an image with VQGAN-LC

[VQGAN-LC](https://arxiv.org/abs/2406.11837) turns an image into a grid of discrete tokens,
each an index into a large frozen codebook (k-means centres of pretrained features, mapped into
the latent space by a trained linear projector), and turns tokens back into an image.
This notebook installs `vqlc`, gets a tokenizer, tokenizes one photograph, shows its token map
and reconstruction, and measures PSNR, SSIM and LPIPS on it.

Runs on Colab (CPU or GPU runtime) or in a local Jupyter started from a checkout."""),
    ("markdown", """\
## 1. Install

On Colab, set `VQLC_REPO` to the git URL of the repository: the cell clones it and installs it
with pip, only if `import vqlc` fails. Leave it empty when `vqlc` is already installed or this
notebook runs from a checkout (then the checkout is put on `sys.path`). If pip replaced a
package that was already imported, restart the session and run the cells again. For a GPU,
install the CUDA build of `jax` that matches the installed version (see the JAX install guide);
the CPU build works everywhere."""),
    ("code", """\
VQLC_REPO = ""  # e.g. "https://github.com/<owner>/vqlc.git"; empty: already installed / checkout

import os
import subprocess
import sys


def find_checkout():
    \"\"\"The repository root if this runs from a checkout (or next to a clone), else None.\"\"\"
    here = os.getcwd()
    for d in (here, os.path.dirname(here), os.path.join(here, "vqlc_repo")):
        if os.path.isfile(os.path.join(d, "pyproject.toml")) and os.path.isdir(os.path.join(d, "vqlc")):
            return d
    return None


def run_streaming(cmd, cwd=None):
    \"\"\"Runs a command and prints its output as it comes (a notebook hides a child's stdout).\"\"\"
    print("$", " ".join(cmd), flush=True)
    with subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as proc:
        for line in proc.stdout:
            print(line, end="", flush=True)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)


REPO_DIR = find_checkout()
if REPO_DIR and REPO_DIR not in sys.path:
    sys.path.insert(0, REPO_DIR)  # vqlc imports straight from the checkout
try:
    import vqlc
except ImportError:
    if not VQLC_REPO:
        raise RuntimeError("vqlc is not installed: set VQLC_REPO to its git URL, or start "
                           "this notebook from a checkout of the repository.") from None
    # Not "./vqlc": a folder of that name on sys.path would shadow the package.
    REPO_DIR = os.path.abspath("vqlc_repo")
    if not os.path.isdir(REPO_DIR):
        run_streaming(["git", "clone", "--depth=1", VQLC_REPO, REPO_DIR])
    run_streaming([sys.executable, "-m", "pip", "install", "-q", REPO_DIR + "[demo]"])
    sys.path.insert(0, REPO_DIR)
    import vqlc
print("vqlc", vqlc.__version__, "from", os.path.dirname(vqlc.__file__))
print("checkout:", REPO_DIR)"""),
    ("markdown", """\
## 2. A tokenizer

`Tokenizer.load(workdir)` reads the newest checkpoint of a training run. By default this is
the embedded demo's run, `runs/demo` (or `$VQLC_DEMO_WORKDIR`): a small f4 VQGAN-LC with
512 codes, trained on 32 px crops of scikit-image's photographs. If it has no checkpoint yet:

* with `TRAIN_IF_MISSING = True` the cell trains it, the same as
  `python -m vqlc.main --config=default --workdir=runs/demo`
  (about 15 minutes on a CPU, a few minutes on a GPU; nothing to download);
* or, with the authors' released weights downloaded, set `RELEASE_CHECKPOINT` (and
  `RELEASE_CODEBOOK`): the cell converts them, as
  `python -m vqlc.convert --config=imagenet_lc --src vqgan-lc-100K-f16-dim8.pth
  --dst runs/release --codebook codebook-100K.pth`, and loads `runs/release`
  (an f16 model with 100,000 codes)."""),
    ("code", """\
BASE = REPO_DIR or os.getcwd()
WORKDIR = os.environ.get("VQLC_DEMO_WORKDIR") or os.path.join(BASE, "runs", "demo")
TRAIN_IF_MISSING = os.environ.get("VQLC_TRAIN_IF_MISSING", "1") != "0"
RELEASE_CHECKPOINT = ""  # e.g. "vqgan-lc-100K-f16-dim8.pth"
RELEASE_CODEBOOK = ""    # e.g. "codebook-100K.pth"
RELEASE_WORKDIR = os.path.join(BASE, "runs", "release")"""),
    ("code", """\
from vqlc import Tokenizer


def has_checkpoint(workdir):
    ckpts = os.path.join(workdir, "checkpoints")
    return os.path.isdir(ckpts) and any(name.isdigit() for name in os.listdir(ckpts))


def config_file(name):
    # The configs ship inside the package: --config takes their names.
    return name[:-3] if name.endswith(".py") else name


if not has_checkpoint(WORKDIR):
    if RELEASE_CHECKPOINT:
        if not has_checkpoint(RELEASE_WORKDIR):
            cmd = [sys.executable, "-m", "vqlc.convert", "--config=" + config_file("imagenet_lc.py"),
                   "--src=" + os.path.abspath(RELEASE_CHECKPOINT), "--dst=" + RELEASE_WORKDIR]
            if RELEASE_CODEBOOK:
                cmd.append("--codebook=" + os.path.abspath(RELEASE_CODEBOOK))
            run_streaming(cmd, cwd=REPO_DIR)
        WORKDIR = RELEASE_WORKDIR
    elif TRAIN_IF_MISSING:
        print(f"No checkpoint in {WORKDIR}: training the demo (about 15 min on a CPU).")
        run_streaming([sys.executable, "-m", "vqlc.main", "--config=" + config_file("default.py"),
                       "--workdir=" + WORKDIR, "--config.train.progress_bar=False",
                       "--config.eval.progress_bar=False"], cwd=REPO_DIR)
    else:
        raise FileNotFoundError(f"No checkpoint in {WORKDIR}: set TRAIN_IF_MISSING = True, "
                                "point VQLC_DEMO_WORKDIR at a trained run, or set "
                                "RELEASE_CHECKPOINT.")

tok = Tokenizer.load(WORKDIR)
print(f"{WORKDIR}, step {tok.step}: {tok.codebook_size} codes of dim "
      f"{tok.config.quantizer.dim}, downsample factor f={tok.downsample_factor}, "
      f"trained on {tok.image_size} px images")"""),
    ("markdown", """\
## 3. An image

On Colab you can upload a photo (cancel for the default); `IMAGE_PATH` (or `$VQLC_DEMO_IMAGE`)
names a file directly; otherwise it is scikit-image's bundled cat, `skimage.data.chelsea()`.
The photo is centre-cropped to a square and resized to `SIZE`, a multiple of the downsample
factor. The model is fully convolutional, so `SIZE` need not be the training crop size: it is
at least 128 px here so that the token map has something to show."""),
    ("code", """\
import numpy as np
from PIL import Image

IMAGE_PATH = os.environ.get("VQLC_DEMO_IMAGE", "")
if not IMAGE_PATH:
    try:
        from google.colab import files
    except ImportError:
        files = None
    if files is not None:
        uploaded = files.upload()  # written to the working directory
        IMAGE_PATH = next(iter(uploaded), "")
if IMAGE_PATH:
    photo = np.asarray(Image.open(IMAGE_PATH).convert("RGB"))
else:
    import skimage.data
    photo = skimage.data.chelsea()

f = tok.downsample_factor
SIZE = max(tok.image_size, 128)
SIZE -= SIZE % f


def center_crop_resize(image, size):
    \"\"\"Largest centred square of a uint8 [H, W, 3] image, resized (bicubic) to size x size.\"\"\"
    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    square = Image.fromarray(image[top:top + s, left:left + s])
    return np.asarray(square.resize((size, size), Image.Resampling.BICUBIC))


img = center_crop_resize(photo, SIZE)
print("photo", photo.shape, "-> image", img.shape, img.dtype)"""),
    ("markdown", """\
## 4. Tokenize and reconstruct

`tok.encode` maps uint8 images `[B, H, W, 3]` (a single `[H, W, 3]` image too) to int32 code
ids `[B, H/f, W/f]`; `tok.decode` maps code ids back to uint8 images. The token map below
colours each position by its code id."""),
    ("code", """\
import matplotlib.pyplot as plt

codes = tok.encode(img)[0]           # int32 [SIZE/f, SIZE/f]
rec = tok.decode(codes[None])[0]     # uint8 [SIZE, SIZE, 3]
print(f"codes {codes.shape} {codes.dtype}: {codes.size} tokens, "
      f"{np.unique(codes).size} distinct codes of {tok.codebook_size}")

fig, axes = plt.subplots(1, 3, figsize=(13, 4.5))
axes[0].imshow(img)
axes[0].set_title(f"original {SIZE}x{SIZE}")
axes[1].imshow(rec)
axes[1].set_title(f"reconstruction from {codes.size} tokens")
im = axes[2].imshow(codes, cmap="nipy_spectral", interpolation="nearest",
                    vmin=0, vmax=tok.codebook_size - 1)
axes[2].set_title(f"token map {codes.shape[0]}x{codes.shape[1]}")
fig.colorbar(im, ax=axes[2], fraction=0.046, label="code id")
for ax in axes:
    ax.axis("off")
plt.show()"""),
    ("markdown", """\
## 5. How close is the reconstruction?

PSNR (dB, RGB) and SSIM take images in [0, 1]; LPIPS (VGG16, lower is closer) takes images in
[-1, 1]. All three are `[B]` per-image values. If the run was evaluated, its held-out numbers
(`eval/metrics.json`) follow: they are averages over many crops at the training size, so they
differ from this one image's."""),
    ("code", """\
import json

import jax.numpy as jnp

from vqlc.eval.metrics import psnr, ssim
from vqlc.models.lpips import lpips

x = jnp.asarray(img[None], jnp.float32) / 255.0
y = jnp.asarray(rec[None], jnp.float32) / 255.0
metrics = {"psnr": float(psnr(x, y)[0]), "ssim": float(ssim(x, y)[0]),
           "lpips": float(lpips(2.0 * x - 1.0, 2.0 * y - 1.0)[0])}
for name, value in metrics.items():
    print(f"{name:>6}: {value:.4f}")

metrics_path = os.path.join(WORKDIR, "eval", "metrics.json")
if os.path.exists(metrics_path):
    with open(metrics_path) as fp:
        saved = json.load(fp)
    print(f"\\nheld-out evaluation ({metrics_path}):")
    for name, value in saved.items():
        if isinstance(value, float):
            value = f"{value:.4f}"
        if isinstance(value, (int, str)) and not isinstance(value, bool):
            print(f"  {name:<18} {value}")"""),
    ("markdown", """\
## Next

* Batches: `tok.encode(images)` with `images` uint8 `[B, H, W, 3]`.
* Continuous latents: `z = tok.encode_latents(images)`; `tok.decode_latents(z)` snaps each
  latent to its nearest code and decodes.
* Train, evaluate or convert other models: see the README (`python -m vqlc.main`,
  `python -m vqlc.convert`)."""),
]


def _source_lines(text: str) -> list:
    """nbformat's multi-line string: a list of lines, each but the last ending in a newline."""
    lines = text.split("\n")
    return [line + "\n" for line in lines[:-1]] + [lines[-1]]


def notebook() -> dict:
    cells = []
    for i, (kind, text) in enumerate(CELLS):
        cell = {"cell_type": kind, "id": f"cell-{i:02d}", "metadata": {},
                "source": _source_lines(text)}
        if kind == "code":
            cell.update(execution_count=None, outputs=[])
        cells.append(cell)
    return {
        "cells": cells,
        "metadata": {
            "colab": {"name": "vqlc demo", "provenance": []},
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def render() -> str:
    # Jupyter's own layout (indent 1, sorted keys, trailing newline), so saving it unchanged
    # from Jupyter keeps the diff empty.
    return json.dumps(notebook(), indent=1, sort_keys=True, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    with open(NOTEBOOK, "w", encoding="utf-8") as fp:
        fp.write(render())
    print("wrote", NOTEBOOK)
