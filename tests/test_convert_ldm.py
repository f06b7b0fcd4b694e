"""vqlc.gen.convert_ldm: a tiny LDM-LC checkpoint in the release's Lightning layout
(tests/golden/make_ldm_release_golden.py: state_dict with model.diffusion_model.*, LitEma's
model_ema.*, the schedule buffers, cond_stage_model.embedding.weight and the tokenizer under
first_stage_model.*; optimizer_states beside it) -> diffusion workdir (+ <dst>/tokenizer),
through the command line with and without --tokenizer, checked against our PyTorch UNet's
outputs for both weight sets, loaded with vqlc.Generator and sampled with DDIM; and its
errors."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests import test_convert, tiny_tokenizer
from vqlc import convert, rundir, torch_files
from vqlc.gen import convert_ldm, diffusion_train
from vqlc.gen.networks import unet

ROOT = test_convert.ROOT
GOLDEN = test_convert.GOLDEN
CKPT = os.path.join(GOLDEN, "ldm_release_tiny.ckpt")
# The golden's UNet (make_ldm_release_golden.TINY), registered as a test-only size; its
# latents are 8x8x4: release_tiny's tokenizer (test_convert's geometry: 16 px, f2, dim 4).
TINY_UNET = dict(model_channels=32, channel_mult=(1,), num_res_blocks=1,
                 attention_resolutions=(), num_head_channels=32, transformer_depth=1,
                 context_dim=8)
CLASSES, CHANNELS = 5, 4
NETWORK = {"network.size": "LdmTiny", "network.num_classes": CLASSES, "train.num_steps": 5,
           "eval.at_end": False}

CONFIG_FILE = '''
from vqlc.configs import ldm_lc_imagenet
from vqlc.gen.networks import unet

unet.VARIANTS.setdefault("LdmTiny", {unet!r})


def get_config(arg=""):
    c = ldm_lc_imagenet.get_config()
    c.update_from_flattened_dict({network!r})
    return c
'''.format(unet=TINY_UNET, network=NETWORK)

# The tokenizer config of first_stage_model.* for --tokenizer_config (a config file).
TOKENIZER_CONFIG_FILE = '''
from tests import test_convert, tiny_tokenizer


def get_config(arg=""):
    return test_convert._config()
'''


@pytest.fixture(autouse=True, scope="module")
def tiny_size():
    unet.VARIANTS["LdmTiny"] = TINY_UNET
    yield
    del unet.VARIANTS["LdmTiny"]


def ldm_config(**overrides):
    from vqlc.configs import ldm_lc_imagenet
    c = ldm_lc_imagenet.get_config()
    c.update_from_flattened_dict({**NETWORK, **overrides})
    return c


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(os.path.join(GOLDEN, "ldm_release_tiny.npz")))


def _cli(tmp, *args):
    config_file = tmp / "ldm_tiny_release.py"
    config_file.write_text(CONFIG_FILE)
    cmd = [sys.executable, "-m", "vqlc.convert", f"--config={config_file}", f"--src={CKPT}",
           *args]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The command line twice: the ema weights with the tokenizer from first_stage_model.*,
    then the model weights over that tokenizer (--tokenizer)."""
    tmp = tmp_path_factory.mktemp("ldm_release")
    tok_config = tmp / "tiny_tokenizer.py"
    tok_config.write_text(TOKENIZER_CONFIG_FILE)
    ema = str(tmp / "ema")
    run = _cli(tmp, f"--dst={ema}", f"--tokenizer_config={tok_config}")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "generator.kind=diffusion" in run.stdout and "ema weights" in run.stdout
    tok_dir = os.path.join(ema, convert_ldm.TOKENIZER_SUBDIR)
    model = str(tmp / "model")
    run = _cli(tmp, f"--dst={model}", f"--tokenizer={tok_dir}", "--weights=model")
    assert run.returncode == 0, run.stderr[-3000:]
    return {"ema": ema, "model": model, "tokenizer": tok_dir, "tmp": tmp}


def outputs(gen, golden):
    out = gen.denoiser(golden["in/x"].transpose(0, 2, 3, 1), golden["in/t"], golden["in/y"])
    return np.asarray(out).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("weights", ["ema", "model"])
