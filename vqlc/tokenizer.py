"""Tokens from images and back: the API for people who just want a tokenizer.

    from vqlc import Tokenizer
    tok = Tokenizer.load("runs/demo")         # read-only; mesh=parallel.make_mesh() for all devices
    codes = tok.encode(images_uint8)          # int32 [B, h, w]
    images = tok.decode(codes)                # uint8 [B, H, W, 3]
    z = tok.encode_latents(images_uint8)      # float32 [B, h, w, dim], before quantisation
    codes, z = tok.encode_with_latents(images_uint8)   # both, one encoder pass
    images = tok.decode_latents(z)            # snap each latent to its nearest code, decode

Inside another model's jitted step (a generator training on tokens or latents), use the pure
functions instead: `encode_fn(model)(variables, x)` etc., on jax.Arrays with images in [-1, 1].
"""
import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np

from vqlc import config_io, parallel, rundir, storage
from vqlc.codebook import frozen as frozen_codebook
from vqlc.eval.images import to_float, to_uint8
from vqlc.models import build


def _snap(model, z):
    """Ids of the codes nearest to latents z (the quantizer's search, inference mode)."""
    return model.quantizer(z, train=False).indices


def _encode_indices(model, x):
    return _snap(model, model.encode(x))


def _encode_indices_and_latents(model, x):
    z = model.encode(x)
    return _snap(model, z), z


def _snap_and_decode(model, z):
    # Through the indices, not z_q: z_q = z + sg(code - z) differs from the code by rounding,
    # and decode_latents must give exactly the images decode() gives for the same tokens.
    return model.decode_code(_snap(model, z))


def encode_fn(model):
    """(variables, images [B, H, W, 3] in [-1, 1]) -> int32 codes [B, h, w]."""
    return lambda variables, x: model.apply(variables, x, method=_encode_indices)


def encode_latents_fn(model):
    """(variables, images in [-1, 1]) -> pre-quantisation latents [B, h, w, dim]."""
    return lambda variables, x: model.apply(variables, x, method=type(model).encode)


def encode_with_latents_fn(model):
    """(variables, images in [-1, 1]) -> (int32 codes [B, h, w], latents [B, h, w, dim]), one
    encoder pass for both."""
    return lambda variables, x: model.apply(variables, x, method=_encode_indices_and_latents)


def decode_fn(model):
    """(variables, int32 codes [B, h, w]) -> images [B, H, W, 3] in about [-1, 1]."""
    return lambda variables, codes: model.apply(variables, codes, method=type(model).decode_code)


def snap_fn(model):
    """(variables, latents [B, h, w, dim]) -> int32 ids of their nearest codes [B, h, w]."""
    return lambda variables, z: model.apply(variables, z, method=_snap)


def decode_latents_fn(model):
    """(variables, latents [B, h, w, dim]) -> the images of their nearest codes."""
    return lambda variables, z: model.apply(variables, z, method=_snap_and_decode)


def code_vectors_fn(model):
    """(variables) -> float32 [K, dim]: every code's vector in latent space, what the decoder
    sees for each id (the LC projector applied to the frozen codebook; VQ's and EMA's table)."""
    return lambda variables: model.apply(variables, method=lambda m: m.quantizer.codebook())


def decode_vectors_fn(model):
    """(variables, vectors [B, h, w, dim]) -> images in about [-1, 1], decoded as they are (no
    snapping: blends of code vectors, such as mixup's, decode too)."""
    return lambda variables, z: model.apply(variables, z, method=type(model).decode)


def config_hash(config) -> str:
    """A short hash of the fields that define what a tokenizer computes (config_io's identity
    fields), for datasets and samples to record which tokenizer made them."""
    return hashlib.sha256(json.dumps(config_io.identity(config), sort_keys=True)
                          .encode()).hexdigest()[:16]


# The variable collections training leaves in a checkpoint (and an export's model.safetensors);
# any other one a model has (the LC quantizer's 'frozen' codebook) is filled from its codebook.
TRAINED_COLLECTIONS = ("params", "ema")


