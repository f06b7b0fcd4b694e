"""Tokens from images and back: the API for people who just want a tokenizer.

    from vqlc import Tokenizer
    tok = Tokenizer.load("runs/demo")
    codes = tok.encode(images_uint8)          # int32 [B, h, w]
    images = tok.decode(codes)                # uint8 [B, H, W, 3]
    z = tok.encode_latents(images_uint8)      # float32 [B, h, w, dim], before quantisation
    images = tok.decode_latents(z)            # snap each latent to its nearest code, decode
"""
import os

import jax
import jax.numpy as jnp
import numpy as np

from vqlc import checkpoint, config_io, parallel
from vqlc.eval.images import to_uint8


class Tokenizer:

    def __init__(self, config, model, variables, step: int | None = None):
        self.config = config
        self.model = model
        self.variables = variables
        self.step = step
        m = model
        self._encode = jax.jit(lambda v, x: m.apply(v, x, method=_encode_indices))
        self._encode_latents = jax.jit(lambda v, x: m.apply(v, x, method=type(m).encode))
        self._decode = jax.jit(lambda v, c: m.apply(v, c, method=type(m).decode_code))
        self._decode_latents = jax.jit(lambda v, z: m.apply(v, z, method=_snap_and_decode))

    @classmethod
    def load(cls, workdir: str, step: int | None = None) -> "Tokenizer":
        """Loads the newest checkpoint (or `step`) of a training workdir, on one device."""
        from vqlc.train.trainer import model_variables, setup_model
        config = config_io.load(workdir)
        with config.unlocked():
            config.mesh.data = 1
        mesh = parallel.make_mesh(1)
        # A freshly initialised state gives the structure, shapes and shardings to restore into.
        model, _, _, _, template, frozen = setup_model(config, workdir, mesh, abstract=True)
        state, step = checkpoint.restore_state_only(
            os.path.join(os.path.abspath(workdir), "checkpoints"), template, step)
        return cls(config, model, model_variables(state, frozen), step)

    @property
    def image_size(self) -> int:
        return self.config.data.image_size

    @property
    def codebook_size(self) -> int:
        return self.config.quantizer.codebook_size

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.model.ch_mult) - 1)

    def _images(self, images) -> jax.Array:
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        f = self.downsample_factor
        if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] % f or images.shape[2] % f:
            raise ValueError(f"Expected uint8 images [B, H, W, 3] with H and W multiples of {f}; "
                             f"got shape {images.shape}.")
        if images.dtype != np.uint8:
            raise ValueError(f"Expected uint8 images (0..255); got dtype {images.dtype}.")
        return jnp.asarray(images, jnp.float32) / 127.5 - 1.0

    def encode(self, images) -> np.ndarray:
        """uint8 [B, H, W, 3] -> int32 code ids [B, H/f, W/f]."""
        return np.asarray(self._encode(self.variables, self._images(images)))

    def encode_latents(self, images) -> np.ndarray:
        """uint8 [B, H, W, 3] -> continuous pre-quantisation latents [B, H/f, W/f, dim]."""
        return np.asarray(self._encode_latents(self.variables, self._images(images)))

    def decode(self, codes) -> np.ndarray:
        """int32 code ids [B, h, w] -> uint8 images [B, h*f, w*f, 3]."""
        codes = np.asarray(codes)
        if codes.ndim != 3 or not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"Expected integer codes [B, h, w]; got {codes.dtype} {codes.shape}.")
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"Code ids must lie in [0, {self.codebook_size}); got "
                             f"[{codes.min()}, {codes.max()}].")
        return to_uint8(self._decode(self.variables, jnp.asarray(codes, jnp.int32)))

    def decode_latents(self, z) -> np.ndarray:
        """Latents [B, h, w, dim] -> nearest codes -> uint8 images."""
        z = jnp.asarray(z, jnp.float32)
        if z.ndim != 4 or z.shape[-1] != self.config.quantizer.dim:
            raise ValueError(f"Expected latents [B, h, w, {self.config.quantizer.dim}]; "
                             f"got {z.shape}.")
        return to_uint8(self._decode_latents(self.variables, z))


def _encode_indices(model, x):
    return model.quantizer(model.encode(x), train=False).indices


def _snap_and_decode(model, z):
    # Through the indices, not z_q: z_q = z + sg(code - z) differs from the code by rounding,
    # and decode_latents must give exactly the images decode() gives for the same tokens.
    return model.decode_code(model.quantizer(z, train=False).indices)

