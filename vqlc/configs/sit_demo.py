"""A small SiT on the demo tokenizer's latents, conditioned on which photograph a crop comes from.

    python -m vqlc.main --config=default --workdir=runs/demo              # the tokenizer
    python -m vqlc.main --config=sit_demo --workdir=runs/sit_demo \\
        --config.tokenizer.workdir=runs/demo

The DiT backbone of vqlc/configs/dit_demo.py trained with SiT's objective (linear interpolant,
velocity prediction, t = 1 is data), sampled with the adaptive dopri5 ODE solver (SiT's
default, atol 1e-6, rtol 1e-3), then scored as the DiT demo is.
`:tiny` is the seconds-long version the tests run.
"""
from vqlc import config_base
from vqlc.configs import dit_demo


def get_config(arg: str = ""):
    c = dit_demo.get_config()
    c.network.kind = "sit"
    c.objective.kind = "flow"
    c.objective.interpolant = "linear"
    c.objective.prediction = "velocity"
    c.eval.sampler.kind = "dopri5"
    c.eval.sampler.num_steps = 0
    return config_base.apply_named_variants(c, arg, {"tiny": _tiny})


def _tiny(c):
    c = dit_demo.tiny(c)
    c.eval.sampler.kind = "euler"
    c.eval.sampler.num_steps = 10
    return c
