"""Samples and next-token logits of a trained generator: the API for people who just want one.

    from vqlc import Generator
    gen = Generator.load("runs/gpt_demo")          # finds the tokenizer it was trained on
    images = gen.sample(labels, seed=0, top_k=8)   # uint8 [B, H, W, 3]
    codes = gen.sample_codes(labels, seed=0)       # int32 [B, h, w]
    logits = gen.logits(labels, codes)             # float32 [B, T+1, V] (see `logits`)

Sample i of a call draws from the key fold_in(key(seed), i), the key the `sample` task gives
its sample i, so `gen.sample(labels, seed=s)` holds the images a sample run with seed s writes
for the same labels. Sampling settings are per call; each new combination compiles once.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vqlc import parallel
from vqlc import tokenizer as tokenizer_lib
from vqlc.data import encoded
from vqlc.gen import gpt_generator
from vqlc.gen import sample as sample_task
from vqlc.gen.samplers import autoregressive

# generator.json kinds this API can load.
KINDS = ("gpt",)


def find_tokenizer(record: dict, workdir: str, mesh) -> tokenizer_lib.Tokenizer:
    """The tokenizer a generator's record names, at the recorded step."""
    recorded = record.get("tokenizer") or {}
    path = recorded.get("workdir")
    if not path:
        raise FileNotFoundError(f"The generator in {workdir!r} does not record its tokenizer's "
                                "workdir: pass tokenizer=Tokenizer.load(...).")
    try:
        return tokenizer_lib.Tokenizer.load(path, recorded.get("step"), mesh=mesh)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"The generator in {workdir!r} was trained on the tokenizer in {path!r} (step "
            f"{recorded.get('step')}), which cannot be read: {e} Pass "
            "tokenizer=Tokenizer.load(...) if it has moved.") from e


def check_kind(record: dict, workdir: str) -> None:
    kind = record.get("kind")
    if kind not in KINDS:
        raise ValueError(f"The generator in {workdir!r} is of kind {kind!r}; "
                         f"Generator.load reads: {', '.join(KINDS)}.")


def image_step(gpt: gpt_generator.GPTGenerator, tok_model, decode_images: bool):
    """(generator variables, tokenizer variables, seed uint32, indices [B], labels [B]) ->
    uint8 images [B, H, W, 3] (or int32 codes [B, h, w] without `decode_images`).

    The sample task's step (vqlc.gen.sample.make_step), with the seed traced rather than
    baked in, so another seed does not compile again."""
    decode = tokenizer_lib.decode_fn(tok_model)

    def step(gen_vars, tok_vars, seed, indices, labels):
        keys = sample_task.sample_keys(seed, indices)
        codes = gpt.sample(gen_vars, keys, labels).astype(jnp.int32)
        if not decode_images:
            return codes
        x = decode(tok_vars, codes).astype(jnp.float32)
        # images.to_uint8's arithmetic, on the device, as the sample task does it
        return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

    return step


def seed_word(seed: int) -> jax.Array:
    """The seed as the uint32 jax.random.key(seed) keeps of a Python int (its low 32 bits)."""
    return jnp.uint32(int(seed) % 2 ** 32)


