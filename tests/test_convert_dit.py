"""vqlc.gen.convert_dit: a tiny DiT-LC / SiT-LC checkpoint in the release's layout
({"model", "ema", "opt", "args": argparse.Namespace}; tests/golden/make_dit_release_golden.py)
-> diffusion workdir, checked against the PyTorch reference's outputs for both weight sets, with
DiT's (DDPM t) and SiT's (flow t, first C channels) semantics, loaded through
DiffusionGenerator and sampled through the sample task, and its errors."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import test_convert, tiny_tokenizer
from vqlc import parallel, torch_files
from vqlc.gen import convert_dit, diffusion_train
from vqlc.gen.networks import dit

ROOT = test_convert.ROOT
GOLDEN = test_convert.GOLDEN
PT = os.path.join(GOLDEN, "dit_release_tiny.pt")
# The golden's geometry: depth 2, width 32, 4 heads ("DiT-Tiny/2" in its args), patch 2,
# 8x8x8 latents (the tiny tokenizer: 16 px, f2, dim 8), 10 classes, learn_sigma.
TINY_SIZE = (2, 32, 4)
NETWORK = {"network.size": "Tiny/2", "network.num_classes": 10}
CHANNELS = 8

# A config file for the CLI: it registers the test-only size in the converting process.
CONFIG_FILE = '''
from vqlc.gen import diffusion_train
from vqlc.gen.networks import dit

dit.SIZES.setdefault("Tiny", {size})


def get_config(arg=""):
    c = diffusion_train.base_config()
    c.network.kind = arg or "dit"
    c.objective.kind = "flow" if arg == "sit" else "ddpm"
    c.network.size = "Tiny/2"
    c.network.num_classes = 10
    c.train.num_steps = 5
    c.eval.at_end = False
    return c
'''.format(size=TINY_SIZE)


@pytest.fixture(autouse=True, scope="module")
def tiny_size():
    """vqlc's DiT sizes are named; the golden's is registered for these tests only."""
    dit.SIZES["Tiny"] = TINY_SIZE
    yield
    del dit.SIZES["Tiny"]


def dit_config(kind="dit", **overrides):
    c = diffusion_train.base_config()
    flat = {**NETWORK, "network.kind": kind, "objective.kind": "flow" if kind == "sit" else "ddpm",
            "train.num_steps": 5, "eval.at_end": False, **overrides}
    c.update_from_flattened_dict(flat)
    return c


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(os.path.join(GOLDEN, "dit_release_tiny.npz")))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return tiny_tokenizer.make_workdir(str(tmp_path_factory.mktemp("tok") / "run"))


def sample_config(tok_dir, workdir, **overrides):
    from vqlc.configs import sample_demo
    c = sample_demo.get_config("tiny")
    c.update_from_flattened_dict({"tokenizer.workdir": tok_dir, "generator.kind": "diffusion",
                                  "generator.workdir": workdir, **overrides})
    return c


def load_generator(tok_dir, workdir, **overrides):
    from vqlc.gen.diffusion_generator import DiffusionGenerator
    from vqlc.tokenizer import Tokenizer
    return DiffusionGenerator.load(sample_config(tok_dir, workdir, **overrides), workdir,
                                   tokenizer=Tokenizer.load(tok_dir), mesh=parallel.make_mesh(1))


def outputs(gen, golden, objective):
    """The network's full output on the golden inputs, NCHW as the golden stores it."""
    x = jnp.asarray(golden["in/x"].transpose(0, 2, 3, 1))
    out = gen.denoiser(gen.variables, x, jnp.asarray(golden[f"in/t_{objective}"]),
                       jnp.asarray(golden["in/y"], jnp.int32))
    return np.asarray(out).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def converted(tok_dir, tmp_path_factory):
    """DiT workdirs of both weight sets and a SiT one, through the Python API."""
    root = tmp_path_factory.mktemp("dit_release")
    dirs = {}
    for kind, weights in (("dit", "ema"), ("dit", "model"), ("sit", "ema")):
        dst = str(root / f"{kind}_{weights}")
        convert_dit.convert_dit(dit_config(kind), PT, dst, tokenizer=tok_dir, weights=weights)
        dirs[kind, weights] = dst
    return dirs


