"""The evaluator: every image counted once on any device count and batch size, its outputs, and
the rFID machinery (sharded Inception, both reference sets, cache) on random Inception weights."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqlc.configs import default as default_config
from vqlc import parallel
from vqlc.data import make_eval_iterator, make_eval_source_iterator
from vqlc.eval import evaluator, metrics
from vqlc.models import inception
from vqlc.train import trainer


def _config(**overrides):
    c = default_config.get_config("tiny")
    # A trained codebook is not needed to check the evaluator's bookkeeping; 'vq' skips its build.
    c.quantizer.kind = "vq"
    c.update_from_flattened_dict(overrides)
    return c


def _evaluate(config, workdir, num_devices):
    with config.unlocked():
        config.mesh.data = num_devices
    mesh = parallel.make_mesh(num_devices)
    model, _, _, _, state, frozen = trainer.setup_model(config, workdir, mesh)
    variables = trainer.model_variables(state, frozen)
    return evaluator.evaluate(config, workdir, model=model, variables=variables, mesh=mesh,
                              step=0), model, variables


def test_metrics_identical_on_one_and_four_devices_with_a_ragged_last_batch(tmp_path):
    # 16 images in batches of 12: the second batch is 4 images and 8 padded rows. 32 px, as
    # LPIPS-AlexNet needs 31 px or more.
    config = _config(**{"eval.batch_size": 12, "data.image_size": 32, "eval.lpips_alex": True})
    one, model, variables = _evaluate(config, str(tmp_path / "one"), 1)
    four, _, _ = _evaluate(config, str(tmp_path / "four"), 4)
    assert one["num_images"] == four["num_images"] == 16
    for key in ("psnr", "psnr_y", "ssim", "lpips", "lpips_alex", "lpips_alex_release",
                "perplexity"):
        assert one[key] == pytest.approx(four[key], rel=1e-5), key
    np.testing.assert_array_equal(np.load(tmp_path / "one" / "eval" / "code_counts.npy"),
                                  np.load(tmp_path / "four" / "eval" / "code_counts.npy"))

    # The same numbers straight from the model on the 16 images at once: padding never counts.
    x = np.concatenate([b["image"][b["mask"]] for b in make_eval_iterator(
        config.data, batch_size=16)])
    assert x.shape[0] == 16
    x_rec, q = model.apply(variables, jnp.asarray(x), train=False)
    a, b = metrics.to_unit_range(x), metrics.to_unit_range(jnp.clip(x_rec, -1, 1))
    assert one["psnr"] == pytest.approx(float(jnp.mean(metrics.psnr(a, b))), rel=1e-5)
    assert one["ssim"] == pytest.approx(float(jnp.mean(metrics.ssim(a, b))), rel=1e-5)
    counts = np.bincount(np.asarray(q.indices).ravel(), minlength=config.quantizer.codebook_size)
    np.testing.assert_array_equal(np.load(tmp_path / "one" / "eval" / "code_counts.npy"), counts)
    assert one["utilization"] == metrics.utilization(counts)
    assert one["num_tokens"] == q.indices.size
    # The release's LPIPS scaling feeds [-3, 1]: a different (larger here) number.
    assert one["lpips_alex_release"] != pytest.approx(one["lpips_alex"], rel=1e-3)


def test_outputs_table_and_usage_plot(tmp_path):
    results, _, _ = _evaluate(_config(), str(tmp_path), 4)
    out = tmp_path / "eval"
    assert {"metrics.json", "metrics.md", "code_counts.npy", "code_usage.png",
            "reconstructions.png"} <= set(os.listdir(out))
    with open(out / "metrics.json") as f:
        assert json.load(f)["psnr"] == pytest.approx(results["psnr"])
    table = (out / "metrics.md").read_text()
    assert f"| PSNR (RGB) | {results['psnr']:.2f} |" in table
    assert f"| Codebook utilisation | {results['utilization']:.2%} |" in table
    assert "rFID" not in table  # rFID is off in this config, so no row pretends otherwise
    assert results["images_per_second"] > 0 and results["num_devices"] == 4


def test_source_iterator_yields_the_same_examples_as_the_crops(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(20, 31), (40, 24), (17, 17), (33, 50), (25, 18)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(tmp_path / f"{i}.png")
    config = _config(**{"data.kind": "folder", "data.path": str(tmp_path),
                        "data.resize_shorter": 16})
    crops = list(make_eval_iterator(config.data, batch_size=2, shard_index=1, shard_count=2))
    raw = list(make_eval_source_iterator(config.data, lambda im: np.asarray(im.shape, np.int32),
                                         (3,), np.int32, batch_size=2, shard_index=1,
                                         shard_count=2))
    # Shard 1 of 2 holds examples 1 and 3 of 5, then a batch of padding (every shard runs
    # ceil(ceil(5 / 2) / 2) = 2 batches).
    assert len(raw) == len(crops) == 2
    for r, c in zip(raw, crops):
        np.testing.assert_array_equal(r["mask"], c["mask"])
    np.testing.assert_array_equal(raw[0]["image"], [[40, 24, 3], [33, 50, 3]])
    assert not raw[1]["mask"].any() and not raw[1]["image"].any()


@pytest.mark.parametrize("protocol", inception.PROTOCOLS)
def test_host_resize_equals_the_device_resize(protocol):
    image = np.random.default_rng(1).integers(0, 256, (37, 52, 3), np.uint8)
    host = inception.HostResize(protocol)(image)
    assert host.shape == (299, 299, 3) and host.dtype == np.float32
    np.testing.assert_allclose(inception.preprocess(host[None], protocol),
                               inception.preprocess(image[None], protocol), atol=2e-5)


@pytest.fixture
def random_inception(monkeypatch):
    """inception.load returns the real network with random weights (the file is not needed)."""
    params = jax.jit(inception.InceptionV3().init)(
        jax.random.key(0), jnp.zeros((1, 299, 299, 3)))["params"]

    def load(path, protocol="clean", precision=jax.lax.Precision.DEFAULT):
        return inception.InceptionFeatureExtractor(params, protocol=protocol, source="random",
                                                   path=path, precision=precision)
    monkeypatch.setattr(inception, "load", load)


@pytest.mark.slow
def test_rfid_on_one_and_four_devices_and_both_references(tmp_path, random_inception):
    # 6 images, batch 4 (padded), Inception on every device; demo records are the crops
    # themselves, so the raw-image reference must give the centre-crop one's rFID.
    overrides = {"eval.batch_size": 4, "data.eval_max_images": 6, "eval.rfid": True,
                 "eval.rfid_raw_reference": True, "eval.inception_path": "random",
                 "eval.fid_cache": str(tmp_path / "stats")}
    one, _, _ = _evaluate(_config(**overrides), str(tmp_path / "one"), 1)
    cached = os.listdir(tmp_path / "stats")
    assert len(cached) == 2 and all(f.endswith(".npz") for f in cached)  # one per reference
    four, _, _ = _evaluate(_config(**overrides), str(tmp_path / "four"), 4)  # cached references
    assert np.isfinite(one["rfid"]) and one["rfid"] > 0
    assert four["rfid"] == pytest.approx(one["rfid"], rel=1e-4)
    assert one["rfid_raw"] == pytest.approx(one["rfid"], rel=1e-4)
    assert "raw (uncropped)" in one["rfid_raw_protocol"] and "(6)" in one["rfid_raw_protocol"]
    assert "| rFID (raw-image reference" in (tmp_path / "four" / "eval" / "metrics.md").read_text()