class Generator:
    """A trained generator and its tokenizer, read-only. Build one with Generator.load."""

    def __init__(self, gpt: gpt_generator.GPTGenerator, tokenizer: tokenizer_lib.Tokenizer,
                 mesh):
        self.gpt = gpt
        self.tokenizer = tokenizer
        self.mesh = mesh
        self._steps = {}  # (sampler settings, decode?) -> jitted step

    @classmethod
    def load(cls, workdir: str, *, tokenizer=None, step: int | None = None,
             use_ema: bool = True, mesh=None) -> "Generator":
        """The generator of a `gpt` task workdir at its newest checkpoint (or `step`).

        tokenizer: default, the one generator.json records (its workdir, at the recorded
        step); a given one must be that same tokenizer (ValueError otherwise).
        use_ema: the EMA weights when the run kept them. mesh: devices of this process that
        each call splits its batch over (default: the tokenizer's mesh, or one device)."""
        record = gpt_generator.read_record(workdir)  # FileNotFoundError: not a gpt workdir
        check_kind(record, workdir)
        if mesh is None:
            mesh = tokenizer.mesh if tokenizer is not None else parallel.make_mesh(1)
        if tokenizer is None:
            tokenizer = find_tokenizer(record, workdir, mesh)
        elif tokenizer.mesh != mesh:
            raise ValueError("The tokenizer was loaded on another mesh: load it with the "
                             "generator's mesh (Tokenizer.load(..., mesh=mesh)).")
        encoded.check_tokenizer(record["tokenizer"], tokenizer, f"The GPT in {workdir}")
        config = sample_task.base_config()
        config.generator.gpt.use_ema = use_ema
        gpt = gpt_generator.GPTGenerator.load(config, workdir, tokenizer=tokenizer, mesh=mesh,
                                              step=step)
        return cls(gpt, tokenizer, mesh)

    # ------------------------------------------------------------------------------ facts

    @property
    def model(self):
        return self.gpt.model

    @property
    def variables(self) -> dict:
        return self.gpt.variables

    @property
    def step(self) -> int:
        return self.gpt.step

    @property
    def token_grid(self) -> tuple:
        return self.gpt.grid

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def vocab_size(self) -> int:
        """V of `logits`: mingpt's whole vocabulary (codes, then class ids), else the codes."""
        return self.model.output_size

    def identity(self) -> dict:
        """Which generator this is: the sample task's record of it, less the sampler settings
        (here they are per call)."""
        record = {"workdir": self.gpt.workdir, **self.gpt.identity()}
        record.pop("sampler")
        return record

    # ---------------------------------------------------------------------------- sampling

    def sample(self, labels, seed: int = 0, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, cfg_scale: float | None = None,
               cfg_interval: tuple[int, int] | None = None) -> np.ndarray:
        """labels int [B] -> uint8 images [B, H, W, 3], sample i from fold_in(key(seed), i).

        temperature 0 = greedy; top_k / top_p None = off; cfg_scale None = no guidance;
        cfg_interval (start, end): the code positions guided (None = all). See
        vqlc.gen.samplers.autoregressive.sample."""
        sampler = _sampler(temperature, top_k, top_p, cfg_scale, cfg_interval)
        return self._draw(labels, seed, sampler, decode_images=True)

    def sample_codes(self, labels, seed: int = 0, temperature: float = 1.0,
                     top_k: int | None = None, top_p: float | None = None,
                     cfg_scale: float | None = None,
                     cfg_interval: tuple[int, int] | None = None) -> np.ndarray:
        """labels int [B] -> int32 codes [B, h, w]: the token maps `sample` decodes."""
        sampler = _sampler(temperature, top_k, top_p, cfg_scale, cfg_interval)
        return self._draw(labels, seed, sampler, decode_images=False)

    def _draw(self, labels, seed: int, sampler: dict, decode_images: bool) -> np.ndarray:
        labels = self._labels(labels)
        indices = np.arange(len(labels), dtype=np.uint32)
        step = self._step(sampler, decode_images)
        return self._on_mesh(lambda i, y: step(self.variables, self.tokenizer.variables,
                                               seed_word(seed), i, y), indices, labels)

    def _step(self, sampler: dict, decode_images: bool):
        key = (tuple(sorted(sampler.items())), decode_images)
        if key not in self._steps:
            gpt = gpt_generator.GPTGenerator(self.model, self.variables, self.gpt.record,
                                             self.step, sampler, self.gpt.workdir)
            self._steps[key] = jax.jit(image_step(gpt, self.tokenizer.model, decode_images),
                                       out_shardings=parallel.batch_sharded(self.mesh))
        return self._steps[key]

    # ------------------------------------------------------------------------------ logits

    def logits(self, labels, codes) -> np.ndarray:
        """labels int [B], codes int [B, h, w] or [B, T] -> float32 logits [B, P, V].

        Position 0 predicts code 0 from the condition alone; position t > 0 predicts code t
        after codes[:, :t]. P = T + 1 (the last predicts the code after the given ones) when
        T < num_codes; a full map (T = num_codes) has no code after it, so P = T. For mingpt,
        V is the network's whole output vocabulary, image codes first, then class ids (as in
        the release); for llamagen, the image codes. These are the unguided logits the
        sampler draws from (its KV-cache path), before temperature and filtering."""
        labels = self._labels(labels)
        codes = self._codes(codes, len(labels))
        if codes.shape[1] < self.model.num_codes:
            # a placeholder code: the position that reads it is never computed
            codes = np.concatenate([codes, np.zeros((len(codes), 1), np.int32)], axis=1)
        return self._on_mesh(lambda y, c: autoregressive.teacher_forced_logits(
            self.model, self.variables, y, c), labels, codes)

    # ------------------------------------------------------------------------------ inputs

    def _labels(self, labels) -> np.ndarray:
        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"Expected integer labels [B]; got {labels.dtype} {labels.shape}.")
        if not labels.size:
            raise ValueError("Expected at least one label.")
        classes = max(self.num_classes, 1)  # unconditional: one start token, label 0
        if (labels.min() < 0 or labels.max() >= classes):
            raise ValueError(f"Labels must lie in [0, {classes}); got "
                             f"[{labels.min()}, {labels.max()}].")
        return labels.astype(np.int32)

    def _codes(self, codes, batch: int) -> np.ndarray:
        codes = np.asarray(codes)
        if codes.ndim == 3:
            codes = codes.reshape(len(codes), -1)
        if (codes.ndim != 2 or len(codes) != batch
                or not np.issubdtype(codes.dtype, np.integer)):
            raise ValueError(f"Expected integer codes [{batch}, h, w] or [{batch}, T]; got "
                             f"{codes.dtype} {codes.shape}.")
        if codes.shape[1] > self.model.num_codes:
            raise ValueError(f"{codes.shape[1]} codes per sample; the model holds "
                             f"{self.model.num_codes}.")
        size = self.model.codebook_size
        if codes.size and (codes.min() < 0 or codes.max() >= size):
            raise ValueError(f"Code ids must lie in [0, {size}); got "
                             f"[{codes.min()}, {codes.max()}].")
        return codes.astype(np.int32)

    def _on_mesh(self, fn, *batches: np.ndarray) -> np.ndarray:
        """fn over arrays sharing a batch axis, padded to fill the mesh's devices, split over
        them; this process's rows of the result, padding dropped."""
        n = len(batches[0])
        pad = -n % self.mesh.shape[parallel.DATA_AXIS]
        padded = [np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]) if pad else x
                  for x in batches]
        placed = parallel.global_batch(padded, self.mesh)
        return parallel.local_rows(fn(*placed))[:n]


def _sampler(temperature, top_k, top_p, cfg_scale, cfg_interval) -> dict:
    """The GPT sampler's keyword arguments (GPTGenerator.sampler's form)."""
    return {"temperature": float(temperature), "top_k": None if top_k is None else int(top_k),
            "top_p": None if top_p is None else float(top_p),
            "cfg_scale": None if cfg_scale is None else float(cfg_scale),
            "cfg_interval": None if cfg_interval is None else tuple(int(i) for i in cfg_interval)}
