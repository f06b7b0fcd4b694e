"""`diffusion`: samples of a trained DiT / SiT workdir (the `diffusion` task's) for the `sample`
task: latents, which the sample task snaps to the nearest code and decodes.

    python -m vqlc.main --config=sample_demo --workdir=runs/dit_samples \\
        --config.generator.kind=diffusion --config.generator.workdir=runs/dit_demo \\
        --config.tokenizer.workdir=runs/demo --config.generator.diffusion.cfg_scale=1.5

Samplers (`generator.diffusion.kind`): a ddpm model samples with `ddpm` (ancestral, respaced:
DiT's 250 steps) or `ddim` (eta, LDM's 200 steps); a flow model with `euler`, `heun` (fixed
steps), `dopri5` (adaptive, SiT's default) or `sde` (Euler-Maruyama). Classifier-free guidance
(vqlc.gen.samplers.guidance) wraps the network once for all of them, on every latent channel
unless `guided_channels` says otherwise. Reads the checkpoint's EMA weights when the run kept
them (`use_ema`), refuses a tokenizer other than the one it was trained on, and draws sample i
from its own key alone.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vqlc import checkpoint, config_io, parallel, rundir, storage
from vqlc.data import encoded
from vqlc.gen import generator
from vqlc.gen.samplers import guidance

SAMPLERS = {"ddpm": ("ddpm", "ddim"), "flow": ("euler", "heun", "dopri5", "sde")}
DEFAULT_SAMPLER = {"ddpm": "ddpm", "flow": "dopri5"}
DEFAULT_STEPS = {"ddpm": 250, "ddim": 200, "euler": 250, "heun": 250, "sde": 250, "dopri5": 0}


def sampler_config() -> ml_collections.ConfigDict:
    """How a diffusion generator samples: the diffusion task's config.eval.sampler and the
    sample task's config.generator.diffusion."""
    c = ml_collections.ConfigDict()
    c.use_ema = True  # the EMA weights, when the run kept them
    c.kind = ""  # "" = the objective's default: ddpm (DiT) | dopri5 (SiT)
    c.num_steps = 0  # 0 = the kind's default: ddpm 250, ddim 200, euler/heun/sde 250
    c.eta = 1.0  # ddim only
    c.atol = 1e-6  # dopri5 only (SiT's defaults)
    c.rtol = 1e-3
    c.cfg_scale = 1.0  # 1 = conditional, no guidance
    c.guided_channels = 0  # 0 = every latent channel; 3 = upstream DiT's / the release's bug
    c.cfg_start = 0.0  # guide only while cfg_start <= t <= cfg_end (sampler time); end 0 = all
    c.cfg_end = 0.0
    return c


def sampler_kind(s, objective: str) -> str:
    return s.kind or DEFAULT_SAMPLER[objective]


def check_sampler(s, objective: str, num_classes: int) -> None:
    kind = sampler_kind(s, objective)
    if kind not in SAMPLERS[objective]:
        raise ValueError(f"sampler kind {kind!r} does not sample a {objective} model; valid: "
                         f"{', '.join(SAMPLERS[objective])}.")
    if s.cfg_scale != 1.0 and num_classes == 0:
        raise ValueError("Classifier-free guidance needs classes: an unconditional model "
                         "(network.num_classes=0) samples with cfg_scale=1.")
    if s.guided_channels < 0:
        raise ValueError(f"guided_channels={s.guided_channels} must be >= 0 (0 = all).")
    if s.num_steps < 0:
        raise ValueError(f"num_steps={s.num_steps} must be >= 0 (0 = the sampler's default).")


def read_record(workdir: str) -> dict:
    from vqlc.gen import diffusion_train
    path = rundir.join(workdir, diffusion_train.GENERATOR_FILE)
    if not storage.exists(path):
        raise FileNotFoundError(f"{path!r} not found: is {workdir!r} a workdir of the "
                                "diffusion task (python -m vqlc.main --config=dit_demo ...)?")
    record = storage.read_json(path)
    if record.get("kind") != "diffusion":
        raise ValueError(f"{workdir!r} holds a {record.get('kind')!r} generator, not a "
                         "diffusion one: use generator.kind="
                         f"{record.get('kind')!r}.")
    return record


