"""Generation metrics (vqlc.eval.generation, python -m vqlc.fid): FID against the scipy formula;
FID, sFID, IS and precision/recall against tests/golden/generation_golden.npz, an independent
numpy/scipy implementation of the ADM evaluator's formulas (tests/golden/make_generation_golden.py)
on 48 px crops of scikit-image photographs, through a random-weight InceptionV3 (the TF weights
are not available to the tests; tests/test_inception.py checks them when they are).
"""
import json
import os
import subprocess
import sys
import types

import jax
import numpy as np
import PIL.Image
import pytest
import scipy.linalg

from vqlc import fid as fid_cli
from vqlc.eval import generation, metrics
from vqlc.models import inception

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "generation_golden.npz")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN) as g:
        return dict(g)


@pytest.fixture(scope="module")
def net():
    params, fc = inception.random_params(seed=0)
    return types.SimpleNamespace(params=params, fc=fc, source="random He-normal", path="",
                                 precision=jax.lax.Precision.HIGHEST)


@pytest.fixture(scope="module")
def mesh1():
    """One device: the 4 virtual test devices share 2 cores, and the sharded path is covered
    by test_adm_metrics_match_golden."""
    from vqlc import parallel
    return parallel.make_mesh(1)


@pytest.fixture(scope="module")
def files(golden, tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    a, b = str(d / "a.npz"), str(d / "b.npz")
    np.savez(a, arr_0=golden["images_a"])
    np.savez(b, arr_0=golden["images_b"], arr_1=np.arange(len(golden["images_b"])))
    folder = d / "b_png"
    for i, im in enumerate(golden["images_b"]):  # nested folders, upper-case extension
        sub = folder / f"part{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(im).save(sub / f"{i:03d}.{'PNG' if i % 3 == 0 else 'png'}")
    (folder / "notes.txt").write_text("not an image")
    return types.SimpleNamespace(a=a, b=b, folder=str(folder), cache=str(d / "cache"),
                                 dir=d)


@pytest.fixture(scope="module")
def clean_result(files, net, mesh1):
    return generation.compute(files.a, files.b, "clean", net=net, cache_dir=files.cache,
                              batch_size=10, mesh=mesh1)


def _scipy_fid(mu1, s1, mu2, s2):
    covmean = np.real(scipy.linalg.sqrtm(s1 @ s2))
    d = mu1 - mu2
    return d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def test_frechet_distance_matches_scipy_formula():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 24)) @ rng.normal(size=(24, 24))
    y = 0.8 * rng.normal(size=(300, 24)) @ rng.normal(size=(24, 24)) + 0.3
    stats = [(v.mean(0), np.cov(v, rowvar=False)) for v in (x, y)]
    got = metrics.frechet_distance(*stats[0], *stats[1])
    assert got == pytest.approx(_scipy_fid(*stats[0], *stats[1]), rel=1e-8)
    assert metrics.frechet_distance(*stats[0], *stats[0]) == pytest.approx(0.0, abs=1e-8)


def test_inception_score_formula(golden):
    logits = golden["adm_logits_b"]
    assert generation.inception_score(logits, 4) == pytest.approx(
        float(golden["adm_is_split4"]), rel=1e-6)
    assert generation.inception_score(logits) == pytest.approx(
        float(golden["adm_is_split5000"]), rel=1e-6)
    assert generation.inception_score(np.zeros((7, 1008))) == pytest.approx(1.0)
    # Confident and all different: IS = number of classes seen per split.
    onehot = 50.0 * np.eye(1008)[:6]
    assert generation.inception_score(onehot) == pytest.approx(6.0, rel=1e-6)
    assert generation.inception_score(onehot, 3) == pytest.approx(3.0, rel=1e-6)


def test_adm_metrics_match_golden(files, net, golden):
    # All 4 test devices: batches of 12 (10 images + 2 padding rows) sharded 3 per device.
    r = generation.compute(files.a, files.b, "adm", net=net, cache_dir=files.cache,
                           batch_size=10)
    assert r["fid"] == pytest.approx(float(golden["adm_fid"]), rel=1e-4)
    assert r["sfid"] == pytest.approx(float(golden["adm_sfid"]), rel=1e-4)
    assert r["inception_score"] == pytest.approx(float(golden["adm_is_split5000"]), rel=1e-5)
    assert r["precision"] == pytest.approx(float(golden["adm_precision"]))
    assert r["recall"] == pytest.approx(float(golden["adm_recall"]))
    for k in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert "ADM evaluator" in r[f"{k}_protocol"]
    assert r["num_images_a"] == r["num_images_b"] == 10


def test_clean_fid_matches_golden(clean_result, golden):
    assert clean_result["fid"] == pytest.approx(float(golden["clean_fid"]), rel=1e-4)
    assert "sfid" not in clean_result and "inception_score" not in clean_result
    assert "clean-fid 'clean'" in clean_result["fid_protocol"]


