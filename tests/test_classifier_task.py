"""The `classifier` task on a tiny tokenizer's token maps: every stem trains and is evaluated, the
loss goes down, a resumed run equals an uninterrupted one bit for bit, Classifier.load predicts
what the evaluation scored, MAE weights enter a fresh run (not a resumed one) through init.mae,
and bad settings fail first."""
import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from tests import tiny_tokenizer
from vqlc import checkpoint, encode_task, parallel, rundir
from vqlc.cls import convert_mae, inputs, recipe, train, vit
from vqlc.cls.loaded import Classifier
from vqlc.configs import classifier_demo
from vqlc.train import reporting

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


def _learnable(directory: str, seed: int) -> str:
    """Rewrites an encode workdir's codes in place so that the class shows in them: an
    untrained tokenizer maps every crop to one or two codes, which no classifier can tell
    apart. Each token is, with probability 0.6, one of four codes of its image's label, else
    any code. Manifest and shard layout stay the encode task's."""
    rng = np.random.default_rng(seed)
    shard_dir = os.path.join(directory, "shards")
    for name in sorted(os.listdir(shard_dir)):
        path = os.path.join(shard_dir, name)
        with np.load(path) as z:
            arrays = dict(z)
        labels = arrays["labels"][:, None, None]
        shape = arrays["codes"].shape
        own = labels * 4 + rng.integers(0, 4, shape)
        arrays["codes"] = np.where(rng.random(shape) < 0.6, own,
                                   rng.integers(0, 32, shape)).astype(np.int32)
        np.savez(path, **arrays)
    return directory


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny LC tokenizer, its training maps (held-out demo strips excluded) and eval maps."""
    root = tmp_path_factory.mktemp("cls")
    tok_dir = tiny_tokenizer.make_workdir(str(root / "tok"))
    c = classifier_demo.get_config("tiny")
    tokens = encode_task.encoded_workdir("", c.data.encode, tokenizer_workdir=tok_dir,
                                         mesh_data=1, directory=str(root / "tokens"))
    eval_tokens = encode_task.encoded_workdir("", c.data.eval_encode, tokenizer_workdir=tok_dir,
                                              mesh_data=1, directory=str(root / "eval_tokens"))
    return tok_dir, _learnable(tokens, 0), _learnable(eval_tokens, 1)


def _config(dirs, **overrides):
    c = classifier_demo.get_config("tiny")
    c.update_from_flattened_dict({"tokenizer.workdir": dirs[0], "data.tokens": dirs[1],
                                  "data.eval_tokens": dirs[2], "mesh.data": 1, **overrides})
    return c


def _metrics(workdir):
    with open(os.path.join(workdir, train.EVAL_DIR, "metrics.json")) as f:
        return json.load(f)


def test_held_out_strips_do_not_overlap_training_crops(dirs):
    from vqlc.data import sources
    trained = sources.DemoPhotos("train", photo_size=48, crop_size=16, holdout=0.4)
    held = sources.DemoPhotos("eval", photo_size=48, crop_size=16, holdout=0.4)
    for label, part in enumerate(trained._photos):
        strip = held._photos[label]
        assert part.shape[0] == strip.shape[0] and part.shape[1] + strip.shape[1] >= 48
    labels = [held[i]["label"] for i in range(len(held))]
    assert sorted(set(labels)) == list(range(7))
    with pytest.raises(ValueError, match="demo_holdout"):
        sources.DemoPhotos("eval", photo_size=48, crop_size=16, holdout=0.1)


@pytest.fixture(scope="module")
def trained(dirs, tmp_path_factory):
    # Without mixup and drop path the loss is a clean signal on fixed maps.
    workdir = str(tmp_path_factory.mktemp("trained") / "cls")
    results = train.run(_config(dirs, **{"mixup.prob": 0.0, "network.drop_path": 0.0,
                                         "optim.blr": 0.02}), workdir)
    return workdir, results


def test_training_lowers_the_loss_and_writes_the_evaluation(trained):
    workdir, results = trained
    losses = [r["loss"] for r in reporting.read_metrics(workdir)]
    assert results["step"] == 40 and len(losses) == 4
    assert losses[-1] < 0.8 * losses[0], losses
    metrics = _metrics(workdir)
    assert metrics["stem"] == "projected" and metrics["num_images"] == results["num_images"]
    assert metrics["num_images"] > 50
    assert 0.0 <= metrics["top1"] <= metrics["top5"] <= 100.0
    assert metrics["top1"] > 100.0 / 7, metrics  # above chance over the seven photographs
    with open(os.path.join(workdir, train.RECORD_FILE)) as f:
        record = json.load(f)
    assert record["grid_size"] == 8 and record["codebook_size"] == 32


@pytest.mark.parametrize("stem", ["embed", "pixels", "codebook"])
def test_every_stem_trains_and_evaluates(dirs, tmp_path, stem):
    workdir = str(tmp_path / stem)
    results = train.run(_config(dirs, **{"network.stem": stem, "train.num_steps": 4,
                                         "train.log_every": 2}), workdir)
    assert results["step"] == 4 and np.isfinite(results["loss"])
    assert _metrics(workdir)["stem"] == stem


def test_resumed_run_equals_an_uninterrupted_one(dirs, tmp_path):
    # min_lr = lr: a constant schedule, so a run that stops at 3 of 6 steps trains like one of
    # 6 (MAE's cosine depends on the total). Mixup, cutmix and drop path stay on.
    lr = 0.02 * 16 / 256
    common = {"optim.blr": 0.02, "optim.min_lr": lr, "optim.warmup_steps": 0,
              "train.log_every": 3, "train.checkpoint_every": 3, "eval.at_end": False}
    train.run(_config(dirs, **common, **{"train.num_steps": 6}), str(tmp_path / "one"))
    train.run(_config(dirs, **common, **{"train.num_steps": 3}), str(tmp_path / "two"))
    train.run(_config(dirs, **common, **{"train.num_steps": 6}), str(tmp_path / "two"))
    a, b = (Classifier.load(str(tmp_path / name)).params for name in ("one", "two"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    steps = checkpoint.completed_steps(rundir.checkpoints(str(tmp_path / "two")))
    assert steps[-1] == 6


def test_classifier_load_predicts_what_the_evaluation_scored(dirs, trained):
    workdir = trained[0]
    clf = Classifier.load(workdir)
    from vqlc.gen import token_data
    codes, labels = train.evaluation_maps(token_data.ImageCopies(dirs[2]))
    probs = clf.predict_codes(codes)
    assert probs.shape == (len(labels), 7) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    top1 = 100.0 * np.mean(probs.argmax(axis=1) == labels)
    assert top1 == pytest.approx(_metrics(workdir)["top1"], abs=1e-4)
    images = clf.tokenizer.decode(codes[:3])  # any uint8 images of the tokenizer's size
    np.testing.assert_allclose(clf.predict(images), clf.predict_codes(
        clf.tokenizer.encode(images)), rtol=1e-6)
    with pytest.raises(ValueError, match="16x16"):
        clf.predict(np.zeros((1, 20, 20, 3), np.uint8))
    with pytest.raises(ValueError, match="Code ids"):
        clf.predict_codes(np.full((1, 8, 8), 99, np.int32))


def test_mae_weights_enter_through_init_mae(dirs):
    """init.mae converts MAE's checkpoint into the fresh state (the golden tiny MAE: depth 2,
    width 48, 3 heads, patch 4, the `pixels` stem at 32 px)."""
    path = os.path.join(GOLDEN, "mae_tiny.pth")
    model = vit.ViT(grid_size=8, num_classes=5, depth=2, width=48, num_heads=3, patch_size=4,
                    stem="pixels")
    clf = inputs.TokenClassifier(model, None)
    c = _config(dirs, **{"init.mae": path})
    tx = recipe.make_optimizer(vit.param_shapes(model), 1e-3, depth=2)
    state = train.initial_state(clf, tx, c, parallel.make_mesh(1))
    expected, report = convert_mae.convert_mae_file(path, model, seed=c.seed)
    assert "blocks.1.attn.qkv.weight" in report["loaded"]
    for x, y in zip(jax.tree.leaves(expected), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_resumed_run_neither_reads_nor_needs_init_mae(dirs, trained, tmp_path, caplog):
    """init.mae enters a fresh run only: resuming (a copy of the trained run, at its last
    step) with an init.mae that does not exist restores the checkpoint without converting,
    reading or even checking the MAE file."""
    workdir = str(tmp_path / "cls")
    shutil.copytree(trained[0], workdir)
    caplog.set_level(logging.INFO)
    results = train.run(_config(dirs, **{"network.drop_path": 0.0, "eval.at_end": False,
                                         "init.mae": str(tmp_path / "moved.pth")}), workdir)
    assert results["step"] == trained[1]["step"]
    assert "MAE weights (init.mae=" in caplog.text and "skipped: resuming" in caplog.text
    assert checkpoint.latest_step(str(tmp_path / "fresh")) is None


def test_bad_settings_fail_before_any_work(dirs, tmp_path):
    with pytest.raises(ValueError, match="network.stem='pixelz'"):
        train.run(_config(dirs, **{"network.stem": "pixelz"}), str(tmp_path / "a"))
    with pytest.raises(FileNotFoundError, match="init.mae"):
        train.run(_config(dirs, **{"init.mae": str(tmp_path / "none.pth")}), str(tmp_path / "b"))
    with pytest.raises(ValueError, match="at least 7"):
        train.run(_config(dirs, **{"network.num_classes": 3}), str(tmp_path / "c"))
    with pytest.raises(ValueError, match="ViT name"):
        train.run(_config(dirs, **{"network.size": "Q/4"}), str(tmp_path / "d"))
    assert not os.path.exists(str(tmp_path / "a"))


def test_codebook_stem_needs_an_lc_tokenizer(tmp_path):
    tok_dir = tiny_tokenizer.make_workdir(str(tmp_path / "vq"), **{"quantizer.kind": "vq"})
    c = classifier_demo.get_config("tiny")
    c.update_from_flattened_dict({"tokenizer.workdir": tok_dir, "network.stem": "codebook",
                                  "mesh.data": 1})
    with pytest.raises(ValueError, match="frozen codebook"):
        train.run(c, str(tmp_path / "cls"))


def test_paper_config_is_maes_vit_b_recipe():
    """configs/classifier_lc_imagenet.py: MAE's ViT-B fine-tuning numbers, and ViT-B/16's
    parameter count (timm's vit_base_patch16_224: 86,567,656, plus 60 position rows of 768 at
    256 px) for the `pixels` stem on an f16 256 px tokenizer."""
    from types import SimpleNamespace
    from vqlc.configs import classifier_lc_imagenet
    c = classifier_lc_imagenet.get_config()
    assert train.learning_rate(c) == pytest.approx(2e-3)
    assert (c.optim.layer_decay, c.optim.weight_decay, c.network.drop_path) == (0.65, 0.05, 0.1)
    assert (c.optim.warmup_steps, c.train.num_steps) == (6255, 125100)
    assert (c.mixup.mixup_alpha, c.mixup.cutmix_alpha, c.mixup.label_smoothing) == (0.8, 1.0, 0.1)
    tok = SimpleNamespace(image_size=256, downsample_factor=16, latent_dim=8,
                          codebook_size=100_000, model=None,
                          config=SimpleNamespace(quantizer=SimpleNamespace(kind="lc"),
                                                 codebook=SimpleNamespace(feature_dim=768)))
    c.network.stem = "pixels"
    model = train.make_model(c, tok).vit
    count = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(vit.param_shapes(model)))
    assert model.grid_size == 16 and count == 86_567_656 + 60 * 768