class DiffusionGenerator(generator.Generator):
    space = "latents"

    def __init__(self, model, variables, record: dict, step: int, sampler, workdir: str):
        self.model = model
        self.variables = variables
        self.record = record
        self.step = step
        self.sampler = sampler  # a sampler_config()
        self.workdir = workdir
        self.objective = ml_collections.ConfigDict(record["objective"])
        self.shape = tuple(record["latent_shape"])
        stats = record["latent_stats"]
        self.mean = np.asarray(stats["mean"], np.float32)
        self.std = np.asarray(stats["std"], np.float32)
        check_sampler(sampler, self.objective.kind, record["network"]["num_classes"])

    @classmethod
    def load(cls, config, workdir: str, *, tokenizer, mesh,
             step: int | None = None) -> "DiffusionGenerator":
        """The newest checkpoint of `workdir` (or `step`), read-only."""
        from vqlc.gen import diffusion_train
        if not workdir:
            raise ValueError("config.generator.workdir is empty: set it to a diffusion task "
                             "workdir.")
        record = read_record(workdir)
        encoded.check_tokenizer(record["tokenizer"], tokenizer, f"The generator in {workdir}")
        train_config = config_io.load(workdir)
        shape = tuple(record["latent_shape"])
        model = diffusion_train.make_model(train_config.network, train_config.model, shape)
        shapes = jax.eval_shape(diffusion_train.init_params_fn(model, shape),
                                jax.random.key(0))
        sampler = config.generator.diffusion
        field = "ema_params" if record["ema"] and sampler.use_ema else "params"
        replicated = parallel.replicated(mesh)
        target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                             sharding=replicated), shapes)
        restored, step = checkpoint.restore_subtrees(rundir.checkpoints(workdir),
                                                     {field: target}, step)
        return cls(model, {"params": restored[field]}, record, step, sampler, workdir)

    def denoiser(self, variables, x, t, labels):
        """The network's raw output on normalised latents x [B, h, w, C]."""
        return self.model.apply(variables, x, t, labels)

    def sample(self, variables, keys, labels):
        """Latents [B, h, w, C] in the tokenizer's space (de-normalised)."""
        s, o = self.sampler, self.objective
        channels = self.shape[-1]
        kind = sampler_kind(s, o.kind)
        steps = int(s.num_steps) or DEFAULT_STEPS[kind]

        def model_fn(x, t, y):
            out = self.denoiser(variables, x, t, y)
            return out if o.kind == "ddpm" else out[..., :channels]  # SiT drops the sigma half
        interval = (s.cfg_start, s.cfg_end) if s.cfg_end > 0 else None
        fn = guidance.guided(model_fn, scale=float(s.cfg_scale),
                             null_label=self.model.null_label,
                             guided_channels=int(s.guided_channels) or channels,
                             interval=interval)
        shape = self.shape  # one sample's (h, w, C)
        if o.kind == "ddpm":
            from vqlc.gen.objectives import diffusion
            from vqlc.gen.samplers import ddpm
            schedule = diffusion.make_schedule(o.schedule)
            learned = bool(self.record["network"]["learn_sigma"])
            if kind == "ddpm":
                x = ddpm.sample_ddpm(fn, schedule, keys, labels, shape, learned_sigma=learned,
                                     num_steps=steps)
            else:
                x = ddpm.sample_ddim(fn, schedule, keys, labels, shape, num_steps=steps,
                                     eta=float(s.eta), learned_sigma=learned)
        elif kind == "sde":
            from vqlc.gen.samplers import sde
            x = sde.sample_sde(fn, keys, labels, shape, num_steps=steps,
                               interpolant=o.interpolant, prediction=o.prediction)
        else:
            from vqlc.gen.samplers import ode
            x, _ = ode.sample_ode(fn, keys, labels, shape, method=kind, num_steps=steps,
                                  atol=float(s.atol), rtol=float(s.rtol),
                                  interpolant=o.interpolant, prediction=o.prediction)
        return x * jnp.asarray(self.std) + jnp.asarray(self.mean)

    def identity(self) -> dict:
        return {"kind": "diffusion", "step": int(self.step), "network": self.record["network"],
                "objective": self.record["objective"], "ema": self.record["ema"],
                "sampler": {**self.sampler.to_dict(),
                            "kind": sampler_kind(self.sampler, self.objective.kind)},
                "parameters": int(sum(np.prod(x.shape) for x in
                                      jax.tree.leaves(self.variables)))}
