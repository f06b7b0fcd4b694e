"""A tiny tokenizer workdir for tests of what consumes one: randomly initialised weights (a
trained tokenizer is not needed to check plumbing), a fixed random LC codebook, config.json and
one orbax checkpoint, in exactly the layout a training run leaves."""
import os

import numpy as np

from vqlc.configs import default as default_config
from vqlc import checkpoint, config_io, parallel

STEP = 3


def tiny_config(**overrides):
    c = default_config.get_config("tiny")
    c.update_from_flattened_dict({"codebook.build": "", **overrides})
    return c


def make_workdir(path: str, **overrides) -> str:
    """Writes a tokenizer workdir at `path` (made if missing) and returns it."""
    from vqlc.train import trainer
    os.makedirs(path, exist_ok=True)
    config = tiny_config(**overrides)
    if config.quantizer.kind == "lc":
        codes = np.random.default_rng(0).normal(
            size=(config.quantizer.codebook_size, config.codebook.feature_dim)).astype(np.float32)
        config.codebook.path = os.path.join(path, "source_codebook.npy")
        np.save(config.codebook.path, codes)
    config_io.write_or_check(config, path)
    *_, state, _ = trainer.setup_model(config, path, parallel.make_mesh(1))
    manager = checkpoint.make_manager(path, keep=1)
    checkpoint.save(manager, STEP, state.replace(step=state.step + STEP), force=True)
    manager.close()
    return path


def make_tokens(tok_dir: str, path: str, num_images: int = 32, what: str = "codes") -> str:
    """Encodes `num_images` demo crops (codes or latents, each with its mirror image) through
    the tokenizer at `tok_dir` into an encode workdir at `path`; returns it."""
    from vqlc import encode_task
    from vqlc.configs import encode_demo
    c = encode_demo.get_config("tiny")
    c.update_from_flattened_dict({"tokenizer.workdir": tok_dir, "encode.max_images": num_images,
                                  "encode.images_per_shard": 16, "encode.batch_size": 8,
                                  "encode.what": what})
    encode_task.run(c, path)
    return path