def test_outputs_match_pytorch_and_sample(converted, golden, weights):
    from vqlc import Generator
    workdir = converted[weights]
    for use_ema in (True, False):  # params and ema_params both hold the converted set
        gen = Generator.load(workdir, use_ema=use_ema)
        out = outputs(gen, golden)
        assert out.shape == golden[f"out/{weights}/eps"].shape == (3, CHANNELS, 8, 8)
        assert float(np.max(np.abs(out - golden[f"out/{weights}/eps"]))) < 1e-4
    other = "model" if weights == "ema" else "ema"
    assert float(np.max(np.abs(out - golden[f"out/{other}/eps"]))) > 1e-2  # the sets differ
    images = gen.sample(np.array([0, CLASSES - 1, CLASSES]), seed=0, kind="ddim", num_steps=2,
                        cfg_scale=1.5)
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8
    record = json.load(open(os.path.join(workdir, diffusion_train.GENERATOR_FILE)))
    assert record["latent_shape"] == [8, 8, CHANNELS]
    assert record["latent_stats"] == {"mean": 0.0, "std": 1.0}
    assert record["tokenizer"]["workdir"] == os.path.abspath(converted["tokenizer"])
    release = record["release"]
    assert release["weights"] == weights and release["global_step"] == 10
    assert release["tokenizer"] == ("first_stage_model.*" if weights == "ema"
                                    else os.path.abspath(converted["tokenizer"]))
    assert set(release["skipped"]) == set(convert_ldm.SCHEDULE_BUFFERS) | set(
        convert_ldm.EMA_BUFFERS)
    assert os.path.isdir(os.path.join(converted["ema"], convert_ldm.TOKENIZER_SUBDIR))
    assert not os.path.exists(os.path.join(converted["model"], convert_ldm.TOKENIZER_SUBDIR))


def test_tokenizer_written_from_first_stage(converted):
    """first_stage_model.* (ldm-lc's VQModelInterface: the tokenizer release's keys without
    discriminator and LPIPS) converts with vqlc.convert's own mapping."""
    from vqlc.tokenizer import Tokenizer
    state_dict, _ = convert_ldm.read_ldm_release(CKPT)
    first = {k: v.load() for k, v in convert_ldm.split_ldm_release(state_dict)
             ["first_stage"].items()}
    assert not any(k.startswith(("discriminator.", "perceptual_loss.")) for k in first)
    variables = convert.release_to_variables(first, test_convert._config(),
                                             require_discriminator=False)
    tok = Tokenizer.load(converted["tokenizer"])
    np.testing.assert_array_equal(np.load(rundir.codebook(converted["tokenizer"])),
                                  variables["codebook"])
    got = jax.tree.leaves(jax.device_get(tok.variables["params"]))
    want = jax.tree.leaves(variables["g_params"])
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    images = np.random.default_rng(0).integers(0, 256, (1, 16, 16, 3), np.uint8)
    assert tok.encode_latents(images).shape == (1, 8, 8, CHANNELS)


def test_cli_refuses_a_second_conversion_and_other_files(converted):
    tmp = converted["tmp"]
    again = _cli(tmp, f"--dst={converted['model']}", f"--tokenizer={converted['tokenizer']}")
    assert again.returncode != 0 and "already holds checkpoints" in again.stderr
    dit = subprocess.run(
        [sys.executable, "-m", "vqlc.convert", f"--config={tmp / 'ldm_tiny_release.py'}",
         f"--src={os.path.join(GOLDEN, 'dit_release_tiny.pt')}", f"--dst={tmp / 'x'}",
         f"--tokenizer={converted['tokenizer']}"],
        cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT},
        capture_output=True, text=True, timeout=300)
    assert dit.returncode != 0 and "not a latent-diffusion Lightning checkpoint" in dit.stderr
    assert "Traceback" not in dit.stderr


# ------------------------------------------------------------------------------------- errors

@pytest.fixture(scope="module")
def parts():
    state_dict, meta = convert_ldm.read_ldm_release(CKPT)
    assert meta == {"epoch": 0, "global_step": 10}
    return convert_ldm.split_ldm_release(state_dict)


def tiny_model(**network):
    c = ldm_config(**network)
    return diffusion_train.make_model(c.network, c.model, (8, 8, CHANNELS))