def inference_shapes(config):
    """(model, trained, frozen): the model `config` builds, the shapes of its trained variable
    collections (TRAINED_COLLECTIONS it has) and of the rest (the LC quantizer's frozen codebook;
    {} for other quantizers). Nothing is computed: shapes only."""
    model = build.tokenizer_from_config(config)
    size = config.data.image_size
    shapes = jax.eval_shape(lambda: model.init(
        {"params": jax.random.key(0), "dropout": jax.random.key(0)},
        jnp.zeros((1, size, size, 3), jnp.float32), train=False))
    shapes = dict(shapes)
    shapes.pop("intermediates", None)
    trained = {k: shapes.pop(k) for k in TRAINED_COLLECTIONS if shapes.get(k)}
    frozen = {k: v for k, v in shapes.items() if v}
    return model, trained, frozen


def place_frozen(frozen, codes: np.ndarray, mesh) -> dict:
    """The frozen collections (`frozen`, shapes from inference_shapes) holding the codebook
    `codes`, split along K over `mesh`'s model axis (whole on each device when it has size 1):
    one placement however many leaves name it."""
    if not frozen:
        return {}
    codes = jax.device_put(codes, parallel.codebook_sharding(mesh))
    return jax.tree.map(lambda _: codes, frozen)


def inference_variables(config, workdir: str, mesh, step: int | None = None):
    """(model, variables, step): the generator's parameters, EMA codebook statistics and frozen
    LC codebook of a training workdir, replicated on `mesh`. Reads only: no optimiser or
    discriminator is built, nothing is written, and a missing codebook is an error (never
    rebuilt here)."""
    model, trained, frozen = inference_shapes(config)
    replicated = parallel.replicated(mesh)
    # The train state names the generator's parameters 'g_params'.
    targets = {"g_params" if k == "params" else k: v for k, v in trained.items()}
    targets = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                           targets)
    from vqlc import checkpoint  # orbax: the [train] extra
    restored, step = checkpoint.restore_subtrees(
        rundir.checkpoints(workdir), targets, step)
    variables = {"params" if k == "g_params" else k: v for k, v in restored.items()}
    if frozen:  # the LC quantizer's frozen codebook, kept once in the workdir
        path = rundir.codebook(workdir)
        if not storage.exists(path):
            raise FileNotFoundError(
                f"{path!r} not found: an LC tokenizer's frozen codebook is stored there by the "
                "run that trained it. Copy the codebook.npy the run used into the workdir.")
        codes = frozen_codebook.load_codebook(path, config.quantizer.codebook_size,
                                              config.codebook.feature_dim)
        variables.update(place_frozen(frozen, codes, mesh))
    return model, variables, step


