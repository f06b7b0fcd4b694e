"""The interface every generator implements, and the registry the `sample` task reads.

A generator draws token maps for class labels, in the space of one tokenizer:

    gen = resolve(config.generator.kind).load(config, config.generator.workdir,
                                              tokenizer=tok, mesh=mesh)
    out = gen.sample(gen.variables, keys, labels)   # pure, jittable

- ``space``: ``"codes"`` (``sample`` returns int32 code ids [B, h, w], e.g. GPT) or
  ``"latents"`` (float32 pre-quantisation latents [B, h, w, dim], e.g. LDM / DiT / SiT; the
  sampler snaps them to the nearest code before decoding, as the release does).
- ``sample(variables, keys, labels)``: ``keys`` holds ONE key per sample (a [B] key array) and
  ``labels`` int32 [B]. Sample i must depend only on ``keys[i]``, ``labels[i]`` and the
  variables (vmap over the batch, or draw each sample's noise from its own key), never on
  the batch it shares: the `sample` task gives sample i the key fold_in(key(seed), i), so
  the images are the same for any batch size, device count or process count.
- ``variables``: the pytree ``sample`` reads (network parameters, EMA weights, ...), already
  placed (replicated or sharded) on the mesh ``load`` was given.
- ``load(config, workdir, *, tokenizer, mesh)``: restore from a training workdir, read-only.
  A trained generator records which tokenizer it was trained on and refuses another
  (compare ``tokenizer.identity()``).
- ``identity()``: what samples.json records about the generator.

``GENERATORS`` maps a ``config.generator.kind`` to ``"module:Class"``, imported only when
chosen (``resolve``).
"""
from __future__ import annotations

import importlib

SPACES = ("codes", "latents")

GENERATORS = {
    # The tokenizer's own codes (or latents) of real images of the requested classes: the
    # toy for tests and a sanity baseline (its FID is the tokenizer's reconstruction FID).
    "replay": "vqlc.gen.replay:Replay",
    # A GPT trained by the `gpt` task (vqlc.gen.gpt_train), sampled with its KV cache.
    "gpt": "vqlc.gen.gpt_generator:GPTGenerator",
    # A DiT / SiT trained by the `diffusion` task (vqlc.gen.diffusion_train): latents.
    "diffusion": "vqlc.gen.diffusion_generator:DiffusionGenerator",
}


class Generator:
    """Base class: subclasses set ``space`` and implement ``load`` and ``sample``."""

    space: str = "codes"
    variables = None

    @classmethod
    def load(cls, config, workdir: str, *, tokenizer, mesh) -> "Generator":
        raise NotImplementedError

    def sample(self, variables, keys, labels):
        raise NotImplementedError

    def identity(self) -> dict:
        return {"kind": type(self).__name__}


def resolve(kind: str) -> type:
    """The generator class registered as `kind` (imported now)."""
    if kind not in GENERATORS:
        raise ValueError(f"config.generator.kind={kind!r} is unknown; valid: "
                         f"{', '.join(sorted(GENERATORS))}.")
    module, name = GENERATORS[kind].split(":")
    cls = getattr(importlib.import_module(module), name)
    if cls.space not in SPACES:
        raise TypeError(f"{GENERATORS[kind]}.space={cls.space!r}; must be one of {SPACES}.")
    return cls