def test_lightning_layout_is_read_lazily(parts):
    obj = torch_files.load_torch_object(CKPT, lazy=True)
    assert {"epoch", "global_step", "state_dict", "optimizer_states",
            "lr_schedulers"} <= set(obj)
    moments = torch_files.flatten_arrays(obj["optimizer_states"])
    assert moments and all(isinstance(v, torch_files.LazyTensor) for v in moments.values())
    assert isinstance(parts["unet"][convert_ldm.UNET_PREFIX + "out.2.weight"],
                      torch_files.LazyTensor)
    ema_key = "model_ema.diffusion_modelinput_blocks00weight"  # LitEma: dots removed
    assert ema_key in parts["ema"]
    assert not set(convert_ldm.EMA_BUFFERS) & set(parts["ema"])
    assert set(parts["cond"]) == {"cond_stage_model.embedding.weight"}
    assert parts["cond"]["cond_stage_model.embedding.weight"].shape == (CLASSES + 1, 8)
    assert set(parts["schedule"]) == set(convert_ldm.SCHEDULE_BUFFERS)
    assert "encoder.conv_in.weight" in parts["first_stage"]
    # the class table is taken from cond_stage_model for both weight sets
    flat = {w: convert_ldm.release_to_params(parts, tiny_model(), ema=w == "ema")
            for w in ("ema", "model")}
    table = ("cond_stage_model", "embedding", "embedding")
    np.testing.assert_array_equal(flat["ema"][table], flat["model"][table])
    assert np.max(np.abs(flat["ema"][("out_2", "kernel")] - flat["model"][("out_2", "kernel")])) > 0


def _without(part, key, parts):
    return {**parts, part: {k: v for k, v in parts[part].items() if k != key}}


def test_missing_key_is_named(parts):
    key = convert_ldm.UNET_PREFIX + "middle_block.1.proj_out.weight"
    with pytest.raises(ValueError, match=r"missing.*middle_block_1/proj_out/kernel"):
        convert_ldm.release_to_params(_without("unet", key, parts), tiny_model(), ema=False)
    with pytest.raises(ValueError, match=r"missing EMA copies.*model_ema.diffusion_modelout2bias"):
        convert_ldm.release_to_params(
            _without("ema", "model_ema.diffusion_modelout2bias", parts), tiny_model())
    with pytest.raises(ValueError, match=r"no model_ema.\* weights.*--weights=model"):
        convert_ldm.release_to_params({**parts, "ema": {}}, tiny_model())
    with pytest.raises(ValueError, match=r"missing.*cond_stage_model/embedding/embedding"):
        convert_ldm.release_to_params({**parts, "cond": {}}, tiny_model(), ema=False)
    with pytest.raises(ValueError, match=r"lacks the schedule buffers \['posterior_variance'\]"):
        convert_ldm.check_schedule(_without("schedule", "posterior_variance", parts)["schedule"],
                                   "linear_sqrt")


def test_extra_key_is_named(parts):
    extra = np.zeros((32,), np.float32)
    key = convert_ldm.UNET_PREFIX + "input_blocks.1.1.norm.weight"  # attention it does not have
    with pytest.raises(ValueError, match=r"unexpected checkpoint keys.*input_blocks.1.1.norm"):
        convert_ldm.release_to_params({**parts, "unet": {**parts["unet"], key: extra}},
                                      tiny_model(), ema=False)
    with pytest.raises(ValueError, match=r"unexpected checkpoint keys.*model_ema.stray"):
        convert_ldm.release_to_params({**parts, "ema": {**parts["ema"], "model_ema.stray": extra}},
                                      tiny_model())
    with pytest.raises(ValueError, match=r"not part of LDM-LC's LatentDiffusion: \['logvar'\]"):
        convert_ldm.split_ldm_release({"logvar": extra, convert_ldm.UNET_PREFIX + "x.bias": extra})


@pytest.mark.parametrize("network, message", [
    ({"network.num_classes": 7},
     r"(?s)embedding.weight \(6, 8\).*wants \(8, 8\).*class table \(6, 8\).*7 classes \+ null"),
    ({"network.size": "Ti"}, r"(?s)shapes that disagree.*model_channels 32.*"
                             r"channel_mult \(1, 2\)"),
])
def test_wrong_geometry_is_explained(parts, network, message):
    with pytest.raises(ValueError, match=message):
        convert_ldm.release_to_params(parts, tiny_model(**network), ema=False)


