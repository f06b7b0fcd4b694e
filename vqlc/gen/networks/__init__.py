"""Generator networks (GPT, ...): Flax Linen modules, no training logic."""
