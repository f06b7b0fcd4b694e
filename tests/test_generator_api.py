"""`from vqlc import Generator` on a tiny GPT: it finds its tokenizer, draws what the `sample`
task draws for the same labels and seed, and its logits are the ones the sampler decodes."""
import json
import os

import numpy as np
import pytest

from tests import tiny_tokenizer
from vqlc import parallel
from vqlc.configs import gpt_demo, sample_demo
from vqlc.gen import gpt_train, sample

SAMPLER = {"top_k": 8}  # the sample run's generator.gpt.top_k


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny tokenizer, a GPT trained 10 steps on its tokens, and a sample run of that GPT."""
    tok_dir = tiny_tokenizer.make_workdir(str(tmp_path_factory.mktemp("tok") / "run"))
    tokens = tiny_tokenizer.make_tokens(tok_dir, str(tmp_path_factory.mktemp("enc") / "tokens"))
    c = gpt_demo.get_config("tiny")
    c.update_from_flattened_dict({"tokenizer.workdir": tok_dir, "data.tokens": tokens,
                                  "mesh.data": 1, "eval.at_end": False,
                                  "train.num_steps": 10})
    gpt_dir = str(tmp_path_factory.mktemp("gpt") / "run")
    gpt_train.run(c, gpt_dir)
    c = sample_demo.get_config("tiny")
    c.update_from_flattened_dict({"tokenizer.workdir": tok_dir, "generator.kind": "gpt",
                                  "generator.workdir": gpt_dir, "sample.per_class": 2,
                                  "generator.gpt.top_k": SAMPLER["top_k"], "mesh.data": 1,
                                  "sample.progress_bar": False})
    samples = str(tmp_path_factory.mktemp("samples") / "run")
    sample.run(c, samples)
    return {"tok": tok_dir, "gpt": gpt_dir, "samples": samples, "seed": c.sample.seed}


@pytest.fixture(scope="module")
def gen(run):
    from vqlc import Generator
    return Generator.load(run["gpt"])


def _sample_run(run):
    """(images, labels, codes) the sample run wrote, in sample order."""
    with np.load(os.path.join(run["samples"], "samples.npz")) as f:
        images, labels = f["arr_0"], f["arr_1"]
    shard_dir = os.path.join(run["samples"], sample.SHARD_DIR)
    names = sorted(n for n in os.listdir(shard_dir) if n.endswith(".npz"))
    codes = np.concatenate([np.load(os.path.join(shard_dir, n))["codes"] for n in names])
    return images, labels, codes


def test_load_finds_the_tokenizer_it_was_trained_on(gen, run):
    assert gen.tokenizer.workdir == os.path.abspath(run["tok"])
    assert gen.tokenizer.step == tiny_tokenizer.STEP
    assert gen.step == 10 and gen.token_grid == (8, 8)
    assert gen.identity()["kind"] == "gpt"


def test_sample_equals_the_sample_tasks_images(gen, run):
    images, labels, codes = _sample_run(run)
    np.testing.assert_array_equal(gen.sample(labels, seed=run["seed"], **SAMPLER), images)
    np.testing.assert_array_equal(gen.sample_codes(labels, seed=run["seed"], **SAMPLER), codes)
    # sample i depends on i and its label only: a prefix of the batch is a prefix of the run
    np.testing.assert_array_equal(gen.sample(labels[:5], seed=run["seed"], **SAMPLER),
                                  images[:5])
    other = gen.sample_codes(labels, seed=run["seed"] + 1, **SAMPLER)
    assert not np.array_equal(other, codes)


def test_a_batch_split_over_devices_draws_the_same_samples(gen, run):
    from vqlc import Generator
    _, labels, codes = _sample_run(run)
    split = Generator.load(run["gpt"], mesh=parallel.make_mesh(4))
    # 5 rows on 4 devices: padded, and the padding dropped
    np.testing.assert_array_equal(split.sample_codes(labels[:5], seed=run["seed"], **SAMPLER),
                                  codes[:5])


def test_sample_codes_are_token_maps_of_the_tokenizer(gen):
    codes = gen.sample_codes(np.array([0, 3, 6]), seed=4)
    assert codes.shape == (3, 8, 8) and codes.dtype == np.int32
    assert codes.min() >= 0 and codes.max() < gen.tokenizer.codebook_size
    images = gen.sample(np.array([0, 3, 6]), seed=4)
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8


def test_greedy_codes_are_the_argmax_of_the_logits(gen):
    labels = np.array([1, 2, 5])
    codes = gen.sample_codes(labels, seed=0, temperature=0)
    logits = gen.logits(labels, codes)  # the full map: one prediction per code
    num_codes, size = 64, gen.tokenizer.codebook_size
    assert logits.shape == (3, num_codes, gen.vocab_size) and logits.dtype == np.float32
    assert gen.vocab_size == size + 7  # mingpt: the codes, then the class ids
    np.testing.assert_array_equal(logits[..., :size].argmax(-1), codes.reshape(3, -1))
    # a prefix of T codes: T + 1 predictions, the last one for the code after them
    prefix = gen.logits(labels, codes.reshape(3, -1)[:, :10])
    assert prefix.shape == (3, 11, gen.vocab_size)
    np.testing.assert_allclose(prefix, logits[:, :11], rtol=1e-5, atol=1e-5)
    assert gen.logits(labels, np.zeros((3, 0), np.int32)).shape == (3, 1, gen.vocab_size)


def test_bad_inputs_fail_clearly(gen):
    with pytest.raises(ValueError, match="Labels must lie in"):
        gen.sample_codes(np.array([7]))
    with pytest.raises(ValueError, match="the model holds 64"):
        gen.logits(np.array([0]), np.zeros((1, 65), np.int32))
    with pytest.raises(ValueError, match="Code ids must lie in"):
        gen.logits(np.array([0]), np.full((1, 8, 8), 32))


def test_another_tokenizer_is_refused(run, tmp_path):
    from vqlc import Generator, Tokenizer
    other = Tokenizer.load(tiny_tokenizer.make_workdir(str(tmp_path / "other_tok")))
    with pytest.raises(ValueError, match="not by the expected tokenizer"):
        Generator.load(run["gpt"], tokenizer=other)


def test_a_workdir_without_a_gpt_is_a_clear_error(run, tmp_path):
    from vqlc import Generator
    with pytest.raises(FileNotFoundError, match="is .* a generator workdir"):
        Generator.load(run["tok"])
    with open(os.path.join(run["gpt"], gpt_train.GENERATOR_FILE)) as f:
        record = json.load(f)
    with open(tmp_path / gpt_train.GENERATOR_FILE, "w") as f:
        json.dump({**record, "kind": "mystery"}, f)
    with pytest.raises(ValueError, match="of kind 'mystery'; Generator.load reads: gpt, diffusion"):
        Generator.load(str(tmp_path))
