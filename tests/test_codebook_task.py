"""The codebook task end to end: image folder -> tiny random CLIP features -> k-means ->
codebook.npy/json; the file trains an LC tokenizer; modes equal brute force; clear errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vqlc.configs import codebook_ffhq, codebook_imagenet
from vqlc.codebook import features, frozen, kmeans, task

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CLIP = dict(image_size=16, patch_size=4, hidden_size=32, num_layers=1, num_heads=2,
                 intermediate_size=64, projection_dim=16)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Two classes of 8 generated photos-like images of assorted sizes."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label, name in enumerate(("cats", "dogs")):
        os.makedirs(root / name)
        for i in range(8):
            h, w = 20 + 4 * (i % 3), 24 + 2 * (i % 4)
            base = rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)
            image = Image.fromarray(base).resize((w, h), Image.BILINEAR)
            image.save(root / name / f"{i}.png")
    return str(root)


def codebook_config(folder, **overrides):
    c = codebook_imagenet.get_config()
    c.data.kind = "folder"
    c.data.path = folder
    c.data.num_workers = 0
    c.backbone = "random_init"
    c.clip.random_config.update(TINY_CLIP)
    c.features.update(dict(pool=2, dim=16, batch_size=4, images_per_shard=5,
                           dtype="float32", progress=False))
    c.kmeans.update(dict(clusters_per_class=3, num_clusters=6, num_iters=10))
    c.update_from_flattened_dict(overrides)
    return c


@pytest.fixture(scope="module")
def per_class_run(image_folder, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("cb"))
    info = task.build_codebook(codebook_config(image_folder), workdir)
    return workdir, info


def test_writes_codebook_and_record(per_class_run):
    workdir, info = per_class_run
    codes = np.load(os.path.join(workdir, "codebook.npy"))
    assert codes.dtype == np.float32 and codes.shape == (6, 16)
    with open(os.path.join(workdir, "codebook.json")) as f:
        saved = json.load(f)
    for key in ("encoder", "layer", "pooling", "dataset", "num_images", "num_features", "K",
                "mode", "kmeans_iters", "inertia", "seed", "extraction_wall_s",
                "clustering_wall_s", "wall_time_s"):
        assert key in saved, key
    assert saved["num_images"] == 16 and saved["num_features"] == 64 and saved["K"] == 6
    assert saved["mode"] == "per_class" and saved["pooling"]["rows_per_image"] == 4
    assert saved["dataset"]["kind"] == "folder"
    # The release's recipe, recomputed from the stored features: 3 centres per class.
    shards = features.FeatureShards(os.path.join(workdir, "features"))
    x, labels = shards.load(), shards.labels()
    np.testing.assert_array_equal(labels, np.repeat([0] * 8 + [1] * 8, 4))
    expected = kmeans.fit_per_class(x, labels.astype(np.int64), 3, num_iters=10, seed=0,
                                    init="random")
    np.testing.assert_allclose(codes, expected, rtol=1e-5, atol=1e-5)
    brute = ((x[:, None].astype(np.float64) - codes[None]) ** 2).sum(-1).min(1).sum()
    assert saved["inertia"] == pytest.approx(brute, rel=1e-4)
    assert frozen.load_codebook(os.path.join(workdir, "codebook.npy"), 6, 16).shape == (6, 16)


def test_codebook_trains_a_tiny_lc_tokenizer(per_class_run, tmp_path):
    from tests.test_train import tiny_config
    from vqlc.train import reporting, trainer
    workdir, _ = per_class_run
    config = tiny_config(**{
        "codebook.path": os.path.join(workdir, "codebook.npy"), "codebook.build": "",
        "codebook.feature_dim": 16, "quantizer.codebook_size": 6, "train.num_steps": 2,
        "train.log_every": 1, "train.checkpoint_every": 2, "eval.at_end": False,
        "loss.perceptual_weight": 0.0})
    trainer.train_and_evaluate(config, str(tmp_path / "tok"))
    records = reporting.read_metrics(str(tmp_path / "tok"))
    assert records and all(np.isfinite(r["loss"]) for r in records)
    np.testing.assert_array_equal(np.load(tmp_path / "tok" / "codebook.npy"),
                                  np.load(os.path.join(workdir, "codebook.npy")))


def test_other_modes_equal_brute_force(per_class_run, image_folder, tmp_path):
    workdir, _ = per_class_run
    shared = {"features.dir": os.path.join(workdir, "features")}  # reuses the extraction
    x = features.FeatureShards(shared["features.dir"]).load()
    info = task.build_codebook(codebook_config(
        image_folder, **shared, **{"kmeans.mode": "global", "kmeans.num_clusters": 5}),
        str(tmp_path / "global"))
    codes = np.load(tmp_path / "global" / "codebook.npy")
    np.testing.assert_allclose(codes, kmeans.fit(x, 5, num_iters=10, seed=0, init="random"),
                               rtol=1e-5, atol=1e-5)
    assert info["in_memory"] is True
    # Streaming (features over the memory limit) gives the in-memory result.
    task.build_codebook(codebook_config(
        image_folder, **shared, **{"kmeans.mode": "global", "kmeans.num_clusters": 5,
                                   "kmeans.in_memory_limit_gb": 0.0}), str(tmp_path / "stream"))
    np.testing.assert_allclose(np.load(tmp_path / "stream" / "codebook.npy"), codes,
                               rtol=1e-4, atol=1e-4)
    # Per class beyond the memory limit: clustered from one class-sorted copy on disk.
    info = task.build_codebook(codebook_config(image_folder, **shared, **{
        "kmeans.in_memory_limit_gb": 0.0}), str(tmp_path / "pc_disk"))
    assert info["in_memory"] is False
    np.testing.assert_allclose(np.load(tmp_path / "pc_disk" / "codebook.npy"),
                               np.load(os.path.join(workdir, "codebook.npy")),
                               rtol=1e-5, atol=1e-5)
    task.build_codebook(codebook_config(
        image_folder, **shared, **{"kmeans.mode": "random_features", "kmeans.num_clusters": 7}),
        str(tmp_path / "rf"))
    picked = np.load(tmp_path / "rf" / "codebook.npy")
    assert picked.shape == (7, 16)
    assert all(np.any(np.all(x == row, axis=1)) for row in picked)  # each is a feature
    assert len(np.unique(picked, axis=0)) == 7
    info = task.build_codebook(codebook_config(
        image_folder, **{"kmeans.mode": "random_init", "kmeans.num_clusters": 9}),
        str(tmp_path / "ri"))
    normal = np.load(tmp_path / "ri" / "codebook.npy")
    assert normal.shape == (9, 16) and info["num_features"] == 0
    assert not os.path.exists(tmp_path / "ri" / "features")  # no data needed


def test_bad_settings_fail_before_any_work(image_folder, tmp_path):
    cases = [
        ({"backbone": "resnet"}, "backbone='resnet' is unknown"),
        ({"kmeans.mode": "hierarchical"}, "mode='hierarchical' is unknown"),
        ({"backbone": "clip"}, "huggingface-cli download openai/clip-vit-large-patch14"),
        ({"kmeans.mode": "global", "kmeans.num_clusters": 65}, "exceeds the 64 features"),
        ({"kmeans.clusters_per_class": 33, "kmeans.num_clusters": 66}, "fewer"),
        ({"kmeans.clusters_per_class": 3, "kmeans.num_clusters": 100}, "num_clusters=6"),
        ({"features.dim": 768}, "16-d features but features.dim=768"),
        ({"features.pool": 3}, "does not divide"),
        ({"features.dtype": "int8"}, "features.dtype"),
        ({"clip.dtype": "float16"}, "clip.dtype='float16'; valid: float32, bfloat16"),
    ]
    for overrides, message in cases:
        workdir = tmp_path / str(len(os.listdir(tmp_path)))
        with pytest.raises(ValueError, match=message):
            task.build_codebook(codebook_config(image_folder, **overrides), str(workdir))
        assert not os.path.exists(workdir / "features"), overrides
    # Features of another backbone / pooling in the same folder are refused.
    workdir = str(tmp_path / "mixed")
    task.build_codebook(codebook_config(image_folder), workdir)
    with pytest.raises(ValueError, match="other settings"):
        task.build_codebook(codebook_config(image_folder, **{"features.pool": 1}), workdir)


def test_configs_load_with_their_documented_settings():
    imagenet = codebook_imagenet.get_config()
    assert (imagenet.backbone, imagenet.features.pool, imagenet.kmeans.mode) == (
        "clip", 4, "per_class")
    assert imagenet.kmeans.clusters_per_class * 1000 == imagenet.kmeans.num_clusters == 100_000
    assert codebook_imagenet.get_config("random_init").kmeans.mode == "random_init"
    assert codebook_ffhq.get_config().kmeans.mode == "global"
    with pytest.raises(ValueError, match="Unknown config variant"):
        codebook_imagenet.get_config("nope")


def test_demo_cli_matches_the_tokenizers_built_in_codebook(tmp_path):
    """configs/codebook_demo.py:tiny through the CLI == codebook.build='task' of
    configs/default.py:tiny, so either route gives the demo tokenizer the same codebook."""
    from tests.test_train import tiny_config
    proc = subprocess.run(
        [sys.executable, "-m", "vqlc.main", "--config=configs/codebook_demo.py:tiny",
         f"--workdir={tmp_path / 'cli'}"], cwd=REPO, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tokenizer = tiny_config()
    codes = frozen.load_codebook(str(tmp_path / "cli" / "codebook.npy"),
                                 tokenizer.quantizer.codebook_size,
                                 tokenizer.codebook.feature_dim)
    built = task.prepare_tokenizer_codebook(tokenizer, str(tmp_path / "tok"))
    np.testing.assert_allclose(built, codes, rtol=1e-5, atol=1e-6)
    with open(tmp_path / "tok" / "codebook.json") as f:
        info = json.load(f)
    assert info["encoder"] == "vgg16:relu3_3" and info["num_images"] == 64
    assert np.mean(np.linalg.norm(codes, axis=1)) < 1.5  # rescaled: unit mean feature norm


GOLDEN_CLIP = os.path.join(REPO, "tests", "golden", "clip")


@pytest.mark.skipif(not os.path.isdir(os.path.join(GOLDEN_CLIP, "hf")),
                    reason="tiny CLIP golden snapshot not present")
def test_clip_backbone_features_match_transformers(tmp_path):
    """backbone='clip' from an HF snapshot: pooled shard rows == transformers' patch features
    (tests/golden/clip, written by make_clip_golden.py) pooled 2x2 with numpy."""
    from vqlc.codebook import backbones
    with np.load(os.path.join(GOLDEN_CLIP, "golden.npz")) as f:
        images, reference = f["batch"], f["features"]  # [5, 32, 32, 3], [5, 16, 24]
    config = codebook_imagenet.get_config()
    config.clip.path = os.path.join(GOLDEN_CLIP, "hf")
    backbone = backbones.make_backbone(config)
    assert (backbone.grid_size, backbone.feature_dim, backbone.image_size) == (4, 24, 32)
    source = [{"image": im, "label": 0} for im in images]
    shards = features.extract_features(backbone, source, str(tmp_path / "f"), pool=2,
                                       batch_size=4, images_per_shard=2, progress=False)
    grid = reference.reshape(5, 2, 2, 2, 2, 24).mean(axis=(2, 4)).reshape(5 * 4, 24)
    np.testing.assert_allclose(shards.load(), grid, rtol=1e-4, atol=1e-5)