class Tokenizer:

    def __init__(self, config, model, variables, step: int | None = None, *, mesh=None,
                 workdir: str | None = None):
        self.config = config
        self.model = model
        self.variables = variables
        self.step = step
        self.workdir = None if workdir is None else rundir.absolute(workdir)
        self.mesh = parallel.make_mesh(1) if mesh is None else mesh
        out = parallel.batch_sharded(self.mesh)
        self._encode = jax.jit(encode_fn(model), out_shardings=out)
        self._encode_latents = jax.jit(encode_latents_fn(model), out_shardings=out)
        self._encode_with_latents = jax.jit(encode_with_latents_fn(model),
                                            out_shardings=(out, out))
        self._decode = jax.jit(decode_fn(model), out_shardings=out)
        self._decode_latents = jax.jit(decode_latents_fn(model), out_shardings=out)

    @classmethod
    def load(cls, workdir: str, step: int | None = None, *, mesh=None) -> "Tokenizer":
        """The newest checkpoint (or `step`) of a training workdir, read-only. With `mesh`
        (e.g. parallel.make_mesh() for every device) each call splits its batch over the mesh;
        with several processes, every process calls with its own images (the same count on
        each) and gets its own results back."""
        config = config_io.load(workdir)
        mesh = parallel.make_mesh(1) if mesh is None else mesh
        model, variables, step = inference_variables(config, workdir, mesh, step)
        return cls(config, model, variables, step, mesh=mesh, workdir=workdir)

    @classmethod
    def from_pretrained(cls, directory_or_hub_id: str, *, mesh=None) -> "Tokenizer":
        """A tokenizer exported by save_pretrained (or `python -m vqlc.pretrained`): a local or
        gs:// directory, or a Hugging Face Hub id "owner/name" (the [hub] extra). Needs only
        the core install; identity() is the exported run's, so its datasets stay usable."""
        from vqlc import pretrained  # pretrained imports this module, not the reverse
        return pretrained.load(directory_or_hub_id, mesh=mesh)

    def save_pretrained(self, directory: str) -> dict[str, int]:
        """Writes config.json, model.safetensors and (LC) codebook.safetensors to `directory`
        for from_pretrained; returns {path: bytes written}. See vqlc.pretrained.save."""
        from vqlc import pretrained
        return pretrained.save(self, directory)

    def identity(self) -> dict:
        """Which tokenizer this is: recorded next to datasets and samples made with it."""
        return {"workdir": self.workdir, "step": self.step, "config_hash": config_hash(self.config)}

    def code_vectors(self) -> jax.Array:
        """float32 [K, dim] on the mesh (split along K over its model axis): each code id's
        latent vector."""
        with jax.set_mesh(self.mesh):
            return jax.jit(code_vectors_fn(self.model))(self.variables)

    def frozen_codebook(self) -> jax.Array:
        """float32 [K, feature_dim]: the LC quantizer's frozen codebook C (its k-means centres,
        e.g. CLIP features), as placed on the mesh. Other quantizers have none (ValueError)."""
        frozen = self.variables.get("frozen")
        if not frozen:
            raise ValueError(f"A {self.config.quantizer.kind!r} tokenizer has no frozen "
                             "codebook: only VQGAN-LC's quantizer (kind 'lc') keeps one.")
        return frozen["quantizer"]["codebook"]

    @property
    def image_size(self) -> int:
        return self.config.data.image_size

    @property
    def codebook_size(self) -> int:
        return self.config.quantizer.codebook_size

    @property
    def latent_dim(self) -> int:
        return self.config.quantizer.dim

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.model.ch_mult) - 1)

    def _run(self, fn, x: np.ndarray) -> np.ndarray:
        """`fn` over this process's rows `x`, padded to fill every local device, on the mesh."""
        n = len(x)
        per_call = parallel.batch_devices(self.mesh) // jax.process_count()
        pad = -n % max(per_call, 1)
        if pad:
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
        with jax.set_mesh(self.mesh):  # how the codebook is split (see vqlc.parallel)
            out = fn(self.variables, parallel.global_batch(x, self.mesh))
        return jax.tree.map(lambda o: parallel.local_rows(o)[:n], out)

    def _images(self, images) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        f = self.downsample_factor
        if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] % f or images.shape[2] % f:
            raise ValueError(f"Expected uint8 images [B, H, W, 3] with H and W multiples of {f}; "
                             f"got shape {images.shape}.")
        if images.dtype != np.uint8:
            raise ValueError(f"Expected uint8 images (0..255); got dtype {images.dtype}.")
        return to_float(images)

    def encode(self, images) -> np.ndarray:
        """uint8 [B, H, W, 3] -> int32 code ids [B, H/f, W/f]."""
        return self._run(self._encode, self._images(images))

    def encode_latents(self, images) -> np.ndarray:
        """uint8 [B, H, W, 3] -> continuous pre-quantisation latents [B, H/f, W/f, dim]."""
        return self._run(self._encode_latents, self._images(images))

    def encode_with_latents(self, images) -> tuple[np.ndarray, np.ndarray]:
        """(encode(images), encode_latents(images)) from one encoder pass."""
        return self._run(self._encode_with_latents, self._images(images))

    def decode(self, codes) -> np.ndarray:
        """int32 code ids [B, h, w] -> uint8 images [B, h*f, w*f, 3]."""
        codes = np.asarray(codes)
        if codes.ndim != 3 or not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"Expected integer codes [B, h, w]; got {codes.dtype} {codes.shape}.")
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"Code ids must lie in [0, {self.codebook_size}); got "
                             f"[{codes.min()}, {codes.max()}].")
        return to_uint8(self._run(self._decode, codes.astype(np.int32)))

    def decode_latents(self, z) -> np.ndarray:
        """Latents [B, h, w, dim] -> nearest codes -> uint8 images."""
        z = np.asarray(z, np.float32)
        if z.ndim != 4 or z.shape[-1] != self.latent_dim:
            raise ValueError(f"Expected latents [B, h, w, {self.latent_dim}]; got {z.shape}.")
        return to_uint8(self._run(self._decode_latents, z))
