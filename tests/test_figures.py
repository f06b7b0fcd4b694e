"""Analysis figures (vqlc.figures, vqlc.eval.analysis) on one tiny trained LC run."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from vqlc.configs import default as default_config
from vqlc import figures
from vqlc.eval import analysis, images as image_io, metrics
from vqlc.train import reporting, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(workdir, tokenizer): 6 tiny LC steps, no LPIPS, no evaluation (usage is computed here)."""
    from vqlc import Tokenizer
    workdir = str(tmp_path_factory.mktemp("figures_run"))
    c = default_config.get_config("tiny")
    c.update_from_flattened_dict({"train.num_steps": 6, "train.log_every": 1,
                                  "train.checkpoint_every": 6, "train.image_every": 6,
                                  "loss.perceptual_weight": 0.0, "eval.at_end": False})
    trainer.train_and_evaluate(c, workdir)
    return workdir, Tokenizer.load(workdir)


@pytest.fixture
def second_run(run, tmp_path):
    """A copy of the run with only its first 3 log records: a second, distinguishable curve."""
    workdir = str(tmp_path / "copy")
    shutil.copytree(run[0], workdir, ignore=shutil.ignore_patterns("checkpoints", "eval"))
    records = reporting.read_metrics(run[0])[:3]
    with open(os.path.join(workdir, reporting.METRICS_FILE), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return workdir


@pytest.fixture
def cached_load(run, monkeypatch):
    """Tokenizer.load returns the module's tokenizer: the CLI's loads skip the ~20 s recompile
    of a fresh train state (the real load is exercised by the `run` fixture)."""
    from vqlc.tokenizer import Tokenizer
    monkeypatch.setattr(Tokenizer, "load", classmethod(lambda cls, workdir, step=None: run[1]))


def _png(path):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n", path
    assert os.path.getsize(path) > 1000


def _brute_force_check(z, codes, ns, got):
    """got [N, len(ns)] equals argsort of float64 distances wherever rank n is not a near-tie."""
    d = ((z[:, None, :].astype(np.float64) - codes[None].astype(np.float64)) ** 2).sum(-1)
    order = np.argsort(d, axis=1, kind="stable")
    ds = np.take_along_axis(d, order, axis=1)
    checked = 0
    for j, n in enumerate(ns):
        gap = np.full(len(z), np.inf)
        if n > 1:
            gap = np.minimum(gap, ds[:, n - 1] - ds[:, n - 2])
        if n < codes.shape[0]:
            gap = np.minimum(gap, ds[:, n] - ds[:, n - 1])
        clear = gap > 2e-5 * (1.0 + ds[:, n - 1])  # beyond float32 rounding
        np.testing.assert_array_equal(got[clear, j], order[clear, n - 1], err_msg=f"n={n}")
        # Near-ties may swap neighbours, but the distance must be the n-th smallest.
        np.testing.assert_allclose(d[np.arange(len(z)), got[:, j]], ds[:, n - 1], rtol=1e-4,
                                   atol=1e-5)
        checked += clear.sum()
    assert checked >= 0.95 * len(z) * len(ns)


def test_nth_nearest_equals_brute_force():
    rng = np.random.default_rng(0)
    # N not a multiple of tile_n: the padded last chunk is exercised.
    z = rng.normal(size=(300, 6)).astype(np.float32) + 3.0
    codes = rng.normal(size=(1100, 6)).astype(np.float32) + 3.0
    ns = (1, 2, 3, 17, 200, 1000)
    got = analysis.nth_nearest_codes(z, codes, ns, tile_n=64)
    assert got.shape == (300, len(ns)) and got.dtype == np.int32
    _brute_force_check(z, codes, ns, got)
    # The default tiles give the same ranks.
    np.testing.assert_array_equal(analysis.nth_nearest_codes(z, codes, ns), got)


def test_nth_nearest_ties_and_errors():
    rng = np.random.default_rng(1)
    half = rng.normal(size=(40, 4)).astype(np.float32)
    codes = np.concatenate([half, half])  # every code twice: exact ties
    z = rng.normal(size=(50, 4)).astype(np.float32)
    got = analysis.nth_nearest_codes(z, codes, (1, 2, 3, 4), tile_n=16)
    # The lower id of each tied pair comes first, then its duplicate.
    assert np.all(got[:, 0] < 40) and np.all(got[:, 1] == got[:, 0] + 40)
    assert np.all(got[:, 2] < 40) and np.all(got[:, 3] == got[:, 2] + 40)
    _brute_force_check(z, half, (1, 2), got[:, [0, 2]])
    for bad in [(0,), (81,), ()]:
        with pytest.raises(ValueError, match="must lie in"):
            analysis.nth_nearest_codes(z, codes, bad)


def test_token_replacement_rank1_is_ordinary_quantisation(run):
    _, tok = run
    x = analysis.eval_images(tok.config, max_images=16)
    assert x.dtype == np.uint8 and x.shape == (16, 16, 16, 3)
    k = tok.codebook_size
    r = analysis.token_replacement(tok, x, (1, 2, 5, k), batch_size=8)
    assert r["n"] == [1, 2, 5, k] and r["num_images"] == 16 and r["num_tokens"] == 16 * 64
    # The normal reconstruction's PSNR, batch by batch as token_replacement (float32 sums).
    unit = lambda a: a.astype(np.float32) / np.float32(255)
    expected = np.concatenate([metrics.psnr(unit(b), unit(tok.decode(tok.encode(b))))
                               for b in (x[:8], x[8:])])
    np.testing.assert_allclose(r["psnr_per_image"][0], np.asarray(expected), rtol=0, atol=1e-9)
    assert r["psnr"][0] == pytest.approx(float(np.mean(expected, dtype=np.float64)), abs=1e-9)
    assert r["rank1_agreement"] == 1.0  # this module's search agrees with the quantizer's
    # The farthest code loses a lot; the second nearest loses something.
    assert r["psnr"][0] > r["psnr"][-1] + 1.0 and r["psnr"][0] > r["psnr"][1] - 0.5, r["psnr"]
    # In the quantizer's own space, the ranks are the brute-force ranks.
    codes, to_search = analysis.search_space(tok)
    assert codes.shape == (k, tok.config.quantizer.dim)
    z = to_search(tok.encode_latents(x[:4])).reshape(-1, codes.shape[1])
    _brute_force_check(z, codes, (1, 2, 5), analysis.nth_nearest_codes(z, codes, (1, 2, 5)))


def test_cli_token_replacement(run, second_run, cached_load, tmp_path, capsys):
    out, js = str(tmp_path / "tr.png"), str(tmp_path / "tr.json")
    assert figures.main(["token_replacement", "--workdir", run[0], "--workdir", second_run,
                         "--label", "a", "--label", "b", "--n", "1,2,5,50", "--max-images", "8",
                         "--out", out, "--json", js]) == 0
    _png(out)
    with open(js) as f:
        table = json.load(f)
    assert list(table) == ["a", "b"] and table["a"]["n"] == [1, 2, 5]  # 50 > K = 32: skipped
    assert table["a"]["num_images"] == 8 and table["a"]["psnr"] == table["b"]["psnr"]
    printed = capsys.readouterr()
    assert "skipping n > K = 32: [50]" in printed.err
    assert f"{table['a']['psnr'][0]:.3f}" in printed.out and f"wrote {out}" in printed.out


def test_cli_utilization_multi_run(run, second_run, tmp_path, capsys):
    out = str(tmp_path / "util.png")
    assert figures.main(["utilization", "--workdir", run[0], "--workdir", second_run,
                         "--out", out]) == 0
    _png(out)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("LC, K=32") and "6 points, steps 1-6" in lines[0]
    assert lines[1].startswith("LC, K=32") and "3 points, steps 1-3" in lines[1]
    steps, util = analysis.load_utilization(second_run)
    assert steps.tolist() == [1, 2, 3] and np.all((util > 0) & (util <= 1))
    # The trainer's single-run plot goes through the same function.
    assert image_io.plot_utilization(reporting.read_metrics(run[0]), str(tmp_path / "one.png"))
    _png(str(tmp_path / "one.png"))
    assert not image_io.plot_utilization([{"step": 1, "loss": 1.0}], str(tmp_path / "no.png"))


def test_tsne_active_inactive(run, cached_load, tmp_path, capsys):
    workdir, tok = run
    out = str(tmp_path / "tsne.png")
    with pytest.raises(SystemExit):  # no evaluation yet: says how to get the counts
        figures.main(["tsne", "--workdir", workdir, "--out", out])
    err = capsys.readouterr().err
    assert "code_counts.npy" in err and "--config=<config>:eval" in err and "--compute-usage" in err

    counts = analysis.compute_code_counts(tok, analysis.eval_image_batches(tok.config))
    assert counts.sum() == 16 * 64
    x = analysis.eval_images(tok.config)
    np.testing.assert_array_equal(counts, np.bincount(tok.encode(x).ravel(), minlength=32))
    np.testing.assert_array_equal(counts, analysis.compute_code_counts(tok, x, batch_size=5))
    assert [len(b) for b in analysis.eval_image_batches(tok.config, 11, 4)] == [4, 4, 3]
    r = analysis.codebook_tsne(tok, counts)
    assert r["num_active"] == int((counts > 0).sum()) and r["num_active"] + r["num_inactive"] == 32
    assert r["xy"].shape == (32, 2) and np.all(np.isfinite(r["xy"]))
    np.testing.assert_array_equal(r["active"], counts[r["ids"]] > 0)

    assert figures.main(["tsne", "--workdir", workdir, "--compute-usage", "--out", out]) == 0
    _png(out)
    assert f"active {r['num_active']:7d}" in capsys.readouterr().out
    os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
    np.save(analysis.code_counts_path(workdir), counts)
    assert figures.main(["tsne", "--workdir", workdir, "--out", out, "--max-codes", "10"]) == 0
    assert "shown 10" in capsys.readouterr().out


def test_subsample_keeps_ratio_and_spreads():
    active = np.zeros(100_000, bool)
    active[::4] = True  # 25% active
    ids = analysis.subsample_codes(active, 5000)
    assert len(ids) == 5000 and len(np.unique(ids)) == 5000
    assert active[ids].sum() == 1250
    on = ids[active[ids]]
    assert on[0] == 0 and on[-1] == 99_996  # spread from the first to the last active code
    np.testing.assert_array_equal(analysis.subsample_codes(active[:300], 5000), np.arange(300))
    few = np.zeros(10_000, bool)
    few[7] = True  # one active code still shows up
    assert 7 in analysis.subsample_codes(few, 100)


def test_cli_errors(run, tmp_path, capsys):
    missing = str(tmp_path / "nope")
    proc = subprocess.run([sys.executable, "-m", "vqlc.figures", "tsne", "--workdir", missing],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and f"workdir {missing!r} does not exist" in proc.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["utilization", "--workdir", str(empty)], "has no config.json"),
        (["token_replacement", "--workdir", run[0], "--n", "1,x"], "comma-separated integers"),
        (["token_replacement", "--workdir", run[0], "--n", "0,2"], "must lie in [1, 1000]"),
        (["utilization", "--workdir", run[0], "--label", "a", "--label", "b"],
         "2 --label for 1 --workdir"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            figures.main(argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err, argv
    no_log = tmp_path / "no_log"
    shutil.copytree(run[0], no_log, ignore=shutil.ignore_patterns("checkpoints", "*.jsonl"))
    with pytest.raises(SystemExit):
        figures.main(["utilization", "--workdir", str(no_log)])
    assert "metrics.jsonl' not found" in capsys.readouterr().err
