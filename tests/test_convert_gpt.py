"""vqlc.gen.convert_gpt: a tiny GPT-LC checkpoint in the release's layout (taming's minGPT,
float16, tokenizer under vqgan.*; tests/golden/make_gpt_release_golden.py) -> gpt workdir, checked
against the PyTorch model's logits, and loaded and sampled through GPTGenerator."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import test_convert
from vqlc import convert, parallel, rundir
from vqlc.gen import convert_gpt, gpt_train

ROOT = test_convert.ROOT
GOLDEN = test_convert.GOLDEN
PT = os.path.join(GOLDEN, "gpt_release_tiny.pt")
DEEPSPEED = os.path.join(GOLDEN, "gpt_release_tiny_deepspeed.pt")
# The golden GPT's geometry (64 codes of the f2 tokenizer of test_convert, 4 classes).
NETWORK = {"network.num_layers": 2, "network.num_heads": 2, "network.width": 32,
           "network.num_classes": 4}


def gpt_config(**overrides):
    c = gpt_train.base_config()
    c.update_from_flattened_dict({**NETWORK, "train.num_steps": 5, **overrides})
    return c


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(os.path.join(GOLDEN, "gpt_release_tiny.npz")))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The Python API on the full checkpoint: GPT workdir + <dst>/tokenizer from vqgan.*."""
    dst = str(tmp_path_factory.mktemp("gpt_release") / "workdir")
    convert_gpt.convert_gpt(gpt_config(), PT, dst, tokenizer_config=test_convert._config())
    return dst


def load_generator(workdir, tokenizer_dir):
    from vqlc.configs import sample_demo
    from vqlc.gen.gpt_generator import GPTGenerator
    from vqlc.tokenizer import Tokenizer
    c = sample_demo.get_config("tiny")
    c.generator.gpt.top_k = 8
    return GPTGenerator.load(c, workdir, tokenizer=Tokenizer.load(tokenizer_dir),
                             mesh=parallel.make_mesh(1))


def logits_of(gen, golden):
    return np.asarray(gen.model.apply(gen.variables, jnp.asarray(golden["in/labels"]),
                                      jnp.asarray(golden["in/codes"])))


def test_logits_match_pytorch_and_samples(converted, golden):
    gen = load_generator(converted, os.path.join(converted, convert_gpt.TOKENIZER_SUBDIR))
    logits = logits_of(gen, golden)
    want = golden["out/logits"]
    assert logits.shape == want.shape == (2, 64, 68)
    diff = float(np.max(np.abs(logits - want)))
    assert diff < 1e-4, diff
    assert gen.step == 5
    keys = jax.random.split(jax.random.key(0), 3)
    codes = np.asarray(gen.sample(gen.variables, keys, jnp.asarray([0, 1, 3])))
    assert codes.shape == (3, 8, 8) and codes.min() >= 0 and codes.max() < 64


def test_tokenizer_written_from_vqgan_keys(converted):
    from vqlc.tokenizer import Tokenizer
    tok_dir = os.path.join(converted, convert_gpt.TOKENIZER_SUBDIR)
    release = convert.read_codebook(os.path.join(GOLDEN, "release_tiny_codebook.pth"))
    codebook = np.load(rundir.codebook(tok_dir))
    np.testing.assert_array_equal(codebook, release.astype(np.float16).astype(np.float32))
    tok = Tokenizer.load(tok_dir)
    assert tok.codebook_size == 64
    images = np.random.default_rng(0).integers(0, 256, (1, 16, 16, 3), np.uint8)
    assert tok.encode(images).shape == (1, 8, 8)


def test_cli_deepspeed_layout_with_given_tokenizer(converted, golden, tmp_path):
    tok_dir = os.path.join(converted, convert_gpt.TOKENIZER_SUBDIR)
    dst = str(tmp_path / "from_deepspeed")
    cmd = [sys.executable, "-m", "vqlc.convert", "--config=configs/gpt_demo.py",
           f"--src={DEEPSPEED}", f"--dst={dst}", f"--tokenizer={tok_dir}",
           "--config.train.num_steps=5", "--config.eval.at_end=False"]
    cmd += [f"--config.{k}={v}" for k, v in NETWORK.items()]
    run = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    gen = load_generator(dst, tok_dir)
    assert float(np.max(np.abs(logits_of(gen, golden) - golden["out/logits"]))) < 1e-4
    assert not os.path.exists(os.path.join(dst, convert_gpt.TOKENIZER_SUBDIR))
    # a second conversion into the same workdir is refused
    again = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                           capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "already holds checkpoints" in again.stderr


@pytest.fixture(scope="module")
def release_gpt():
    gpt, _ = convert_gpt.split_gpt_release(convert_gpt.read_gpt_release(PT))
    return gpt


def tiny_model(**network):
    return gpt_train.make_model(gpt_config(**network), 64, 64)


def test_missing_key_is_named(release_gpt):
    gpt = {k: v for k, v in release_gpt.items() if k != "blocks.1.mlp.2.weight"}
    with pytest.raises(ValueError, match=r"missing.*blocks_1/mlp/proj/kernel"):
        convert_gpt.release_to_params(gpt, tiny_model())


def test_extra_key_is_named(release_gpt):
    gpt = {**release_gpt, "blocks.0.attn.rotary.weight": np.zeros((2,), np.float16)}
    with pytest.raises(ValueError, match=r"unexpected.*transformer.blocks.0.attn.rotary"):
        convert_gpt.release_to_params(gpt, tiny_model())
    with pytest.raises(ValueError, match=r"neither transformer.\* nor vqgan.*'ema.decay'"):
        convert_gpt.split_gpt_release({"transformer.pos_emb": np.zeros(1), "ema.decay": 1})


@pytest.mark.parametrize("network, message", [
    ({"network.num_layers": 3}, r"(?s)missing.*blocks_2/.*checkpoint has 2 layers.*num_layers=3"),
    ({"network.width": 64, "network.num_heads": 2},
     r"(?s)shapes that disagree.*tok_emb.weight \(68, 32\).*network.width=64"),
    ({"network.num_classes": 5},
     r"(?s)tok_emb.weight \(68, 32\).*vocab 69 \(codebook_size 64 \+ 5"),
])
def test_wrong_geometry_is_explained(release_gpt, network, message):
    with pytest.raises(ValueError, match=message):
        convert_gpt.release_to_params(release_gpt, tiny_model(**network))


def test_wrong_block_size_and_missing_tokenizer(release_gpt, tmp_path):
    model = gpt_train.make_model(gpt_config(), 64, 16)  # a 4x4 token map: block_size 17
    with pytest.raises(ValueError, match=r"(?s)pos_emb \(1, 65, 32\).*block_size 17"):
        convert_gpt.release_to_params(release_gpt, model)
    with pytest.raises(ValueError, match="no vqgan.* keys: pass --tokenizer"):
        convert_gpt.convert_gpt(gpt_config(), DEEPSPEED, str(tmp_path / "x"),
                                tokenizer_config=test_convert._config())
    with pytest.raises(ValueError, match="network.kind=mingpt"):
        convert_gpt.convert_gpt(gpt_config(**{"network.kind": "llamagen"}), PT,
                                str(tmp_path / "y"))
