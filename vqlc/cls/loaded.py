"""A trained classifier from Python: images (or token maps) in, class probabilities out.

    from vqlc import Classifier
    clf = Classifier.load("runs/cls_demo")   # finds (and checks) the tokenizer it was trained on
    probs = clf.predict(images_uint8)         # float32 [B, classes], rows sum to 1
    probs = clf.predict_codes(codes)          # from token maps the tokenizer already made

Images go through the tokenizer (encode: nearest codes), then the classifier's stem, as in
training and evaluation (vqlc.cls.inputs).
"""
from __future__ import annotations

import jax
import numpy as np

from vqlc import checkpoint, config_io, parallel, rundir
from vqlc.cls import train as train_lib, vit as vit_lib
from vqlc.data import encoded
from vqlc.gen import loaded as gen_loaded


class Classifier:
    """A trained classifier and its tokenizer, read-only. Build one with Classifier.load."""

    def __init__(self, clf, params, tables: dict, tokenizer, record: dict, step: int, mesh):
        self.clf = clf
        self.params = params
        self.tables = tables
        self.tokenizer = tokenizer
        self.record = record
        self.step = step
        self.mesh = mesh
        self._probabilities = jax.jit(
            lambda params, tables, codes: jax.nn.softmax(clf.logits(params, tables, codes)),
            out_shardings=parallel.batch_sharded(mesh))

    @classmethod
    def load(cls, workdir: str, *, tokenizer=None, step: int | None = None,
             mesh=None) -> "Classifier":
        """The classifier of a `classifier` task workdir at its newest checkpoint (or `step`).
        tokenizer: default, the one classifier.json records; a given one must be that same
        tokenizer (ValueError otherwise). mesh: devices each call splits its batch over."""
        record = train_lib.read_record(workdir)
        if mesh is None:
            mesh = tokenizer.mesh if tokenizer is not None else parallel.make_mesh(1)
        if tokenizer is None:
            tokenizer = gen_loaded.find_tokenizer(record, workdir, mesh, "classifier")
        elif tokenizer.mesh != mesh:
            raise ValueError("The tokenizer was loaded on another mesh: load it with the "
                             "classifier's mesh (Tokenizer.load(..., mesh=mesh)).")
        encoded.check_tokenizer(record["tokenizer"], tokenizer, f"The classifier in {workdir}")
        clf = train_lib.make_model(config_io.load(workdir), tokenizer)
        replicated = parallel.replicated(mesh)
        target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                             sharding=replicated),
                              vit_lib.param_shapes(clf.vit))
        restored, step = checkpoint.restore_subtrees(rundir.checkpoints(workdir),
                                                     {"params": target}, step)
        return cls(clf, restored["params"], clf.tables(tokenizer), tokenizer, record, step, mesh)

    @property
    def num_classes(self) -> int:
        return self.clf.vit.num_classes

    @property
    def stem(self) -> str:
        return self.clf.stem

    def predict(self, images) -> np.ndarray:
        """uint8 images [B, H, W, 3] at the tokenizer's size -> float32 probabilities
        [B, classes]."""
        images = np.asarray(images)
        size = self.tokenizer.image_size
        if images.ndim == 4 and images.shape[1:3] != (size, size):
            raise ValueError(f"The classifier reads the tokenizer's {size}x{size} images; got "
                             f"{images.shape[1]}x{images.shape[2]} (resize or crop first).")
        return self.predict_codes(self.tokenizer.encode(images))

    def predict_codes(self, codes) -> np.ndarray:
        """int code ids [B, h, w] of this tokenizer -> float32 probabilities [B, classes]."""
        codes = np.asarray(codes)
        side = self.tokenizer.image_size // self.tokenizer.downsample_factor
        if codes.ndim != 3 or codes.shape[1:] != (side, side) or \
                not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"Expected integer token maps [B, {side}, {side}]; got "
                             f"{codes.dtype} {list(codes.shape)}.")
        if codes.size and (codes.min() < 0 or codes.max() >= self.tokenizer.codebook_size):
            raise ValueError(f"Code ids must lie in [0, {self.tokenizer.codebook_size}); got "
                             f"[{codes.min()}, {codes.max()}].")
        n = len(codes)
        devices = parallel.batch_devices(self.mesh)
        pad = -n % devices
        codes = np.concatenate([codes.astype(np.int32),
                                np.zeros((pad,) + codes.shape[1:], np.int32)])
        out = self._probabilities(self.params, self.tables,
                                  parallel.global_batch(codes, self.mesh))
        return np.asarray(parallel.local_rows(out)[:n], np.float32)
