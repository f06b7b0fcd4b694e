"""`from vqlc import Generator` on a tiny DiT and SiT: it finds its tokenizer, draws what the
`sample` task draws for the same labels, seed and sampler, its latents snap to the codes it
decodes, and `denoiser` is the network's raw output."""
import json
import os

import jax
import numpy as np
import pytest

from tests import tiny_tokenizer
from vqlc import parallel
from vqlc.configs import dit_demo, sample_demo, sit_demo
from vqlc.gen import diffusion_train, sample

SAMPLER = {"kind": "ddim", "num_steps": 4, "cfg_scale": 2.0}  # the sample run's settings


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny tokenizer, a DiT and a SiT trained a few steps on its latents, and a sample run
    of the DiT."""
    tok_dir = tiny_tokenizer.make_workdir(str(tmp_path_factory.mktemp("tok") / "run"))
    latents = tiny_tokenizer.make_tokens(tok_dir, str(tmp_path_factory.mktemp("enc") / "lat"),
                                         what="latents")
    dirs = {"tok": tok_dir}
    for name, module in (("dit", dit_demo), ("sit", sit_demo)):
        c = module.get_config("tiny")
        c.update_from_flattened_dict({"tokenizer.workdir": tok_dir, "data.tokens": latents,
                                      "mesh.data": 1, "eval.at_end": False,
                                      # enough steps that the zero-initialised head moves
                                      "train.num_steps": 12, "optim.lr": 2e-3})
        dirs[name] = str(tmp_path_factory.mktemp(name) / "run")
        diffusion_train.run(c, dirs[name])
    c = sample_demo.get_config("tiny")
    c.update_from_flattened_dict({
        "tokenizer.workdir": tok_dir, "generator.kind": "diffusion",
        "generator.workdir": dirs["dit"], "sample.per_class": 1, "mesh.data": 1,
        **{f"generator.diffusion.{k}": v for k, v in SAMPLER.items()}})
    dirs["samples"] = str(tmp_path_factory.mktemp("samples") / "run")
    sample.run(c, dirs["samples"])
    dirs["seed"] = c.sample.seed
    return dirs


@pytest.fixture(scope="module")
def dit(run):
    from vqlc import Generator
    return Generator.load(run["dit"])


def _sample_run(run):
    with np.load(os.path.join(run["samples"], "samples.npz")) as f:
        return f["arr_0"], f["arr_1"]


def test_load_finds_the_tokenizer_and_reads_a_diffusion_workdir(dit, run):
    from vqlc.gen import loaded
    assert isinstance(dit, loaded.LatentGenerator)
    assert dit.tokenizer.workdir == os.path.abspath(run["tok"])
    assert dit.step == 12 and dit.latent_shape == (8, 8, 8) and dit.objective == "ddpm"
    identity = dit.identity()
    assert identity["kind"] == "diffusion" and "sampler" not in identity


def test_sample_equals_the_sample_tasks_images(dit, run):
    images, labels = _sample_run(run)
    np.testing.assert_array_equal(dit.sample(labels, seed=run["seed"], **SAMPLER), images)
    # sample i depends on its key and label only: a prefix of the batch is a prefix of the run
    np.testing.assert_array_equal(dit.sample(labels[:3], seed=run["seed"], **SAMPLER),
                                  images[:3])
    assert not np.array_equal(dit.sample(labels, seed=run["seed"] + 1, **SAMPLER), images)


def test_latents_snap_to_the_codes_that_decode_to_the_images(dit, run):
    labels = np.array([0, 4, 6])
    latents = dit.sample_latents(labels, seed=3, **SAMPLER)
    assert latents.shape == (3, 8, 8, 8) and latents.dtype == np.float32
    codes = dit.sample_codes(labels, seed=3, **SAMPLER)
    np.testing.assert_array_equal(codes, _snap(dit.tokenizer, latents))
    images = dit.sample(labels, seed=3, **SAMPLER)
    np.testing.assert_array_equal(images, dit.tokenizer.decode_latents(latents))
    np.testing.assert_array_equal(images, dit.tokenizer.decode(codes))


def _snap(tok, latents):
    from vqlc import tokenizer as tokenizer_lib
    return np.asarray(jax.jit(tokenizer_lib.snap_fn(tok.model))(tok.variables, latents))


def test_a_batch_split_over_devices_draws_the_same_samples(dit, run):
    from vqlc import Generator
    images, labels = _sample_run(run)
    split = Generator.load(run["dit"], mesh=parallel.make_mesh(4))
    np.testing.assert_array_equal(split.sample(labels[:5], seed=run["seed"], **SAMPLER),
                                  images[:5])


def test_denoiser_is_the_networks_raw_output(dit, run):
    x = np.random.default_rng(0).normal(size=(3, 8, 8, 8)).astype(np.float32)
    labels = np.array([0, 6, 7])  # 7 = the null class: a valid label
    out = dit.denoiser(x, np.array([0, 500, 999]), labels)
    assert out.shape == (3, 8, 8, 16)  # DiT: epsilon, then the learned-variance half
    expected = dit.model.apply(dit.variables, x, np.array([0., 500., 999.], np.float32),
                               labels)
    np.testing.assert_allclose(out, np.asarray(expected), rtol=1e-5, atol=1e-5)
    # a scalar t is every sample's
    np.testing.assert_allclose(dit.denoiser(x, 500, labels)[1], out[1], rtol=1e-5, atol=1e-5)


def test_sit_samples_with_its_ode_and_keeps_the_dit_head(run):
    from vqlc import Generator
    sit = Generator.load(run["sit"])
    assert sit.objective == "flow"
    out = sit.denoiser(np.zeros((2, 8, 8, 8), np.float32), 0.5, np.array([1, 7]))
    assert out.shape == (2, 8, 8, 16)  # the release's SiT keeps DiT's 2C head
    a = sit.sample_latents(np.array([1, 2]), seed=0, kind="heun", num_steps=3)
    b = sit.sample_latents(np.array([1, 2]), seed=0, kind="euler", num_steps=3)
    assert np.isfinite(a).all() and not np.allclose(a, b)


def test_bad_inputs_fail_clearly(dit, run):
    from vqlc.gen import loaded
    with pytest.raises(ValueError, match="Labels must lie in"):
        dit.sample(np.array([8]))
    with pytest.raises(TypeError, match="Unknown sampler settings \\['top_k'\\]"):
        dit.sample(np.array([0]), top_k=3)
    with pytest.raises(ValueError, match="does not sample a ddpm model"):
        dit.sample(np.array([0]), kind="dopri5")
    with pytest.raises(ValueError, match="Expected latents"):
        dit.denoiser(np.zeros((1, 4, 4, 8)), 0, np.array([0]))
    with pytest.raises(ValueError, match="of kind 'diffusion'; TokenGenerator.load reads: gpt"):
        loaded.TokenGenerator.load(run["dit"])
    with open(os.path.join(run["dit"], diffusion_train.GENERATOR_FILE)) as f:
        assert json.load(f)["kind"] == "diffusion"
