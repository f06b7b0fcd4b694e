"""Samples of a trained generator: the API for people who just want one.

    from vqlc import Generator
    gen = Generator.load("runs/gpt_demo")          # finds the tokenizer it was trained on
    images = gen.sample(labels, seed=0, top_k=8)   # uint8 [B, H, W, 3]
    codes = gen.sample_codes(labels, seed=0)       # int32 [B, h, w]
    logits = gen.logits(labels, codes)             # GPT: float32 [B, T+1, V] (see `logits`)

    gen = Generator.load("runs/dit_demo")          # a DiT / SiT / UNet (the diffusion task)
    images = gen.sample(labels, seed=0, cfg_scale=1.5, num_steps=100)
    latents = gen.sample_latents(labels, seed=0)   # [B, h, w, C], before snapping to codes
    out = gen.denoiser(x, t, labels)               # the network's raw output

`Generator.load` returns a `TokenGenerator` (a `gpt` workdir) or a `LatentGenerator` (a
`diffusion` workdir); what both offer is on `Generator`. Sample i of a call draws from the key
fold_in(key(seed), i), the key the `sample` task gives its sample i, so `gen.sample(labels,
seed=s)` holds the images a sample run with seed s writes for the same labels and sampler
settings. Sampling settings are per call; each new combination compiles once.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vqlc import parallel, rundir, storage
from vqlc import tokenizer as tokenizer_lib
from vqlc.data import encoded
from vqlc.gen import diffusion_generator, gpt_generator
from vqlc.gen import sample as sample_task
from vqlc.gen.samplers import autoregressive

GENERATOR_FILE = "generator.json"  # what the gpt and diffusion tasks write


def read_record(workdir: str) -> dict:
    path = rundir.join(workdir, GENERATOR_FILE)
    if not storage.exists(path):
        raise FileNotFoundError(f"{path!r} not found: is {workdir!r} a generator workdir (of "
                                "the gpt or diffusion task)?")
    return storage.read_json(path)


def find_tokenizer(record: dict, workdir: str, mesh,
                   what: str = "generator") -> tokenizer_lib.Tokenizer:
    """The tokenizer a run's record (a generator's, or a classifier's) names, at the recorded
    step."""
    recorded = record.get("tokenizer") or {}
    path = recorded.get("workdir")
    if not path:
        raise FileNotFoundError(f"The {what} in {workdir!r} does not record its tokenizer's "
                                "workdir: pass tokenizer=Tokenizer.load(...).")
    try:
        return tokenizer_lib.Tokenizer.load(path, recorded.get("step"), mesh=mesh)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"The {what} in {workdir!r} was trained on the tokenizer in {path!r} (step "
            f"{recorded.get('step')}), which cannot be read: {e} Pass "
            "tokenizer=Tokenizer.load(...) if it has moved.") from e


def seed_word(seed: int) -> jax.Array:
    """The seed as the uint32 jax.random.key(seed) keeps of a Python int (its low 32 bits)."""
    return jnp.uint32(int(seed) % 2 ** 32)


class Generator:
    """A trained generator and its tokenizer, read-only. Build one with Generator.load."""

    kind = ""  # the generator.json kind a subclass reads

    def __init__(self, inner, tokenizer: tokenizer_lib.Tokenizer, mesh):
        self.inner = inner  # the sample task's generator (vqlc.gen.generator.Generator)
        self.tokenizer = tokenizer
        self.mesh = mesh
        self._steps = {}  # (sampler settings, outputs) -> jitted draw

    @classmethod
    def load(cls, workdir: str, *, tokenizer=None, step: int | None = None,
             use_ema: bool = True, mesh=None) -> "Generator":
        """The generator of a `gpt` or `diffusion` task workdir at its newest checkpoint (or
        `step`).

        tokenizer: default, the one generator.json records (its workdir, at the recorded
        step); a given one must be that same tokenizer (ValueError otherwise).
        use_ema: the EMA weights when the run kept them. mesh: devices of this process that
        each call splits its batch over (default: the tokenizer's mesh, or one device)."""
        record = read_record(workdir)
        kinds = {sub.kind: sub for sub in (TokenGenerator, LatentGenerator)
                 if issubclass(sub, cls)}
        kind = record.get("kind")
        if kind not in kinds:
            raise ValueError(f"The generator in {workdir!r} is of kind {kind!r}; "
                             f"{cls.__name__}.load reads: {', '.join(kinds)}.")
        if mesh is None:
            mesh = tokenizer.mesh if tokenizer is not None else parallel.make_mesh(1)
        if tokenizer is None:
            tokenizer = find_tokenizer(record, workdir, mesh)
        elif tokenizer.mesh != mesh:
            raise ValueError("The tokenizer was loaded on another mesh: load it with the "
                             "generator's mesh (Tokenizer.load(..., mesh=mesh)).")
        encoded.check_tokenizer(record["tokenizer"], tokenizer, f"The generator in {workdir}")
        return kinds[kind].restore(workdir, tokenizer, mesh, step, use_ema)

    # ------------------------------------------------------------------------------ facts

    @property
    def model(self):
        return self.inner.model

    @property
    def variables(self) -> dict:
        return self.inner.variables

    @property
    def step(self) -> int:
        return self.inner.step

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def identity(self) -> dict:
        """Which generator this is: the sample task's record of it, less the sampler settings
        (here they are per call)."""
        record = {"workdir": self.inner.workdir, **self.inner.identity()}
        record.pop("sampler")
        return record

    # ---------------------------------------------------------------------------- drawing

    def _draw(self, labels, seed: int, sampler, outputs: tuple) -> np.ndarray:
        """The sample task's draw (vqlc.gen.sample.draw_fn) of one output, for `sampler`."""
        labels = self._labels(labels)
        indices = np.arange(len(labels), dtype=np.uint32)
        key = (self._sampler_key(sampler), outputs)
        if key not in self._steps:
            draw = sample_task.draw_fn(self._with_sampler(sampler), self.tokenizer.model,
                                       outputs)
            self._steps[key] = jax.jit(lambda *args: draw(*args)[0],
                                       out_shardings=parallel.batch_sharded(self.mesh))
        step = self._steps[key]
        return self._on_mesh(lambda i, y: step(self.variables, self.tokenizer.variables,
                                               seed_word(seed), i, y), indices, labels)

    def _with_sampler(self, sampler):
        """The inner generator, sampling with `sampler`."""
        raise NotImplementedError

    @staticmethod
    def _sampler_key(sampler):
        raise NotImplementedError

    # ------------------------------------------------------------------------------ inputs

    def _labels(self, labels) -> np.ndarray:
        """Class labels; the null class (num_classes, guidance's unconditional branch) is one
        where the generator has one."""
        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"Expected integer labels [B]; got {labels.dtype} {labels.shape}.")
        if not labels.size:
            raise ValueError("Expected at least one label.")
        classes = self._label_count()
        if (labels.min() < 0 or labels.max() >= classes):
            raise ValueError(f"Labels must lie in [0, {classes}); got "
                             f"[{labels.min()}, {labels.max()}].")
        return labels.astype(np.int32)

    def _label_count(self) -> int:
        return max(self.num_classes, 1)  # unconditional: one start token, label 0

    def _on_mesh(self, fn, *batches: np.ndarray) -> np.ndarray:
        """fn over arrays sharing a batch axis, padded to fill the mesh's devices, split over
        them; this process's rows of the result, padding dropped."""
        n = len(batches[0])
        pad = -n % parallel.batch_devices(self.mesh)
        padded = [np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]) if pad else x
                  for x in batches]
        placed = parallel.global_batch(padded, self.mesh)
        return parallel.local_rows(fn(*placed))[:n]