@pytest.mark.parametrize("weights", ["ema", "model"])
def test_dit_outputs_match_pytorch(converted, tok_dir, golden, weights):
    workdir = converted["dit", weights]
    for use_ema in (True, False):  # params and ema_params both hold the converted set
        gen = load_generator(tok_dir, workdir, **{"generator.diffusion.use_ema": use_ema})
        out = outputs(gen, golden, "ddpm")
        want = golden[f"out/{weights}/ddpm"]
        assert out.shape == want.shape == (3, 2 * CHANNELS, 8, 8)
        assert float(np.max(np.abs(out - want))) < 1e-4
    assert gen.step == 5
    record = json.load(open(os.path.join(workdir, diffusion_train.GENERATOR_FILE)))
    assert record["latent_shape"] == [8, 8, CHANNELS]
    assert record["latent_stats"] == {"mean": 0.0, "std": 1.0}
    assert record["ema"] is True and record["network"]["learn_sigma"] is True
    assert record["release"]["weights"] == weights
    assert record["release"]["args"]["model"] == "DiT-Tiny/2"
    assert record["tokenizer"]["workdir"] == os.path.abspath(tok_dir)
    other = "model" if weights == "ema" else "ema"
    assert np.max(np.abs(out - golden[f"out/{other}/ddpm"])) > 1e-2  # the sets differ


def test_sit_velocity_matches_pytorch_and_samples(converted, tok_dir, golden):
    gen = load_generator(tok_dir, converted["sit", "ema"],
                         **{"generator.diffusion.kind": "euler",
                            "generator.diffusion.num_steps": 4,
                            "generator.diffusion.cfg_scale": 2.0})
    out = outputs(gen, golden, "flow")
    # SiT's forward returns the first C channels (the velocity at flow time t in [0, 1]).
    assert float(np.max(np.abs(out[:, :CHANNELS] - golden["out/ema/flow"][:, :CHANNELS]))) < 1e-4
    assert float(np.max(np.abs(out - golden["out/ema/flow"]))) < 1e-4  # the kept 2C head
    keys = jax.random.split(jax.random.key(0), 2)
    latents = np.asarray(gen.sample(gen.variables, keys, jnp.asarray([1, 9], jnp.int32)))
    assert latents.shape == (2, 8, 8, CHANNELS) and np.all(np.isfinite(latents))