def test_wrong_latents_and_ema_shapes(parts):
    c = ldm_config()
    model = diffusion_train.make_model(c.network, c.model, (8, 8, 8))
    with pytest.raises(ValueError, match=r"(?s)input_blocks.0.0.weight \(32, 4, 3, 3\).*"
                                         r"in_channels 4.*in_channels 8"):
        convert_ldm.release_to_params(parts, model)
    key = "model_ema.diffusion_modelout2bias"
    bad = {**parts, "ema": {**parts["ema"], key: np.zeros((3,), np.float32)}}
    with pytest.raises(ValueError, match=r"model_ema.diffusion_modelout2bias \(3,\) \(the EMA"):
        convert_ldm.release_to_params(bad, tiny_model())


def test_wrong_schedule(parts):
    assert convert_ldm.check_schedule(parts["schedule"], "linear_sqrt") == sorted(
        convert_ldm.SCHEDULE_BUFFERS)
    with pytest.raises(ValueError, match=r"(?s)not objective.schedule='linear'.*betas \(.*"
                                         r"match objective.schedule='linear_sqrt'"):
        convert_ldm.check_schedule(parts["schedule"], "linear")
    other = convert_ldm.ldm_schedule_buffers(
        np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2)  # Stable Diffusion's range
    with pytest.raises(ValueError, match=r"(?s)betas \(max.*run 0.00085 .. 0.012 over 1000.*"
                                         r"cannot represent it"):
        convert_ldm.check_schedule({k: np.float32(v) for k, v in other.items()}, "linear_sqrt")
    scaled = {**parts["schedule"], "scale_factor": np.float32(0.18215)}
    with pytest.raises(ValueError, match="scale_factor=0.18215"):
        convert_ldm.check_schedule(scaled, "linear_sqrt")


def test_not_ldm_files_and_config_errors(tmp_path):
    for other, message in (("dit_release_tiny.pt", "no `state_dict` entry"),
                           ("gpt_release_tiny.pt", "no `state_dict` entry"),
                           ("release_tiny.pth", r"no model.diffusion_model.\* keys")):
        with pytest.raises(ValueError, match=message):
            convert_ldm.convert_ldm(ldm_config(), os.path.join(GOLDEN, other),
                                    str(tmp_path / "a"), tokenizer_config=test_convert._config())
    with pytest.raises(FileNotFoundError, match="Lightning checkpoints of ldm-lc"):
        convert_ldm.read_ldm_release(str(tmp_path / "none.ckpt"))
    with pytest.raises(ValueError, match="--weights='opt'"):
        convert_ldm.convert_ldm(ldm_config(), CKPT, str(tmp_path / "b"), weights="opt")
    with pytest.raises(ValueError, match="network.kind='dit'"):
        convert_ldm.convert_ldm(ldm_config(**{"network.kind": "dit"}), CKPT, str(tmp_path / "c"))
    with pytest.raises(ValueError, match="latent_norm=none"):
        convert_ldm.check_ldm_config(ldm_config(**{"objective.latent_norm": "channel"}))
    # a tokenizer config that does not fit first_stage_model.*: nothing is written
    with pytest.raises(ValueError, match=r"first_stage_model.\* \(the tokenizer\) does not "
                                         r"convert.*--tokenizer_config"):
        convert_ldm.convert_ldm(ldm_config(), CKPT, str(tmp_path / "d"),
                                tokenizer_config=test_convert._config(**{"model.ch": "64"}))
    # a UNet that does not fit is found before the tokenizer is written
    with pytest.raises(ValueError, match=r"does not match the config"):
        convert_ldm.convert_ldm(ldm_config(**{"network.num_classes": 3}), CKPT,
                                str(tmp_path / "e"), tokenizer_config=test_convert._config())
    assert not os.path.exists(tmp_path / "e" / convert_ldm.TOKENIZER_SUBDIR)


def test_a_given_tokenizer_must_have_the_first_stages_latents(tmp_path):
    tok_dir = tiny_tokenizer.make_workdir(str(tmp_path / "tok"))  # 8-channel latents
    with pytest.raises(ValueError, match=r"8-channel latents.*quant_conv.weight \(4, 32, 1, 1\)\)"
                                         r" has embed_dim 4"):
        convert_ldm.convert_ldm(ldm_config(), CKPT, str(tmp_path / "ldm"), tokenizer=tok_dir)
