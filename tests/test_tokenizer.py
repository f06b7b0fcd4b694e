"""Tokenizer.load is read-only, restores only what inference needs, and runs on a mesh."""
import hashlib
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import tiny_tokenizer
from vqlc import Tokenizer, parallel, tokenizer


def _tree_digest(root: str) -> dict:
    out = {}
    for d, _, files in os.walk(root):
        for name in files:
            path = os.path.join(d, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = (hashlib.sha256(f.read()).hexdigest(),
                                                    os.stat(path).st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tiny_tokenizer.make_workdir(str(tmp_path_factory.mktemp("tok") / "run"))


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)


def test_load_writes_nothing(workdir, images):
    before = _tree_digest(workdir)
    tok = Tokenizer.load(workdir)
    tok.decode(tok.encode(images))
    assert _tree_digest(workdir) == before
    assert tok.step == tiny_tokenizer.STEP
    assert tok.identity() == {"workdir": os.path.abspath(workdir), "step": tiny_tokenizer.STEP,
                              "config_hash": tokenizer.config_hash(tok.config)}


def test_mesh_of_four_devices_gives_the_codes_of_one(workdir, images):
    one = Tokenizer.load(workdir)
    four = Tokenizer.load(workdir, mesh=parallel.make_mesh(4))
    codes = one.encode(images)  # 6 images: padded to 8 on the mesh of 4
    assert codes.shape == (6, 8, 8) and codes.dtype == np.int32
    np.testing.assert_array_equal(four.encode(images), codes)
    np.testing.assert_array_equal(four.decode(codes), one.decode(codes))
    np.testing.assert_allclose(four.encode_latents(images), one.encode_latents(images),
                               atol=1e-5)
    assert len(np.unique(codes)) > 1  # not a degenerate map
    # The LC codebook split over a model axis of 2: each device holds half of it.
    split = Tokenizer.load(workdir, mesh=parallel.make_mesh(2, model=2))
    codebook = split.frozen_codebook()
    assert {s.data.shape[0] for s in codebook.addressable_shards} == {codebook.shape[0] // 2}
    np.testing.assert_array_equal(split.encode(images), codes)
    np.testing.assert_array_equal(split.decode(codes), one.decode(codes))


def test_pure_functions_match_and_compose_inside_a_jit(workdir, images):
    tok = Tokenizer.load(workdir)
    x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0

    @jax.jit
    def round_trip(variables, x):  # as a generator's train step would use them
        z = tokenizer.encode_latents_fn(tok.model)(variables, x)
        codes = tokenizer.encode_fn(tok.model)(variables, x)
        return codes, tokenizer.decode_fn(tok.model)(variables, codes), \
            tokenizer.decode_latents_fn(tok.model)(variables, z)

    codes, from_codes, from_latents = round_trip(tok.variables, x)
    np.testing.assert_array_equal(np.asarray(codes), tok.encode(images))
    # Snapping a latent to its nearest code and decoding gives exactly decode(encode(x)).
    np.testing.assert_array_equal(np.asarray(from_codes), np.asarray(from_latents))
    np.testing.assert_array_equal(tok.decode_latents(tok.encode_latents(images)),
                                  tok.decode(tok.encode(images)))


def test_only_inference_state_is_restored(workdir, tmp_path, images):
    """A different discriminator or optimiser in config.json does not matter for inference:
    only the generator's parameters (and EMA statistics) are read."""
    import json
    copy = str(tmp_path / "copy")
    shutil.copytree(workdir, copy)
    with open(os.path.join(copy, "config.json")) as f:
        config = json.load(f)
    config["disc"]["ndf"] *= 2
    config["optim"]["b1"] = 0.9
    with open(os.path.join(copy, "config.json"), "w") as f:
        json.dump(config, f)
    np.testing.assert_array_equal(Tokenizer.load(copy).encode(images),
                                  Tokenizer.load(workdir).encode(images))


def test_missing_pieces_are_clear_errors(workdir, tmp_path):
    copy = str(tmp_path / "copy")
    shutil.copytree(workdir, copy)
    with pytest.raises(FileNotFoundError, match="step 99"):
        Tokenizer.load(copy, step=99)
    os.remove(os.path.join(copy, "codebook.npy"))
    with pytest.raises(FileNotFoundError, match="frozen codebook"):
        Tokenizer.load(copy)
    assert not os.path.exists(os.path.join(copy, "codebook.npy"))  # never rebuilt
    with pytest.raises(FileNotFoundError, match="config.json"):
        Tokenizer.load(str(tmp_path / "nothing"))
    shutil.rmtree(os.path.join(copy, "checkpoints"))
    shutil.copy(os.path.join(workdir, "codebook.npy"), copy)
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        Tokenizer.load(copy)


@pytest.mark.parametrize("kind", ["vq", "ema"])
def test_other_quantizers_load(tmp_path, images, kind):
    workdir = tiny_tokenizer.make_workdir(str(tmp_path / kind), **{"quantizer.kind": kind})
    tok = Tokenizer.load(workdir)
    assert tok.decode(tok.encode(images)).shape == images.shape
