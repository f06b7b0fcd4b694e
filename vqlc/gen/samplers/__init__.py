"""Samplers: draw token maps or latents from a trained generator network."""