class TokenGenerator(Generator):
    """A GPT (the `gpt` task's): token maps drawn with its KV cache."""

    kind = "gpt"

    @classmethod
    def restore(cls, workdir, tokenizer, mesh, step, use_ema) -> "TokenGenerator":
        config = sample_task.base_config()
        config.generator.gpt.use_ema = use_ema
        return cls(gpt_generator.GPTGenerator.load(config, workdir, tokenizer=tokenizer,
                                                   mesh=mesh, step=step), tokenizer, mesh)

    @property
    def token_grid(self) -> tuple:
        return self.inner.grid

    @property
    def vocab_size(self) -> int:
        """V of `logits`: mingpt's whole vocabulary (codes, then class ids), else the codes."""
        return self.model.output_size

    def sample(self, labels, seed: int = 0, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, cfg_scale: float | None = None,
               cfg_interval: tuple[int, int] | None = None) -> np.ndarray:
        """labels int [B] -> uint8 images [B, H, W, 3], sample i from fold_in(key(seed), i).

        temperature 0 = greedy; top_k / top_p None = off; cfg_scale None = no guidance;
        cfg_interval (start, end): the code positions guided (None = all). See
        vqlc.gen.samplers.autoregressive.sample."""
        sampler = _gpt_sampler(temperature, top_k, top_p, cfg_scale, cfg_interval)
        return self._draw(labels, seed, sampler, ("images",))

    def sample_codes(self, labels, seed: int = 0, temperature: float = 1.0,
                     top_k: int | None = None, top_p: float | None = None,
                     cfg_scale: float | None = None,
                     cfg_interval: tuple[int, int] | None = None) -> np.ndarray:
        """labels int [B] -> int32 codes [B, h, w]: the token maps `sample` decodes."""
        sampler = _gpt_sampler(temperature, top_k, top_p, cfg_scale, cfg_interval)
        return self._draw(labels, seed, sampler, ("codes",))

    def _with_sampler(self, sampler: dict):
        g = self.inner
        return gpt_generator.GPTGenerator(g.model, g.variables, g.record, g.step, sampler,
                                          g.workdir)

    @staticmethod
    def _sampler_key(sampler: dict):
        return tuple(sorted(sampler.items()))

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


