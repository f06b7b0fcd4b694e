"""The `sample` task: deterministic over devices, resumable, ADM layout, the replay generator.

Note for FID: `test_replay_images_are_the_tokenizer_reconstructions_of_training_crops` shows
that replay's samples.npz images are exactly decode(encode(training crops)); so FID of
samples.npz against the statistics of those reconstructions (`Replay.reference_images()`
through the tokenizer; with generator.replay.per_class=1 and balanced labels the two sets are
the same images, each repeated) is 0 up to float error: the generation-FID side checks that.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from vqlc.configs import sample_demo
from tests import tiny_tokenizer
from vqlc import Tokenizer, parallel
from vqlc.data import pipeline
from vqlc.gen import generator, replay, sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, PER_CLASS, CLASSES = 42, 6, 7


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return tiny_tokenizer.make_workdir(str(tmp_path_factory.mktemp("tok") / "run"))


def _config(tok_dir, **overrides):
    c = sample_demo.get_config("tiny")
    c.update_from_flattened_dict({"tokenizer.workdir": tok_dir, **overrides})
    return c


def _shards(workdir):
    out = {}
    for name in sorted(os.listdir(os.path.join(workdir, "samples"))):
        if name.endswith(".npz"):
            with np.load(os.path.join(workdir, "samples", name)) as f:
                out[name] = {k: f[k] for k in f.files}
    return out


def _npz(workdir):
    with np.load(os.path.join(workdir, "samples.npz")) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def four(tok_dir, tmp_path_factory):
    """An uninterrupted run on a mesh of 4 devices (the reference of several tests)."""
    workdir = str(tmp_path_factory.mktemp("four"))
    sample.run(_config(tok_dir, **{"mesh.data": 4}), workdir)
    return workdir


def test_one_and_four_devices_give_identical_shards(tok_dir, four, tmp_path):
    one = str(tmp_path / "one")
    sample.run(_config(tok_dir, **{"mesh.data": 1}), one)
    a, b = _shards(one), _shards(four)
    assert sorted(a) == [f"shard_{i:05d}.npz" for i in range(6)] == sorted(b)
    for name in a:
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            np.testing.assert_array_equal(a[name][key], b[name][key], err_msg=f"{name}:{key}")
    for key in ("arr_0", "arr_1"):
        np.testing.assert_array_equal(_npz(one)[key], _npz(four)[key])
    with open(os.path.join(one, "samples.json")) as f1, \
            open(os.path.join(four, "samples.json")) as f4:
        j1, j4 = json.load(f1), json.load(f4)
    assert (j1["devices"], j4["devices"]) == (1, 4)
    assert j1["utilization"] == j4["utilization"]
    assert len(np.unique(_npz(four)["arr_0"].reshape(N, -1), axis=0)) > CLASSES  # not constant


def test_batch_size_does_not_change_the_samples(tok_dir, four, tmp_path):
    other = str(tmp_path / "b4")
    sample.run(_config(tok_dir, **{"mesh.data": 4, "sample.batch_size": 4}), other)
    assert len(_shards(other)) == 11
    a, b = _npz(other), _npz(four)
    np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
    # The same codes decoded in batches of another shape: XLA:CPU may pick other conv kernels,
    # whose float rounding can move a pixel across a uint8 step (seen on an AVX2-only CPU).
    diff = np.abs(a["arr_0"].astype(np.int16) - b["arr_0"])
    assert diff.max() <= 1 and np.mean(diff > 0) < 1e-3, (diff.max(), np.mean(diff > 0))


def test_killed_mid_way_resumes_every_sample_once(tok_dir, four, tmp_path, monkeypatch):
    workdir = str(tmp_path / "resumed")
    config = _config(tok_dir, **{"mesh.data": 4})
    real_write, calls = sample._write_shard, []

    def dying_write(path, arrays):
        if len(calls) == 3:
            with open(path + ".tmp-999", "wb") as f:  # a write cut short by the kill
                f.write(b"PK\x03\x04 half a shard")
            raise KeyboardInterrupt("killed")
        calls.append(path)
        real_write(path, arrays)

    monkeypatch.setattr(sample, "_write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        sample.run(config, workdir)
    assert len(_shards(workdir)) == 3 and not os.path.exists(os.path.join(workdir, "samples.npz"))
    monkeypatch.setattr(sample, "_write_shard", real_write)
    sample.run(config, workdir)
    assert not [n for n in os.listdir(os.path.join(workdir, "samples")) if ".tmp-" in n]
    with open(os.path.join(workdir, "samples.json")) as f:
        assert json.load(f)["sampled_this_run"] == N - 3 * 8
    a, b = _shards(workdir), _shards(four)
    assert sorted(a) == sorted(b)
    for name in a:
        for key in a[name]:
            np.testing.assert_array_equal(a[name][key], b[name][key])
    merged = _npz(workdir)
    np.testing.assert_array_equal(np.concatenate([a[n]["indices"] for n in sorted(a)]),
                                  np.arange(N))
    np.testing.assert_array_equal(merged["arr_0"], _npz(four)["arr_0"])
    # other settings in the same workdir are refused, not mixed in
    with pytest.raises(ValueError, match="other settings.*seed"):
        sample.run(_config(tok_dir, **{"sample.seed": 1}), workdir)


def test_adm_layout_class_balance_grid(four):
    with np.load(os.path.join(four, "samples.npz")) as f:
        assert sorted(f.files) == ["arr_0", "arr_1"]
        images, labels = f["arr_0"], f["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (N, 16, 16, 3)
    assert labels.dtype == np.int64 and labels.shape == (N,)
    np.testing.assert_array_equal(labels, np.repeat(np.arange(CLASSES), PER_CLASS))
    np.testing.assert_array_equal(np.bincount(labels), [PER_CLASS] * CLASSES)
    with open(os.path.join(four, "samples.json")) as f:
        record = json.load(f)
    assert record["class_counts"] == [PER_CLASS] * CLASSES and record["num_samples"] == N
    assert record["tokenizer"]["step"] == tiny_tokenizer.STEP
    assert record["generator"]["kind"] == "replay"
    assert record["images_per_s"] > 0
    from PIL import Image
    grid = np.asarray(Image.open(os.path.join(four, "samples_grid.png")))
    # 7 rows x 4 columns of 16 px images enlarged x4, 2 px gaps
    assert grid.shape == (7 * 66 + 2, 4 * 66 + 2, 3)
    np.testing.assert_array_equal(grid[2:66, 2:66], np.repeat(np.repeat(images[0], 4, 0), 4, 1))
    np.testing.assert_array_equal(grid[2 + 66:2 * 66, 2 + 66:2 * 66],
                                  np.repeat(np.repeat(images[PER_CLASS + 1], 4, 0), 4, 1))


def test_random_labels_are_deterministic_and_in_range(tok_dir):
    config = _config(tok_dir, **{"sample.labels": "random", "sample.per_class": 0,
                                 "sample.num_samples": 500})
    labels = sample.sample_labels(config)
    assert labels.shape == (500,) and labels.dtype == np.int64
    assert labels.min() >= 0 and labels.max() < CLASSES
    assert len(np.unique(labels)) == CLASSES
    np.testing.assert_array_equal(sample.sample_labels(config), labels)
    config.sample.num_samples = 100  # a prefix: label i depends on i only
    np.testing.assert_array_equal(sample.sample_labels(config), labels[:100])
    config.sample.seed = 1
    assert not np.array_equal(sample.sample_labels(config), labels[:100])


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.load(tok_dir)


def test_utilization_equals_a_direct_count(tok_dir, tok, four):
    config = _config(tok_dir)
    gen = replay.Replay.load(config, "", tokenizer=tok, mesh=parallel.make_mesh(1))
    labels = np.repeat(np.arange(CLASSES), PER_CLASS)
    choice = np.asarray(gen.choice(sample.sample_keys(config.sample.seed, np.arange(N))))
    codes = np.asarray(gen.variables["bank"])[labels, choice]  # the samples' code maps
    with open(os.path.join(four, "samples.json")) as f:
        record = json.load(f)
    assert record["codes_used"] == len(np.unique(codes))
    assert record["utilization"] == len(np.unique(codes)) / tok.codebook_size
    np.testing.assert_array_equal(np.concatenate([s["codes"] for s in _shards(four).values()]),
                                  codes)


def test_replay_images_are_the_tokenizer_reconstructions_of_training_crops(tok_dir, tok, four):
    config = _config(tok_dir)
    gen = replay.Replay.load(config, "", tokenizer=tok, mesh=parallel.make_mesh(1))
    assert gen.images.shape == (CLASSES, 3, 16, 16, 3)
    # the bank: crops of each class's own training photograph (demo class = photograph)
    source = pipeline.make_source(tok.config.data, "train")
    for c in range(CLASSES):
        photo = source[int(gen.indices[c, 0])]["image"]
        assert all(source[int(i)]["label"] == c for i in gen.indices[c])
        windows = np.lib.stride_tricks.sliding_window_view(photo, (16, 16, 3))[..., 0, :, :, :]
        for image in gen.images[c]:
            assert np.any(np.all(windows == image, axis=(-3, -2, -1)))
    labels = np.repeat(np.arange(CLASSES), PER_CLASS)
    choice = np.asarray(gen.choice(sample.sample_keys(config.sample.seed, np.arange(N))))
    crops = gen.images[labels, choice]
    np.testing.assert_array_equal(_npz(four)["arr_0"], tok.decode(tok.encode(crops)))
    assert len(np.unique(choice)) > 1


def test_latent_space_snaps_to_the_nearest_code(tok_dir, tok, tmp_path):
    workdir = str(tmp_path / "latents")
    # with random labels (a partial last batch, classes with few or no samples in the grid)
    config = _config(tok_dir, **{"generator.replay.space": "latents", "sample.per_class": 0,
                                 "sample.labels": "random", "sample.num_samples": 13,
                                 "mesh.data": 4})
    sample.run(config, workdir)
    gen = replay.Replay.load(config, "", tokenizer=tok, mesh=parallel.make_mesh(1))
    assert gen.space == "latents" and gen.variables["bank"].shape == (CLASSES, 3, 8, 8, 8)
    labels = sample.sample_labels(config)
    np.testing.assert_array_equal(_npz(workdir)["arr_1"], labels)
    with open(os.path.join(workdir, "samples.json")) as f:
        assert json.load(f)["class_counts"] == np.bincount(labels, minlength=CLASSES).tolist()
    assert os.path.exists(os.path.join(workdir, "samples_grid.png"))
    choice = np.asarray(gen.choice(sample.sample_keys(0, np.arange(13))))
    crops = gen.images[labels, choice]
    np.testing.assert_array_equal(_npz(workdir)["arr_0"],
                                  tok.decode_latents(tok.encode_latents(crops)))
    codes = np.concatenate([s["codes"] for s in _shards(workdir).values()])
    np.testing.assert_array_equal(codes, tok.encode(crops))


@pytest.mark.parametrize("overrides, message", [
    ({"sample.num_samples": 10}, "exactly one of sample.per_class"),
    ({"sample.per_class": 0}, "exactly one of sample.per_class"),
    ({"sample.per_class": 0, "sample.num_samples": 10}, "'balanced' needs sample.per_class"),
    ({"sample.labels": "random"}, "'random' needs sample.num_samples"),
    ({"sample.labels": "uniform"}, "sample.labels='uniform'"),
    ({"generator.kind": "gpt-9"}, "generator.kind='gpt-9' is unknown; valid: diffusion, gpt, replay"),
    ({"generator.replay.space": "pixels"}, "replay.space='pixels'"),
    ({"tokenizer.workdir": ""}, "tokenizer.workdir is empty"),
])
def test_bad_settings_fail_before_any_work(tok_dir, tmp_path, overrides, message):
    workdir = str(tmp_path / "bad")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sample.run(_config(tok_dir, **overrides), workdir)
    assert not os.path.exists(workdir)


def test_batch_size_and_missing_tokenizer_fail_early(tok_dir, tmp_path):
    with pytest.raises(ValueError, match="sample.batch_size=6 must be divisible"):
        sample.run(_config(tok_dir, **{"sample.batch_size": 6}), str(tmp_path / "a"))
    with pytest.raises(FileNotFoundError, match="trained tokenizer workdir"):
        sample.run(_config(str(tmp_path / "nowhere")), str(tmp_path / "b"))
    assert not os.listdir(tmp_path)
    assert generator.GENERATORS["replay"] == "vqlc.gen.replay:Replay"


def test_cli_end_to_end(tok_dir, four, tmp_path):
    workdir = str(tmp_path / "cli")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "vqlc.main", "--config=configs/sample_demo.py:tiny",
         f"--workdir={workdir}", f"--config.tokenizer.workdir={tok_dir}",
         "--config.sample.png=True"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "images/s" in result.stdout and "utilization:" in result.stdout
    np.testing.assert_array_equal(_npz(workdir)["arr_0"], _npz(four)["arr_0"])
    pngs = sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(workdir, "samples_png"))
                  for f in fs)
    assert len(pngs) == N and pngs[0].endswith(os.path.join("0000", "000000.png"))
    from PIL import Image
    np.testing.assert_array_equal(np.asarray(Image.open(pngs[-1])), _npz(four)["arr_0"][-1])
    assert jax.process_count() == 1


@pytest.mark.slow
def test_two_processes_give_the_samples_of_one(tok_dir, four, tmp_path):
    """launch/local.sh: 2 processes x 2 devices (about 40 s on 2 cores)."""
    import tempfile
    workdir = str(tmp_path / "two")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VQLC_") and k != "XLA_FLAGS"}
    env.update(PYTHON=sys.executable, VQLC_LOCAL_DEVICES="2", JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=os.path.join(tempfile.gettempdir(),
                                                      "vqlc-test-jax-cache"))
    result = subprocess.run(
        ["bash", os.path.join(ROOT, "launch", "local.sh"), "2", "configs/sample_demo.py:tiny",
         workdir, f"--config.tokenizer.workdir={tok_dir}"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    a, b = _shards(workdir), _shards(four)
    assert sorted(a) == sorted(b)
    for name in a:
        for key in a[name]:
            np.testing.assert_array_equal(a[name][key], b[name][key])
    np.testing.assert_array_equal(_npz(workdir)["arr_0"], _npz(four)["arr_0"])
    with open(os.path.join(workdir, "samples.json")) as f:
        assert json.load(f)["processes"] == 2


def test_replay_through_sample_and_fid_scores_near_zero_against_itself(tok_dir, tok, four,
                                                                        tmp_path):
    """The generator-shaped toy end to end: `replay`'s samples.npz against a PNG folder of the
    same reconstructions scores FID ~0 with `python -m vqlc.fid`; against the raw training crops
    (which the random-weight tokenizer does not reproduce) it does not."""
    import types

    import PIL.Image

    from vqlc import fid as fid_cli
    from vqlc.models import inception
    config = _config(tok_dir)
    gen = replay.Replay.load(config, "", tokenizer=tok, mesh=parallel.make_mesh(1))
    labels = np.repeat(np.arange(CLASSES), PER_CLASS)
    choice = np.asarray(gen.choice(sample.sample_keys(config.sample.seed, np.arange(N))))
    crops = gen.images[labels, choice]
    for name, images in (("same", tok.decode(tok.encode(crops))), ("raw", crops)):
        folder = tmp_path / name / "class_a"  # nested: folders are searched recursively
        folder.mkdir(parents=True)
        for i, image in enumerate(images):
            PIL.Image.fromarray(image).save(folder / f"{i:03d}.png")
    params, fc = inception.random_params(seed=0)
    net = types.SimpleNamespace(params=params, fc=fc, source="random He-normal", path="",
                                precision=jax.lax.Precision.HIGHEST)
    fids = {}
    for name in ("same", "raw"):
        out = str(tmp_path / f"{name}.json")
        assert fid_cli.main([str(tmp_path / name), os.path.join(four, "samples.npz"),
                             f"--json={out}", "--no_cache", "--batch_size=42"], net=net,
                            mesh=parallel.make_mesh(1)) == 0
        with open(out) as f:
            fids[name] = json.load(f)["fid"]
    assert abs(fids["same"]) < 1e-3 * fids["raw"], fids
