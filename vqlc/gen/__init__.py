"""Generators over the tokenizer's codes (GPT) or latents (LDM / DiT / SiT), and the `sample`
task they share. See generator.py for the interface every generator implements."""
from vqlc.gen.generator import GENERATORS, Generator, resolve

__all__ = ["GENERATORS", "Generator", "resolve"]
