"""The `gpt` task on a tiny tokenizer's tokens: the loss goes down, a resumed run equals an
uninterrupted one bit for bit, and bad settings fail before any work."""
import json
import os

import jax
import numpy as np
import pytest

from tests import tiny_tokenizer
from vqlc import checkpoint, rundir
from vqlc.configs import gpt_demo
from vqlc.gen import gpt_train, trainer
from vqlc.train import reporting


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    tok_dir = tiny_tokenizer.make_workdir(str(tmp_path_factory.mktemp("tok") / "run"))
    tokens = tiny_tokenizer.make_tokens(tok_dir, str(tmp_path_factory.mktemp("enc") / "tokens"))
    return tok_dir, tokens


def _config(dirs, **overrides):
    c = gpt_demo.get_config("tiny")
    c.update_from_flattened_dict({"tokenizer.workdir": dirs[0], "data.tokens": dirs[1],
                                  "mesh.data": 1, "eval.at_end": False, **overrides})
    return c


def _params(workdir):
    steps = checkpoint.completed_steps(rundir.checkpoints(workdir))
    shapes = jax.eval_shape(lambda: _model_params(workdir))
    restored, _ = checkpoint.restore_subtrees(rundir.checkpoints(workdir),
                                              {"params": shapes}, steps[-1])
    return restored["params"]


def _model_params(workdir):
    with open(os.path.join(workdir, gpt_train.GENERATOR_FILE)) as f:
        record = json.load(f)
    from vqlc import config_io
    model = gpt_train.make_model(config_io.load(workdir), record["codebook_size"],
                                 record["num_codes"])
    return model.init(jax.random.key(0), np.zeros((1,), np.int32),
                      np.zeros((1, model.num_codes), np.int32))["params"]


def test_loss_goes_down_and_the_run_is_recorded(dirs, tmp_path):
    workdir = str(tmp_path / "gpt")
    results = gpt_train.run(_config(dirs), workdir)
    losses = [r["loss"] for r in reporting.read_metrics(workdir)]
    assert len(losses) == 6 and results["step"] == 60
    assert losses[-1] < 0.8 * losses[0], losses
    with open(os.path.join(workdir, gpt_train.GENERATOR_FILE)) as f:
        record = json.load(f)
    assert record["codebook_size"] == 32 and record["num_codes"] == 64
    assert record["tokenizer"]["config_hash"]


