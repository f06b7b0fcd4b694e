"""vqlc.convert: a tiny checkpoint in the authors' release format -> workdir -> Tokenizer, checked
against the PyTorch model's own indices and reconstructions (tests/golden/make_release_golden.py)."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqlc import convert
from vqlc.models import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden")
PTH = os.path.join(GOLDEN, "release_tiny.pth")

# The golden model's geometry, on top of configs/default.py:tiny.
OVERRIDES = {
    "model.ch": "32", "model.ch_mult": "(1,1)", "model.num_res_blocks": "1",
    "model.attn_resolutions": "(8,)", "model.z_channels": "32",
    "quantizer.codebook_size": "64", "quantizer.dim": "4", "codebook.feature_dim": "16",
    "disc.ndf": "8", "data.image_size": "16",
}


def _run_cli(*args):
    cmd = [sys.executable, "-m", "vqlc.convert", "--config=configs/default.py:tiny", *args]
    cmd += [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _config(**extra):
    from vqlc.configs import default
    c = default.get_config("tiny")
    for key, value in {**OVERRIDES, **extra}.items():
        section, field = key.split(".")
        c[section][field] = eval(value) if value.startswith("(") else type(c[section][field])(value)
    return c


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(os.path.join(GOLDEN, "release_tiny.npz")))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Runs the command line once: python -m vqlc.convert ... --dst <tmp>."""
    dst = str(tmp_path_factory.mktemp("release") / "workdir")
    run = _run_cli(f"--src={PTH}", f"--dst={dst}", "--step=7")
    assert run.returncode == 0, run.stderr[-3000:]
    return dst


def test_tokenizer_matches_pytorch_release_model(converted, golden):
    from vqlc import Tokenizer
    assert golden["min_gap"] > 1e-4  # every golden argmin is unambiguous in float32
    tok = Tokenizer.load(converted)
    assert tok.step == 7 and tok.codebook_size == 64
    images = golden["in/images"]
    np.testing.assert_allclose(tok.encode_latents(images), golden["out/latents"], atol=1e-5)
    indices = tok.encode(images)
    np.testing.assert_array_equal(indices, golden["out/indices"])
    assert len(np.unique(indices)) >= 30  # many distinct codes: the projector and codebook matter
    # Float reconstructions: quantised forward pass and decoding of the golden indices.
    x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
    recon = tok.model.apply(tok.variables, x, train=False)[0]
    np.testing.assert_allclose(np.asarray(recon), golden["out/recon"], atol=1e-4)
    dec = tok.model.apply(tok.variables, jnp.asarray(golden["out/indices"]),
                          method=type(tok.model).decode_code)
    np.testing.assert_allclose(np.asarray(dec), golden["out/decode_code"], atol=1e-4)
    expected_u8 = np.clip(np.round((golden["out/decode_code"] + 1) * 127.5), 0, 255)
    assert np.abs(tok.decode(indices).astype(int) - expected_u8).max() <= 1


def test_workdir_codebook_and_discriminator(converted, golden):
    from vqlc import checkpoint, config_io
    from vqlc.torch_files import load_torch_file
    sd = load_torch_file(PTH)
    np.testing.assert_array_equal(np.load(os.path.join(converted, "codebook.npy")),
                                  sd["tok_embeddings.weight"])
    config = config_io.load(converted)
    assert config.codebook.build == "" and config.quantizer.codebook_size == 64
    # The discriminator (params and BatchNorm running stats) reproduces the release's, eval mode.
    from vqlc import parallel
    from vqlc.train import optim
    from vqlc.train.state import init_train_state
    tx = optim.make_optimizer(config.optim, config.train.num_steps)
    disc = build.discriminator_from_config(config)
    template, _ = jax.eval_shape(lambda: init_train_state(
        build.tokenizer_from_config(config), disc, tx, tx, image_size=16, seed=0,
        mesh=parallel.make_mesh(1)))
    state, step = checkpoint.restore_state_only(os.path.join(converted, "checkpoints"), template)
    assert step == 7 and int(state.step) == 7
    x = jnp.asarray(golden["in/images"], jnp.float32) / 127.5 - 1.0
    out = disc.apply({"params": state.d_params, "batch_stats": state.d_batch_stats}, x,
                     train=False)
    np.testing.assert_allclose(np.asarray(out), golden["out/disc_eval"], atol=1e-4)