def test_cli_end_to_end_and_the_sample_task(tok_dir, golden, tmp_path):
    from vqlc.gen import sample
    config_file = tmp_path / "dit_tiny_release.py"
    config_file.write_text(CONFIG_FILE)
    dst = str(tmp_path / "dit")
    cmd = [sys.executable, "-m", "vqlc.convert", f"--config={config_file}", f"--src={PT}",
           f"--dst={dst}", f"--tokenizer={tok_dir}", "--weights=model"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "generator.kind=diffusion" in run.stdout
    gen = load_generator(tok_dir, dst)
    assert float(np.max(np.abs(outputs(gen, golden, "ddpm") - golden["out/model/ddpm"]))) < 1e-4
    c = sample_config(tok_dir, dst, **{"sample.per_class": 1, "mesh.data": 1,
                                       "generator.diffusion.num_steps": 3,
                                       "generator.diffusion.cfg_scale": 1.5})
    sample.run(c, str(tmp_path / "samples"))
    with np.load(str(tmp_path / "samples" / "samples.npz")) as f:
        assert f["arr_0"].shape == (7, 16, 16, 3)
    # the same conversion again into the same workdir, and one without --tokenizer
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "already holds checkpoints" in again.stderr
    no_tok = [a for a in cmd if not a.startswith("--tokenizer")]
    no_tok[no_tok.index(f"--dst={dst}")] = f"--dst={tmp_path / 'x'}"
    missing = subprocess.run(no_tok, cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
    assert missing.returncode != 0 and "--tokenizer=<tokenizer workdir> is required" in \
        missing.stderr
    assert "Traceback" not in missing.stderr


@pytest.fixture(scope="module")
def release_ema():
    state_dict, args = convert_dit.read_dit_release(PT, "ema")
    return {k: v.load() for k, v in state_dict.items()}, args


def tiny_model(**network):
    c = dit_config(**network)
    return diffusion_train.make_model(c.network, c.model, (8, 8, CHANNELS))


def test_release_layout_is_read_lazily_with_its_args(release_ema):
    obj = torch_files.load_torch_object(PT, lazy=True)
    assert sorted(obj) == ["args", "ema", "model", "opt"]
    assert isinstance(obj["args"], torch_files.Opaque)
    assert obj["args"].qualname == "argparse.Namespace"
    assert isinstance(obj["ema"]["pos_embed"], torch_files.LazyTensor)
    state_dict, args = release_ema
    assert args["num_classes"] == 10 and args["latent_size"] == 8
    assert state_dict["final_layer.linear.weight"].shape == (2 * 2 * 2 * CHANNELS, 32)
    assert state_dict["y_embedder.embedding_table.weight"].shape == (11, 32)


def test_missing_key_is_named(release_ema):
    sd = {k: v for k, v in release_ema[0].items() if k != "blocks.1.mlp.fc2.weight"}
    with pytest.raises(ValueError, match=r"missing.*blocks_1/mlp/fc2/kernel"):
        convert_dit.release_to_params(sd, tiny_model())


def test_extra_key_is_named(release_ema):
    sd = {**release_ema[0], "blocks.0.attn.q_norm.weight": np.ones(8, np.float32)}
    with pytest.raises(ValueError, match=r"unexpected checkpoint keys.*blocks.0.attn.q_norm"):
        convert_dit.release_to_params(sd, tiny_model())
    sd = {**release_ema[0], "blocks.2.attn.qkv.weight": np.ones((96, 32), np.float32)}
    with pytest.raises(ValueError, match=r"(?s)unexpected.*blocks.2.attn.qkv.*has 3 blocks"):
        convert_dit.release_to_params(sd, tiny_model())


@pytest.mark.parametrize("network, message", [
    ({"network.num_classes": 12},
     r"(?s)embedding_table.weight \(11, 32\).*wants \(13, 32\).*12 classes \+ null"),
    ({"network.learn_sigma": False},
     r"(?s)final_layer.linear.weight \(64, 32\).*out_channels 16.*learn_sigma=False"),
    ({"network.size": "Tiny/1"}, r"(?s)x_embedder.proj.weight \(32, 8, 2, 2\).*patch_size 2"),
    ({"network.size": "S/2"}, r"(?s)missing.*blocks_11/.*checkpoint has 2 blocks.*depth 12"),
])
def test_wrong_geometry_is_explained(release_ema, network, message):
    with pytest.raises(ValueError, match=message):
        convert_dit.release_to_params(release_ema[0], tiny_model(**network))


def test_wrong_latents_and_pos_embed(release_ema):
    c = dit_config()
    model = diffusion_train.make_model(c.network, c.model, (16, 16, CHANNELS))
    with pytest.raises(ValueError, match=r"pos_embed \(1, 16, 32\).*8x8 tokens.*input_size 16"):
        convert_dit.release_to_params(release_ema[0], model)
    model = diffusion_train.make_model(c.network, c.model, (8, 8, 4))
    with pytest.raises(ValueError,
                       match=r"(?s)x_embedder.proj.weight \(32, 8, 2, 2\).*in_channels 4"):
        convert_dit.release_to_params(release_ema[0], model)
    learned = dict(release_ema[0])
    learned["pos_embed"] = learned["pos_embed"] + 0.01
    with pytest.raises(ValueError, match="pos_embed differs from DiT's 2-D sin-cos table"):
        convert_dit.release_to_params(learned, tiny_model())


def test_config_and_file_errors(tok_dir, tmp_path):
    with pytest.raises(ValueError, match=r"--tokenizer=<tokenizer workdir> is required"):
        convert_dit.convert_dit(dit_config(), PT, str(tmp_path / "a"), tokenizer=None)
    for other in ("gpt_release_tiny.pt", "release_tiny.pth"):
        with pytest.raises(ValueError, match="not a DiT/SiT checkpoint"):
            convert_dit.convert_dit(dit_config(), os.path.join(GOLDEN, other),
                                    str(tmp_path / "b"), tokenizer=tok_dir)
    with pytest.raises(FileNotFoundError, match="dit-lc-100K-f16.pth"):
        convert_dit.read_dit_release(str(tmp_path / "none.pt"))
    with pytest.raises(ValueError, match="--weights='opt'"):
        convert_dit.read_dit_release(PT, "opt")
    with pytest.raises(ValueError, match="objective.kind='flow'"):
        convert_dit.convert_dit(dit_config("sit", **{"objective.kind": "ddpm"}), PT,
                                str(tmp_path / "c"), tokenizer=tok_dir)
    with pytest.raises(ValueError, match="latent_norm=none"):
        convert_dit.check_dit_config(dit_config(**{"objective.latent_norm": "channel"}), {})
    with pytest.raises(ValueError, match="network.size=XL/2"):
        convert_dit.check_dit_config(dit_config(), {"model": "DiT-XL/2"})
    with pytest.raises(ValueError, match="objective.prediction=noise"):
        convert_dit.check_dit_config(dit_config("sit"), {"path_type": "Linear",
                                                         "prediction": "noise"})
    with pytest.raises(ValueError, match="path_type='VP'"):
        convert_dit.check_dit_config(dit_config("sit"), {"path_type": "VP"})


def test_unet_configs_go_to_the_ldm_converter(tmp_path, capsys):
    """network.kind=unet converts LDM-LC checkpoints (vqlc.gen.convert_ldm, tests/
    test_convert_ldm.py): a DiT file given to it is refused as not an LDM checkpoint."""
    from vqlc import convert
    config_file = tmp_path / "unet.py"
    config_file.write_text(CONFIG_FILE)
    cmd = [f"--config={config_file}:unet", f"--src={PT}", f"--dst={tmp_path / 'ldm'}",
           f"--tokenizer={tmp_path / 'tok'}"]
    with pytest.raises(SystemExit):
        convert.main(cmd)
    assert "not a latent-diffusion Lightning checkpoint" in capsys.readouterr().err