def test_resumed_run_equals_an_uninterrupted_one(dirs, tmp_path):
    common = {"optim.schedule": "constant", "optim.warmup_steps": 0, "train.log_every": 2,
              "objective.pkeep": 0.8}
    gpt_train.run(_config(dirs, **common, **{"train.num_steps": 6}), str(tmp_path / "one"))
    gpt_train.run(_config(dirs, **common, **{"train.num_steps": 3}), str(tmp_path / "two"))
    gpt_train.run(_config(dirs, **common, **{"train.num_steps": 6}), str(tmp_path / "two"))
    a, b = _params(str(tmp_path / "one")), _params(str(tmp_path / "two"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_on_the_fly_tokens_train_and_resume_exactly(dirs, tmp_path):
    """data.tokens='on_the_fly': the loss goes down on freshly encoded crops, a resumed run
    draws the same crops (the image pipeline's state is in the checkpoint), and the batches are
    the tokenizer's codes of the pipeline's labelled crops."""
    fly = {"data.tokens": "on_the_fly", "optim.schedule": "constant", "train.log_every": 5}
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    gpt_train.run(_config(dirs, **fly, **{"train.num_steps": 40}), one)
    losses = [r["loss"] for r in reporting.read_metrics(one)]
    assert losses[-1] < 0.8 * losses[0], losses
    with open(os.path.join(one, gpt_train.GENERATOR_FILE)) as f:
        record = json.load(f)
    assert record["tokens"] == "on_the_fly" and record["num_codes"] == 64

    gpt_train.run(_config(dirs, **fly, **{"train.num_steps": 20}), two)
    gpt_train.run(_config(dirs, **fly, **{"train.num_steps": 40}), two)
    for x, y in zip(jax.tree.leaves(_params(one)), jax.tree.leaves(_params(two))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    from vqlc import encode_task
    from vqlc.data import pipeline
    from vqlc.gen import token_data
    from vqlc.tokenizer import Tokenizer
    tok = Tokenizer.load(dirs[0])
    data = encode_task.data_config(_config(dirs).data.encode, tok.image_size)
    images = next(iter(pipeline.labelled_train_dataset(data, batch_size=4, seed=3)))
    batch = next(token_data.make_encoding_iterator(tok, data, num_classes=7, batch_size=4,
                                                   seed=3))
    np.testing.assert_array_equal(batch["codes"], tok.encode(images["image"]))
    np.testing.assert_array_equal(batch["label"], images["label"])
    assert len(set(images["label"].tolist())) > 1  # labelled: the source photographs
    with pytest.raises(ValueError, match="network.num_classes=2"):
        next(token_data.make_encoding_iterator(tok, data, num_classes=2, batch_size=16, seed=3))


@pytest.mark.parametrize("overrides, message", [
    ({"network.kind": "gpt5"}, "network.kind='gpt5'"),
    ({"objective.pkeep": 0.0}, "objective.pkeep=0.0"),
    ({"network.kind": "llamagen", "objective.pkeep": 0.8}, "llamagen trains on clean"),
    ({"optim.schedule": "step"}, "optim.schedule='step'"),
    ({"network.num_classes": 2}, "network.num_classes=2"),
    ({"network.num_classes": 9, "eval.at_end": True, "train.num_steps": 1},
     "fewer than eval.per_class=2 images of classes \\[7, 8\\]"),
])
def test_bad_settings_fail_clearly(dirs, tmp_path, overrides, message):
    workdir = tmp_path / "bad"
    with pytest.raises((ValueError, NotImplementedError), match=message.replace("(", r"\(")):
        gpt_train.run(_config(dirs, **overrides), str(workdir))
    assert not (workdir / "checkpoints").exists()


def test_sample_task_draws_from_a_trained_gpt(dirs, tmp_path):
    from vqlc.configs import sample_demo
    from vqlc.gen import sample
    workdir = str(tmp_path / "gpt")
    gpt_train.run(_config(dirs, **{"train.num_steps": 10}), workdir)
    c = sample_demo.get_config("tiny")
    c.update_from_flattened_dict({"tokenizer.workdir": dirs[0], "generator.kind": "gpt",
                                  "generator.workdir": workdir, "sample.per_class": 2,
                                  "generator.gpt.top_k": 8, "mesh.data": 1})
    out = str(tmp_path / "samples")
    sample.run(c, out)
    again = str(tmp_path / "again")
    c.sample.batch_size = 4  # another batch size: the same samples
    sample.run(c, again)
    with np.load(os.path.join(out, "samples.npz")) as a, \
            np.load(os.path.join(again, "samples.npz")) as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])  # the images
        assert a["arr_0"].shape == (14, 16, 16, 3)
    with open(os.path.join(out, "samples.json")) as f:
        record = json.load(f)
    assert record["generator"]["kind"] == "gpt" and record["generator"]["step"] == 10
    assert record["token_shape"] == [8, 8] and record["codes_used"] >= 2


def test_a_gpt_refuses_another_tokenizer(dirs, tmp_path):
    from vqlc import parallel
    from vqlc.configs import sample_demo
    from vqlc.gen.gpt_generator import GPTGenerator
    from vqlc.tokenizer import Tokenizer
    workdir = str(tmp_path / "gpt")
    gpt_train.run(_config(dirs, **{"train.num_steps": 2}), workdir)
    other = tiny_tokenizer.make_workdir(str(tmp_path / "other_tok"))
    c = sample_demo.get_config("tiny")
    with pytest.raises(ValueError, match="not by the expected tokenizer"):
        GPTGenerator.load(c, workdir, tokenizer=Tokenizer.load(other),
                          mesh=parallel.make_mesh(1))


def test_one_command_encodes_trains_samples_and_scores(dirs, tmp_path):
    workdir = tmp_path / "gpt"
    results = gpt_train.run(_config(dirs, **{"data.tokens": "", "eval.at_end": True,
                                             "train.num_steps": 10}), str(workdir))
    assert (workdir / "tokens" / "manifest.json").exists()
    with open(workdir / "eval" / "metrics.json") as f:
        metrics = json.load(f)
    assert (workdir / "eval" / "samples.png").exists()
    assert metrics["num_samples"] == 14 and metrics["num_reference"] == 14  # 7 classes x 2
    assert metrics["sample_utilization"] == metrics["codes_used"] / 32 > 0
    with np.load(workdir / "eval" / "reference.npz") as ref:
        assert ref["arr_0"].shape == (14, 16, 16, 3)
        assert np.bincount(ref["arr_1"]).tolist() == [2] * 7
    if metrics["gfid"] is None:  # no Inception weights on this machine
        assert "not computed" in metrics["gfid_protocol"]
    else:
        assert metrics["gfid"] > 0 and results["gfid"] == metrics["gfid"]


def test_sharded_parameters_train_like_replicated_ones(dirs, tmp_path):
    common = {"train.num_steps": 4, "train.log_every": 2, "mesh.data": 4,
              "optim.schedule": "constant"}
    gpt_train.run(_config(dirs, **common), str(tmp_path / "replicated"))
    gpt_train.run(_config(dirs, **common, **{"mesh.shard_params": True}),
                  str(tmp_path / "sharded"))
    a, b = _params(str(tmp_path / "replicated")), _params(str(tmp_path / "sharded"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_shard_params_splits_the_large_arrays_over_the_devices():
    from vqlc import parallel
    c = gpt_demo.get_config("tiny")
    c.network.width, c.network.num_layers = 128, 1
    model = gpt_train.make_model(c, 32, 64)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1,), np.int32),
                                               np.zeros((1, 64), np.int32))["params"])
    tx = trainer.make_optimizer(c.optim, 10, params)
    state = gpt_train.init_state(model, tx, seed=0, ema=True, mesh=parallel.make_mesh(4),
                                 shard_params=True)
    fc = state.params["blocks_0"]["mlp"]["fc"]["kernel"]  # [128, 512]
    mu = state.opt_state[0].mu["blocks_0"]["mlp"]["fc"]["kernel"]
    for x in (fc, mu, state.ema_params["blocks_0"]["mlp"]["fc"]["kernel"]):
        assert x.addressable_shards[0].data.size == x.size // 4
    assert state.params["ln_f"]["scale"].sharding.is_fully_replicated  # small: stays whole