def test_read_codebook_formats(tmp_path):
    from vqlc.torch_files import load_torch_file
    codes = load_torch_file(PTH)["tok_embeddings.weight"]
    np.testing.assert_array_equal(convert.read_codebook(PTH), codes)  # from a state_dict
    bare = os.path.join(GOLDEN, "release_tiny_codebook.pth")  # a bare tensor, as codebook-100K.pth
    np.testing.assert_array_equal(convert.read_codebook(bare), codes)
    np.save(tmp_path / "cb.npy", codes.astype(np.float64))
    out = convert.read_codebook(str(tmp_path / "cb.npy"))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, codes)
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        convert.read_codebook(str(tmp_path / "nothere.pth"))


def test_codebook_from_flag_when_missing_from_checkpoint():
    sd = convert.read_release_state_dict(PTH)
    codes = sd.pop("tok_embeddings.weight")
    with pytest.raises(ValueError, match=r"tok_embeddings.weight.*--codebook"):
        convert.release_to_variables(sd, _config())
    out = convert.release_to_variables(sd, _config(), codebook=codes)
    np.testing.assert_array_equal(out["codebook"], codes)
    np.testing.assert_array_equal(out["g_params"]["quantizer"]["projector"]["kernel"],
                                  sd["codebook_projection.weight"].T)


def test_ddp_prefix_and_unknown_keys(monkeypatch):
    sd = convert.read_release_state_dict(PTH)
    # Keys saved from a DistributedDataParallel wrapper carry "module.": stripped.
    monkeypatch.setattr(convert.torch_files, "load_torch_file",
                        lambda path: {"module." + k: v for k, v in sd.items()})
    assert set(convert.read_release_state_dict("any.pth")) == set(sd)
    monkeypatch.undo()
    parts = convert.split_release_state_dict(sd)
    assert "perceptual_loss.scaling_layer.shift" not in parts["generator"]
    assert set(parts["codebook"]) == {"tok_embeddings.weight"}
    with pytest.raises(ValueError, match="embed_avg.*EMA"):
        convert.split_release_state_dict({**sd, "embed_avg": np.zeros((64, 16))})


def test_errors_name_the_problem(tmp_path):
    sd = convert.read_release_state_dict(PTH)
    # A missing key is named.
    broken = {k: v for k, v in sd.items() if k != "decoder.conv_out.bias"}
    with pytest.raises(ValueError, match="missing.*decoder/conv_out/bias"):
        convert.release_to_variables(broken, _config())
    # Codebook size differs from the config: says which flag to set.
    with pytest.raises(ValueError, match=r"\(64, 16\).*\(32, 16\).*codebook_size"):
        convert.release_to_variables(sd, _config(**{"quantizer.codebook_size": "32"}))
    # embed_dim differs: the projector/quant_conv shapes are reported with their torch keys.
    with pytest.raises(ValueError, match=r"(?s)shape mismatch.*codebook_projection.weight.*"
                                         r"checkpoint has 2 resolution levels \(f2\), embed_dim 4"):
        convert.release_to_variables(sd, _config(**{"quantizer.dim": "8"}))
    with pytest.raises(ValueError, match="quantizer.kind=lc"):
        convert.release_to_variables(sd, _config(**{"quantizer.kind": "vq"}))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        convert.convert(_config(), str(tmp_path / "missing.pth"), str(tmp_path / "out"))


def test_cli_errors_are_messages(converted, tmp_path):
    run = _run_cli(f"--src={tmp_path / 'absent.pth'}", f"--dst={tmp_path / 'out'}")
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert "vqlc.convert: Checkpoint not found" in run.stderr and "absent.pth" in run.stderr
    # An existing converted workdir is never overwritten.
    run = _run_cli(f"--src={PTH}", f"--dst={converted}")
    assert run.returncode != 0 and "already holds checkpoints" in run.stderr
