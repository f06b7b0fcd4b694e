"""Feature extraction to disk shards: pooling, resume after a crash, streaming reader, devices,
processes, refusal to mix settings."""
import json
import os

import jax
import numpy as np
import pytest

from vqlc.codebook import backbones
from vqlc.codebook import features
from vqlc.models import clip

TINY_CLIP = clip.ClipVisionConfig(image_size=16, patch_size=4, hidden_size=32, num_layers=1,
                                  num_heads=2, intermediate_size=64, projection_dim=16)


class ArraySource:
    """A handful of generated images of different sizes, labels 0..2."""

    def __init__(self, n, seed=0):
        rng = np.random.default_rng(seed)
        self.records = []
        for i in range(n):
            h, w = 18 + (i % 3) * 3, 20 + (i % 4) * 2
            base = rng.integers(0, 256, (h // 2 + 1, w // 2 + 1, 3))
            image = np.repeat(np.repeat(base, 2, 0), 2, 1)[:h, :w]  # some spatial structure
            self.records.append({"image": image.astype(np.uint8), "label": i % 3})

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.records[int(i)]


@pytest.fixture(scope="module")
def tiny_clip():
    return backbones._from_clip_extractor(clip.random_init(TINY_CLIP, seed=1), "random_init")


@pytest.fixture(scope="module")
def vgg():
    return backbones.vgg16_backbone("relu2_2", 16)  # 8x8 grid of 128-d


def _extract(backbone, source, directory, **kw):
    args = dict(pool=2, batch_size=4, images_per_shard=6, progress=False)
    args.update(kw)
    return features.extract_features(backbone, source, str(directory), **args)


def _reference_features(backbone, source, pool):
    """Brute force: every image alone through the backbone, pooled with numpy loops."""
    rows = []
    g, w = backbone.grid_size, pool
    for i in range(len(source)):
        image = backbone.preprocess_image(source[i]["image"])[None]
        f = np.asarray(backbone.features_fn(backbone.params, image))[0].reshape(g, g, -1)
        for a in range(g // w):
            for b in range(g // w):
                rows.append(f[a * w:(a + 1) * w, b * w:(b + 1) * w].mean(axis=(0, 1)))
    return np.stack(rows)


def test_pooling_equals_numpy_loops():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 64, 5)).astype(np.float32)
    for window in (1, 2, 4, 8):
        out = np.asarray(features.pool_patches(x, 8, window))
        h = 8 // window
        ref = np.zeros((3, h * h, 5), np.float32)
        for b in range(3):
            grid = x[b].reshape(8, 8, 5)
            for i in range(h):
                for j in range(h):
                    ref[b, i * h + j] = grid[i * window:(i + 1) * window,
                                             j * window:(j + 1) * window].mean(axis=(0, 1))
        np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="does not divide"):
        features.pool_patches(x, 8, 3)


def test_extraction_matches_per_image_reference(tiny_clip, tmp_path):
    source = ArraySource(10)
    shards = _extract(tiny_clip, source, tmp_path / "f")
    assert shards.num_rows == 10 * 4 and shards.dim == 16 and shards.rows_per_image == 4
    np.testing.assert_allclose(shards.load(), _reference_features(tiny_clip, source, 2),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(shards.image_indices(), np.repeat(np.arange(10), 4))
    np.testing.assert_array_equal(shards.labels(), np.repeat(np.arange(10) % 3, 4))
    # Shards hold images [6 s, 6 s + 6); the manifest lists them with their row counts.
    assert sorted(d for d in os.listdir(tmp_path / "f") if d.startswith("shard")) == [
        "shard-000000-p000", "shard-000001-p000"]
    with open(tmp_path / "f" / "manifest-p000.json") as f:
        manifest = json.load(f)
    assert [(e["shard"], e["rows"], e["images"]) for e in manifest["shards"]] == [
        (0, 24, 6), (1, 16, 4)]


def test_resume_after_crash_loses_and_duplicates_nothing(tiny_clip, tmp_path, monkeypatch):
    source = ArraySource(23)
    reference = _extract(tiny_clip, source, tmp_path / "ref")
    real_write, calls = features._write_shard, {"n": 0}

    def crash_on_third_shard(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(features, "_write_shard", crash_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        _extract(tiny_clip, source, tmp_path / "crash")
    monkeypatch.setattr(features, "_write_shard", real_write)
    done = sorted(d for d in os.listdir(tmp_path / "crash") if d.startswith("shard"))
    assert done == ["shard-000000-p000", "shard-000001-p000"]
    with pytest.raises(ValueError, match="incomplete"):
        features.FeatureShards(str(tmp_path / "crash"))
    # A shard half-written when the process died is a hidden temporary: ignored, then replaced.
    os.makedirs(tmp_path / "crash" / ".tmp-shard-000002-p000")
    mtimes = {d: os.path.getmtime(tmp_path / "crash" / d) for d in done}
    resumed = _extract(tiny_clip, source, tmp_path / "crash")
    assert {d: os.path.getmtime(tmp_path / "crash" / d) for d in done} == mtimes  # not redone
    assert not [d for d in os.listdir(tmp_path / "crash") if d.startswith(".tmp")]
    indices = resumed.image_indices()
    np.testing.assert_array_equal(indices, np.repeat(np.arange(23), 4))  # each image once
    np.testing.assert_array_equal(resumed.labels(), reference.labels())
    # Batches straddle shards differently after the resume (6 images/shard, 4/batch).
    np.testing.assert_allclose(resumed.load(), reference.load(), rtol=1e-5, atol=1e-6)


def test_iter_chunks_and_gather_match_load(tiny_clip, tmp_path):
    shards = _extract(tiny_clip, ArraySource(13), tmp_path / "f", dtype="float16")
    everything = shards.load()
    assert everything.dtype == np.float32 and everything.shape == (52, 16)
    for rows in (1, 7, 24, 52, 1000):
        chunks = list(shards.iter_chunks(rows))
        assert all(c.dtype == np.float32 and len(c) == rows for c in chunks[:-1])
        np.testing.assert_array_equal(np.concatenate(chunks), everything)
    picks = np.random.default_rng(0).integers(0, 52, 40)  # any order, repeats
    np.testing.assert_array_equal(shards.load(picks), everything[picks])
    mm, labels = shards.class_sorted_memmap(str(tmp_path / "by_class.npy"))
    order = np.argsort(shards.labels(), kind="stable")
    np.testing.assert_array_equal(np.asarray(mm, np.float32), everything[order])
    np.testing.assert_array_equal(labels, shards.labels()[order])
    assert shards.mean_norm() == pytest.approx(
        np.linalg.norm(everything.astype(np.float64), axis=1).mean(), rel=1e-6)


def test_four_devices_equal_one(vgg, tmp_path):
    assert len(jax.devices()) == 4
    source = ArraySource(11)
    one = _extract(vgg, source, tmp_path / "one", batch_size=8, devices=jax.devices()[:1])
    four = _extract(vgg, source, tmp_path / "four", batch_size=8, devices=jax.devices())
    np.testing.assert_allclose(four.load(), one.load(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(one.load()[:16], _reference_features(vgg, ArraySource(1), 2),
                               rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="divisible"):
        _extract(vgg, source, tmp_path / "bad", batch_size=6, devices=jax.devices())


def test_processes_split_the_shards(tiny_clip, tmp_path):
    source = ArraySource(20)
    single = _extract(tiny_clip, source, tmp_path / "single")
    directory = tmp_path / "multi"
    assert _extract(tiny_clip, source, directory, process_index=1, process_count=2,
                    batch_size=8) is None
    assert sorted(d for d in os.listdir(directory) if d.startswith("shard")) == [
        "shard-000001-p001", "shard-000003-p001"]
    both = _extract(tiny_clip, source, directory, process_index=0, process_count=2,
                    batch_size=8)
    assert sorted(d for d in os.listdir(directory) if d.startswith("shard")) == [
        "shard-000000-p000", "shard-000001-p001", "shard-000002-p000", "shard-000003-p001"]
    np.testing.assert_array_equal(both.image_indices(), single.image_indices())
    np.testing.assert_allclose(both.load(), single.load(), rtol=1e-5, atol=1e-6)


def test_other_settings_are_refused(tiny_clip, tmp_path):
    source = ArraySource(6)
    _extract(tiny_clip, source, tmp_path / "f")
    with pytest.raises(ValueError, match="other settings.*pool"):
        _extract(tiny_clip, source, tmp_path / "f", pool=1)
    with pytest.raises(ValueError, match="other settings.*dtype"):
        _extract(tiny_clip, source, tmp_path / "f", dtype="float16")
    with pytest.raises(ValueError, match="does not divide"):
        _extract(tiny_clip, source, tmp_path / "g", pool=3)
    with pytest.raises(ValueError, match="dtype"):
        _extract(tiny_clip, source, tmp_path / "g", dtype="bfloat16")


def test_features_of_other_weights_are_refused(tmp_path):
    source = ArraySource(6)
    for seed in (1, 2):
        backbone = backbones._from_clip_extractor(clip.random_init(TINY_CLIP, seed=seed),
                                                  "random_init")
        if seed == 1:
            _extract(backbone, source, tmp_path / "f")
    with pytest.raises(ValueError, match="other settings.*backbone"):
        _extract(backbone, source, tmp_path / "f")
