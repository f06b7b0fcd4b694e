"""`gpt`: samples of a trained GPT workdir (the `gpt` task's) for the `sample` task.

    python -m vqlc.main --config=sample_demo --workdir=runs/gpt_samples \\
        --config.generator.kind=gpt --config.generator.workdir=runs/gpt_demo \\
        --config.tokenizer.workdir=runs/demo --config.generator.gpt.top_k=51

Reads the checkpoint's weights (the EMA when the run kept one and generator.gpt.use_ema),
refuses a tokenizer other than the one the GPT was trained on, and draws each sample's codes
with the KV-cache sampler (vqlc.gen.samplers.autoregressive) from that sample's own key.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vqlc import checkpoint, config_io, parallel, rundir, storage
from vqlc.data import encoded
from vqlc.gen import generator, gpt_train
from vqlc.gen.samplers import autoregressive


def settings(config) -> dict:
    """The sampler's keyword arguments from config.generator.gpt (0 = off)."""
    g = config.generator.gpt
    interval = (g.cfg_start, g.cfg_end) if g.cfg_end > 0 else None
    return {"temperature": float(g.temperature), "top_k": int(g.top_k) or None,
            "top_p": float(g.top_p) or None, "cfg_scale": float(g.cfg_scale) or None,
            "cfg_interval": interval}


def read_record(workdir: str) -> dict:
    path = rundir.join(workdir, gpt_train.GENERATOR_FILE)
    if not storage.exists(path):
        raise FileNotFoundError(f"{path!r} not found: is {workdir!r} a workdir of the gpt task "
                                "(python -m vqlc.main --config=gpt_demo ...)?")
    return storage.read_json(path)


class GPTGenerator(generator.Generator):
    space = "codes"

    def __init__(self, model, variables, record: dict, step: int, sampler: dict, workdir: str):
        self.model = model
        self.variables = variables
        self.record = record
        self.step = step
        self.sampler = sampler
        self.workdir = workdir
        self.grid = tuple(record["token_grid"])

    @classmethod
    def load(cls, config, workdir: str, *, tokenizer, mesh,
             step: int | None = None) -> "GPTGenerator":
        """The newest checkpoint of `workdir` (or `step`), read-only."""
        if not workdir:
            raise ValueError("config.generator.workdir is empty: set it to a gpt task workdir.")
        record = read_record(workdir)
        encoded.check_tokenizer(record["tokenizer"], tokenizer, f"The GPT in {workdir}")
        model = gpt_train.make_model(config_io.load(workdir), record["codebook_size"],
                                     record["num_codes"])
        sampler = settings(config)
        labels = jnp.zeros((1,), jnp.int32)
        codes = jnp.zeros((1, model.num_codes), jnp.int32)
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), labels, codes)["params"])
        field = "ema_params" if record["ema"] and config.generator.gpt.use_ema else "params"
        replicated = parallel.replicated(mesh)
        target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                             sharding=replicated), shapes)
        restored, step = checkpoint.restore_subtrees(rundir.checkpoints(workdir),
                                                     {field: target}, step)
        return cls(model, {"params": restored[field]}, record, step, sampler, workdir)

    def sample(self, variables, keys, labels):
        codes = autoregressive.sample(self.model, variables, keys, labels, **self.sampler)
        return codes.reshape(codes.shape[0], *self.grid)

    def identity(self) -> dict:
        interval = self.sampler["cfg_interval"]
        return {"kind": "gpt", "step": int(self.step), "network": self.record["network"],
                "ema": self.record["ema"],
                "sampler": {**self.sampler, "cfg_interval": None if interval is None
                            else [int(i) for i in interval]},
                "parameters": int(sum(np.prod(x.shape) for x in
                                      jax.tree.leaves(self.variables)))}