class LatentGenerator(Generator):
    """A DiT, SiT or LDM UNet (the `diffusion` task's): latents, snapped to the nearest code
    to decode.

    Sampler settings (per call, vqlc.gen.diffusion_generator.sampler_config's names): `kind`
    ('' = the objective's default: ddpm for DiT, dopri5 for SiT; also ddim, euler, heun,
    sde), `num_steps` (0 = the kind's default), `cfg_scale` (1 = conditional),
    `guided_channels` (0 = all; 3 reproduces upstream DiT's and the release's bug),
    `cfg_interval` (start, end) in sampler time, `eta` (ddim), `atol` / `rtol` (dopri5)."""

    kind = "diffusion"

    @classmethod
    def restore(cls, workdir, tokenizer, mesh, step, use_ema) -> "LatentGenerator":
        config = sample_task.base_config()
        config.generator.diffusion.use_ema = use_ema
        return cls(diffusion_generator.DiffusionGenerator.load(
            config, workdir, tokenizer=tokenizer, mesh=mesh, step=step), tokenizer, mesh)

    @property
    def latent_shape(self) -> tuple:
        """One sample's latents (h, w, C)."""
        return self.inner.shape

    @property
    def objective(self) -> str:
        """ddpm (DiT: t is the timestep 0..999) | flow (SiT: t in [0, 1], 1 = data)."""
        return self.inner.objective.kind

    def sample(self, labels, seed: int = 0, **sampler) -> np.ndarray:
        """labels int [B] -> uint8 images [B, H, W, 3]: the sampled latents snapped to their
        nearest codes and decoded, sample i from fold_in(key(seed), i)."""
        return self._draw(labels, seed, self._sampler(sampler), ("images",))

    def sample_latents(self, labels, seed: int = 0, **sampler) -> np.ndarray:
        """labels int [B] -> float32 latents [B, h, w, C] in the tokenizer's latent space (the
        run's latent normalisation undone), before snapping."""
        return self._draw(labels, seed, self._sampler(sampler), ("latents",))

    def sample_codes(self, labels, seed: int = 0, **sampler) -> np.ndarray:
        """labels int [B] -> int32 codes [B, h, w]: the nearest codes of `sample_latents`."""
        return self._draw(labels, seed, self._sampler(sampler), ("codes",))

    def denoiser(self, x, t, labels) -> np.ndarray:
        """The network's raw output for latents x [B, h, w, C] at times t, NHWC.

        x is in the network's space: the tokenizer's latents normalised by the run's latent
        statistics (identity for latent_norm='none', the release's way). t as the network
        takes it: the timestep 0..999 for DiT and the UNet (ddpm), t in [0, 1] for SiT
        (flow, 1 = data); a scalar or one per sample. Channels: DiT with learned sigma 2C
        (epsilon, then the variance half); SiT's velocity (or score / noise) in the first C
        channels of a DiT head, as the release keeps it; the UNet's epsilon, C."""
        labels = self._labels(labels)
        x = np.asarray(x, np.float32)
        if x.shape[1:] != self.latent_shape or len(x) != len(labels):
            raise ValueError(f"Expected latents [{len(labels)}, "
                             f"{', '.join(map(str, self.latent_shape))}]; got {x.shape}.")
        t = np.broadcast_to(np.asarray(t, np.float32), (len(labels),)).copy()
        if "denoiser" not in self._steps:
            self._steps["denoiser"] = jax.jit(self.inner.denoiser)
        step = self._steps["denoiser"]
        return self._on_mesh(lambda x_, t_, y: step(self.variables, x_, t_, y), x, t, labels)

    def _label_count(self) -> int:
        return self.model.null_label + 1  # the null class is a label too

    def _sampler(self, settings: dict):
        sampler = diffusion_generator.sampler_config()
        sampler.use_ema = self.inner.sampler.use_ema
        interval = settings.pop("cfg_interval", None)
        valid = sorted(set(sampler) - {"use_ema", "cfg_start", "cfg_end"}) + ["cfg_interval"]
        unknown = sorted(set(settings) - set(valid))
        if unknown:
            raise TypeError(f"Unknown sampler settings {unknown}; valid: {', '.join(valid)} "
                            "(use_ema is chosen at Generator.load).")
        sampler.update(settings)
        if interval is not None:
            sampler.cfg_start, sampler.cfg_end = (float(v) for v in interval)
        diffusion_generator.check_sampler(sampler, self.objective, self.num_classes)
        return sampler

    def _with_sampler(self, sampler):
        g = self.inner
        return diffusion_generator.DiffusionGenerator(g.model, g.variables, g.record, g.step,
                                                      sampler, g.workdir)

    @staticmethod
    def _sampler_key(sampler):
        return tuple(sorted(sampler.to_dict().items()))


def _gpt_sampler(temperature, top_k, top_p, cfg_scale, cfg_interval) -> dict:
    """The GPT sampler's keyword arguments (GPTGenerator.sampler's form)."""
    return {"temperature": float(temperature), "top_k": None if top_k is None else int(top_k),
            "top_p": None if top_p is None else float(top_p),
            "cfg_scale": None if cfg_scale is None else float(cfg_scale),
            "cfg_interval": None if cfg_interval is None else tuple(int(i) for i in cfg_interval)}