def test_cli_cached_npz_vs_folder_equals_api(files, net, mesh1, clean_result, capsys):
    """A = a.npz (statistics from the cache the clean run wrote), B = B's images as PNG files:
    the same FID as the Python API on the two .npz files."""
    out = str(files.dir / "cli.json")
    assert fid_cli.main([files.a, files.folder, "--json", out, "--cache-dir", files.cache,
                         "--batch-size", "10"], net=net, mesh=mesh1) == 0
    with open(out) as f:
        r = json.load(f)
    assert any("read from cache" in n for n in r["notes"])
    assert r["num_images_b"] == 10  # notes.txt skipped, subfolders and .PNG found
    assert r["fid"] == pytest.approx(clean_result["fid"], rel=1e-4)
    assert r["fid_protocol"].startswith("clean-fid")
    assert "fid" in capsys.readouterr().out


def test_identical_sets_through_statistics_npz(files, net, mesh1, clean_result):
    """A as a statistics .npz (mu, sigma of A's images), B = A's images: FID ~ 0."""
    entry = [n.split(" at ")[-1] for n in clean_result["notes"] if "cached at" in n][0]
    with np.load(entry) as f:
        from vqlc.eval import stats_cache
        mu, sigma = stats_cache.stats_from_arrays(f, "pool_").mean_and_covariance()
    stats = str(files.dir / "stats.npz")
    np.savez(stats, mu=mu, sigma=sigma)
    assert generation.open_input(stats).kind == "statistics"
    r = generation.compute(stats, files.a, "clean", net=net, use_cache=False, batch_size=10,
                           mesh=mesh1)
    assert abs(r["fid"]) < 1e-3 and r["num_images_a"] is None and r["num_images_b"] == 10


def test_open_input_kinds(files, tmp_path):
    assert generation.open_input(files.folder).kind == "folder"
    inp = generation.open_input(files.b)
    assert (inp.kind, inp.num_images, inp.image_shape) == ("samples", 10, (48, 48, 3))
    virtual = str(tmp_path / "virtual.npz")  # ADM's VIRTUAL_*.npz: images + statistics
    np.savez(virtual, arr_0=np.zeros((4, 8, 8, 3), np.uint8), mu=np.zeros(2), sigma=np.eye(2),
             mu_s=np.zeros(3), sigma_s=np.eye(3))
    inp = generation.open_input(virtual)
    assert inp.kind == "statistics" and inp.num_images == 4
    assert sorted(inp.stats) == ["mu", "mu_s", "sigma", "sigma_s"]


def test_bad_inputs(files, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    junk = str(tmp_path / "junk.npz")
    np.savez(junk, something=np.zeros(3))
    gray = str(tmp_path / "gray.npz")
    np.savez(gray, arr_0=np.zeros((2, 8, 8), np.uint8))
    cases = [(str(tmp_path / "missing"), "does not exist"),
             (str(empty), "no JPEG or PNG images"),
             (junk, "needs arr_0"),
             (gray, "arr_0 must be images")]
    for path, message in cases:
        with pytest.raises(SystemExit) as e:
            fid_cli.main([path, files.b])
        assert e.value.code == 2
        assert message in capsys.readouterr().err
    # From a shell: exit status 2, the message, no traceback.
    p = subprocess.run([sys.executable, "-m", "vqlc.fid", str(tmp_path / "missing"), files.b],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "does not exist" in p.stderr and "Traceback" not in p.stderr


def test_inception_score_needs_fc(files, net):
    no_fc = types.SimpleNamespace(**{**vars(net), "fc": None, "path": "default_1.pt"})
    with pytest.raises(generation.InputError, match="pt_inception-2015-12-05"):
        generation.compute(files.a, files.b, "adm", net=no_fc, inception_score_wanted=True)


def test_fc_from_state_dict():
    assert inception.fc_from_state_dict({"Conv2d_1a_3x3.conv.weight": np.zeros(1)}) is None
    w = np.arange(1008 * 2048, dtype=np.float32).reshape(1008, 2048)
    fc = inception.fc_from_state_dict({"fc.weight": w, "fc.bias": np.ones(1008)})
    assert fc["kernel"].shape == (2048, 1008) and np.array_equal(fc["kernel"], w.T)
    with pytest.raises(ValueError, match="fc.weight has shape"):
        inception.fc_from_state_dict({"fc.weight": np.zeros((1000, 2048))})


def test_stats_cache_round_trip_shared_with_rfid(tmp_path):
    from vqlc.eval import rfid, stats_cache
    s = metrics.FeatureStatistics(3)
    s.add(np.random.default_rng(0).normal(size=(5, 3)))
    path = stats_cache.entry_path(str(tmp_path / "c"), {"b": 1, "a": [2]})
    assert path == stats_cache.entry_path(str(tmp_path / "c"), {"a": [2], "b": 1})
    rfid._save_stats(path, s)  # rFID writes through the shared cache module
    back = stats_cache.load_stats(path)
    assert back.count == 5 and np.array_equal(back.sum, s.sum)
    assert np.array_equal(back.outer, s.outer)
    assert not [f for f in os.listdir(tmp_path / "c") if ".tmp" in f]
