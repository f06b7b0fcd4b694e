"""Tests for vqlc.data: decoding, transforms, demo/folder/tfds sources and the grain pipelines."""
import os
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
import pytest
from PIL import Image

from vqlc import data
from vqlc.data import pipeline
from vqlc.data import sources
from vqlc.data import transforms


def make_cfg(**overrides):
    cfg = ml_collections.ConfigDict(dict(
        kind="demo", path="", eval_path="", name="", train_split="train",
        eval_split="validation", image_size=64, resize_shorter=0, num_workers=0,
        eval_max_images=0, demo_photo_size=160))
    cfg.update(overrides)
    return cfg


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def write_indexed_folder(root, sizes):
    """Writes PNGs whose pixels all equal their index (10 * i), one per (height, width)."""
    os.makedirs(root, exist_ok=True)
    for i, (height, width) in enumerate(sizes):
        image = np.full((height, width, 3), 10 * i, np.uint8)
        Image.fromarray(image).save(os.path.join(root, f"img_{i:02d}.png"))


def fill_values(batch):
    """The uint8 fill value of each image of a batch of constant images."""
    pixels = np.rint((batch["image"][:, 0, 0, 0] + 1.0) * 127.5).astype(int)
    return pixels.tolist()


# ----------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------

def test_resize_shorter_side_matches_pil_bicubic():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    out = transforms.resize_shorter_side(image, 20)
    expected = np.asarray(Image.fromarray(image).resize((33, 20), Image.Resampling.BICUBIC))
    assert out.shape == (20, 33, 3)
    np.testing.assert_array_equal(out, expected)
    tall = transforms.resize_shorter_side(image.transpose(1, 0, 2), 20)
    assert tall.shape == (33, 20, 3)
    assert transforms.resize_shorter_side(image, 30) is image


def test_crops():
    image = np.arange(10 * 12 * 3, dtype=np.int64).reshape(10, 12, 3).astype(np.uint8)
    np.testing.assert_array_equal(transforms.center_crop(image, 4), image[3:7, 4:8])
    crops = set()
    for seed in range(50):
        first = transforms.random_crop(image, 4, np.random.default_rng(seed))
        again = transforms.random_crop(image, 4, np.random.default_rng(seed))
        np.testing.assert_array_equal(first, again)
        top, left = np.argwhere((image[..., 0] == first[0, 0, 0]))[0]
        np.testing.assert_array_equal(first, image[top:top + 4, left:left + 4])
        crops.add((int(top), int(left)))
    assert len(crops) > 20  # 7 x 9 possible positions, drawn uniformly
    with pytest.raises(ValueError):
        transforms.center_crop(image, 11)


def test_to_float_range():
    values = np.array([0, 1, 127, 128, 255], np.uint8)
    np.testing.assert_allclose(transforms.to_float(values), values / 127.5 - 1.0, atol=1e-6)
    assert transforms.to_float(values).dtype == np.float32


# ----------------------------------------------------------------------------------------------
# Decoding and ImageFolder
# ----------------------------------------------------------------------------------------------

def test_decode_modes(tmp_path):
    # RGBA: transparent pixel -> white, opaque pixel kept, half-transparent black -> mid grey.
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 0)
    rgba[0, 1] = (10, 20, 30, 255)
    rgba[0, 2] = (0, 0, 0, 128)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = sources.load_image(str(tmp_path / "rgba.png"))
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    np.testing.assert_array_equal(out[0, 0], (255, 255, 255))
    np.testing.assert_array_equal(out[0, 1], (10, 20, 30))
    np.testing.assert_allclose(out[0, 2], 127, atol=1)

    # Grayscale -> replicated channels.
    Image.fromarray(np.full((4, 5), 77, np.uint8), "L").save(tmp_path / "gray.png")
    np.testing.assert_array_equal(sources.load_image(str(tmp_path / "gray.png")), 77)

    # 16-bit grayscale: 257 * k -> k.
    sixteen = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 20 * 257)
    Image.fromarray(sixteen).save(tmp_path / "deep.png")
    out = sources.load_image(str(tmp_path / "deep.png"))
    np.testing.assert_array_equal(out[..., 0], sixteen // 257)
    np.testing.assert_array_equal(out[..., 2], sixteen // 257)

    # Palette GIF and CMYK JPEG: same as PIL's own RGB conversion.
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(rgb).quantize(16).save(tmp_path / "pal.gif")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    for name in ("pal.gif", "cmyk.jpg"):
        with Image.open(tmp_path / name) as image:
            expected = np.asarray(image.convert("RGB"))
        np.testing.assert_array_equal(sources.load_image(str(tmp_path / name)), expected)

    # EXIF orientation 6 ("rotate 90 degrees clockwise to display").
    wide = np.random.default_rng(1).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(wide).save(tmp_path / "rotated.png", exif=exif)
    np.testing.assert_array_equal(
        sources.load_image(str(tmp_path / "rotated.png")), np.rot90(wide, k=-1))


def test_image_folder_scan_labels_and_errors(tmp_path):
    pixel = Image.fromarray(np.zeros((2, 2, 3), np.uint8))
    for relpath in ("b/x.PNG", "a/y.jpeg", "a/sub/z.png", "a/.hidden.png", "a/notes.txt",
                    ".cache/w.png"):
        os.makedirs(tmp_path / os.path.dirname(relpath), exist_ok=True)
        if relpath.endswith(".txt"):
            (tmp_path / relpath).write_text("not an image")
        else:
            pixel.save(tmp_path / relpath, format="JPEG" if "jpeg" in relpath else "PNG")
    folder = sources.ImageFolder(str(tmp_path))
    assert [os.path.relpath(p, tmp_path) for p in folder.paths] == [
        os.path.join("a", "sub", "z.png"), os.path.join("a", "y.jpeg"), os.path.join("b", "x.PNG")]
    assert folder.labels == [0, 0, 1]
    assert folder.classes == ["a", "b"]
    assert folder[2]["image"].shape == (2, 2, 3) and folder[2]["label"] == 1

    pixel.save(tmp_path / "top.png")  # a root-level file forms group '' (label 0)
    assert sources.ImageFolder(str(tmp_path)).labels == [1, 1, 2, 0]  # top.png sorts last

    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"No images found under .*empty.*\.jpg"):
        sources.ImageFolder(str(empty))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sources.ImageFolder(str(tmp_path / "missing"))


# ----------------------------------------------------------------------------------------------
# Demo photos
# ----------------------------------------------------------------------------------------------

def test_demo_photos_splits():
    train = sources.DemoPhotos("train", photo_size=160, crop_size=64)
    assert len(train) == sources.DEMO_TRAIN_LENGTH == 10_000
    num_photos = len(sources.DEMO_TRAIN_PHOTOS)
    for i in range(num_photos):
        record = train[i]
        assert record["image"].dtype == np.uint8 and min(record["image"].shape[:2]) == 160
        assert record["label"] == i
        assert train[i + num_photos]["image"] is record["image"]
    assert not set(sources.DEMO_TRAIN_PHOTOS) & set(sources.DEMO_EVAL_PHOTOS)

    evaluation = sources.DemoPhotos("eval", photo_size=160, crop_size=64)
    # chelsea 300x451 and rocket 427x640 at shorter side 160 (160x241, 160x240: 4 x 6 crops)
    # and 320 (320x481, 320x480: 9 x 14 crops), 64 px crops at stride 32.
    assert len(evaluation) == 2 * (4 * 6 + 9 * 14) == 300
    assert len(evaluation) * (64 // 8) ** 2 >= 16_384  # enough tokens for a 512-code codebook
    crops = np.stack([evaluation[i]["image"] for i in range(len(evaluation))])
    assert crops.shape == (300, 64, 64, 3) and crops.dtype == np.uint8
    assert len({c.tobytes() for c in crops}) == 300  # all distinct
    again = sources.DemoPhotos("eval", photo_size=160, crop_size=64)
    np.testing.assert_array_equal(again[100]["image"], crops[100])


# ----------------------------------------------------------------------------------------------
# Training iterator
# ----------------------------------------------------------------------------------------------

def test_train_iterator_demo_deterministic_and_restorable():
    cfg = make_cfg()
    first = data.make_train_iterator(cfg, batch_size=8, seed=3)
    batches = take(first, 3)
    batch = batches[0]
    assert set(batch) == {"image"}
    assert batch["image"].shape == (8, 64, 64, 3) and batch["image"].dtype == np.float32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    uint8_values = (batch["image"] + 1.0) * 127.5
    np.testing.assert_allclose(uint8_values, np.rint(uint8_values), atol=1e-3)

    state = first.get_state()
    expected = take(first, 3)

    same_seed = take(data.make_train_iterator(cfg, batch_size=8, seed=3), 3)
    for a, b in zip(batches, same_seed):
        np.testing.assert_array_equal(a["image"], b["image"])
    other_seed = next(data.make_train_iterator(cfg, batch_size=8, seed=4))
    assert not np.array_equal(other_seed["image"], batch["image"])

    restored = data.make_train_iterator(cfg, batch_size=8, seed=3)
    restored.set_state(state)
    for a, b in zip(expected, take(restored, 3)):
        np.testing.assert_array_equal(a["image"], b["image"])


def test_train_iterator_folder_epochs_and_sharding(tmp_path):
    # Six constant images (values 0, 10, ..., 50) of various sizes; crops keep the value.
    write_indexed_folder(tmp_path / "train", [(20, 30), (40, 24), (24, 24), (33, 50), (24, 70),
                                              (90, 26)])
    cfg = make_cfg(kind="folder", path=str(tmp_path / "train"), image_size=16, resize_shorter=24)
    single = take(data.make_train_iterator(cfg, batch_size=6, seed=0), 4)
    values = [fill_values(b) for b in single]
    for epoch in values:  # one batch = one epoch: a permutation of all records
        assert sorted(epoch) == [0, 10, 20, 30, 40, 50]
    assert len({tuple(v) for v in values}) > 1  # reshuffled per epoch

    # Two processes with half the batch: process p takes positions p, p + 2, ... of the same
    # global stream, so together they see exactly the single-process batches.
    shards = [take(data.make_train_iterator(cfg, batch_size=3, seed=0, shard_index=p,
                                            shard_count=2), 4) for p in range(2)]
    for b in range(4):
        np.testing.assert_array_equal(shards[0][b]["image"], single[b]["image"][0::2])
        np.testing.assert_array_equal(shards[1][b]["image"], single[b]["image"][1::2])


@pytest.mark.slow  # starting two worker processes takes several seconds
def test_train_iterator_num_workers_2_matches_in_process():
    # Batches are built before the worker processes split the stream, so they do not depend on
    # the number of workers. (Worker start-up dominates this test: a few seconds.)
    iterator = data.make_train_iterator(make_cfg(num_workers=2), batch_size=4, seed=1)
    try:
        with_workers = take(iterator, 3)
        assert "iterators_in_use_states" in iterator.get_state()  # per-worker state, restorable
    finally:
        iterator.close()
    in_process = data.make_train_iterator(make_cfg(), batch_size=4, seed=1)
    for a, b in zip(with_workers, take(in_process, 3)):
        np.testing.assert_array_equal(a["image"], b["image"])


# ----------------------------------------------------------------------------------------------
# Evaluation iterator
# ----------------------------------------------------------------------------------------------

def test_eval_iterator_sharded_padded_and_complete(tmp_path):
    sizes = [(20, 30), (40, 24), (24, 24), (33, 50), (24, 70), (90, 26), (30, 30)]
    write_indexed_folder(tmp_path / "val", sizes)
    cfg = make_cfg(kind="folder", path=str(tmp_path / "missing_train"),
                   eval_path=str(tmp_path / "val"), image_size=16, resize_shorter=24)
    assert data.num_eval_examples(cfg) == 7
    seen = []
    for shard in range(2):
        batches = list(data.make_eval_iterator(cfg, batch_size=3, shard_index=shard,
                                               shard_count=2))
        assert len(batches) == 2  # 4 and 3 examples -> 2 batches each (same step count)
        for batch in batches:
            assert batch["image"].shape == (3, 16, 16, 3) and batch["image"].dtype == np.float32
            assert batch["mask"].shape == (3,) and batch["mask"].dtype == np.bool_
            assert np.all(batch["image"][~batch["mask"]] == 0.0)
            seen += [v for v, m in zip(fill_values(batch), batch["mask"]) if m]
        assert sum(int(b["mask"].sum()) for b in batches) == (4 if shard == 0 else 3)
    assert sorted(seen) == [0, 10, 20, 30, 40, 50, 60]

    cfg.eval_max_images = 5
    assert data.num_eval_examples(cfg) == 5
    batches = list(data.make_eval_iterator(cfg, batch_size=4))
    assert [b["mask"].tolist() for b in batches] == [[True] * 4, [True, False, False, False]]
    assert fill_values(batches[0]) + fill_values(batches[1])[:1] == [0, 10, 20, 30, 40]


def test_eval_transform_is_resize_then_centre_crop(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)
    os.makedirs(tmp_path / "val")
    Image.fromarray(image).save(tmp_path / "val" / "a.png")
    cfg = make_cfg(kind="folder", path=str(tmp_path / "val"), image_size=32, resize_shorter=40)
    batch = next(data.make_eval_iterator(cfg, batch_size=1))
    resized = np.asarray(Image.fromarray(image).resize((67, 40), Image.Resampling.BICUBIC))
    expected = resized[4:36, 17:49] / 127.5 - 1.0
    np.testing.assert_allclose(batch["image"][0], expected, atol=1e-6)
    assert batch["mask"].tolist() == [True]


def test_demo_eval_iterator_keeps_crops():
    cfg = make_cfg()
    source = sources.DemoPhotos("eval", photo_size=160, crop_size=64)
    batches = list(data.make_eval_iterator(cfg, batch_size=128))
    assert data.num_eval_examples(cfg) == len(source) == 300
    assert len(batches) == 3 and int(batches[2]["mask"].sum()) == 300 - 256
    images = np.concatenate([b["image"] for b in batches])[:300]
    expected = np.stack([source[i]["image"] for i in range(300)]) / 127.5 - 1.0
    np.testing.assert_allclose(images, expected, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# TFDS
# ----------------------------------------------------------------------------------------------

_TINY_BUILDER = textwrap.dedent('''
    import sys
    import numpy as np
    import tensorflow_datasets as tfds

    class TinyImages(tfds.core.GeneratorBasedBuilder):
        """Constant images: train value 10 * i (5 of them), validation 100 + 10 * i (3)."""
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(num_classes=3)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(5, 0),
                    "validation": self._generate_examples(3, 100)}

        def _generate_examples(self, count, offset):
            for i in range(count):
                image = np.full((20 + 3 * i, 24, 3), offset + 10 * i, np.uint8)
                yield str(i), {"image": image, "label": i % 3}

    TinyImages(data_dir=sys.argv[1], file_format="array_record").download_and_prepare()
''')


@pytest.fixture(scope="module")
def tiny_tfds_dir(tmp_path_factory):
    """Builds a tiny array_record tfds dataset (needs TensorFlow, so in a subprocess)."""
    data_dir = tmp_path_factory.mktemp("tfds")
    script = data_dir / "build_tiny.py"
    script.write_text(_TINY_BUILDER)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    subprocess.run([sys.executable, str(script), str(data_dir)], check=True, env=env,
                   capture_output=True, timeout=300)
    return str(data_dir)


@pytest.mark.slow  # building the dataset imports TensorFlow (several seconds)
def test_tfds_source_and_pipelines(tiny_tfds_dir):
    train = sources.TfdsImages("tiny_images", "train", data_dir=tiny_tfds_dir)
    assert len(train) == 5
    records = [train[i] for i in range(5)]
    values = sorted((int(r["image"][0, 0, 0]), r["label"], r["image"].shape) for r in records)
    assert values == [(10 * i, i % 3, (20 + 3 * i, 24, 3)) for i in range(5)]

    cfg = make_cfg(kind="tfds", name="tiny_images", path=tiny_tfds_dir, image_size=16,
                   resize_shorter=0)
    batch = next(data.make_train_iterator(cfg, batch_size=5, seed=0))
    assert batch["image"].shape == (5, 16, 16, 3)
    assert sorted(fill_values(batch)) == [0, 10, 20, 30, 40]
    assert data.num_eval_examples(cfg) == 3
    batches = list(data.make_eval_iterator(cfg, batch_size=2))
    assert [b["mask"].tolist() for b in batches] == [[True, True], [True, False]]
    valid = fill_values(batches[0]) + fill_values(batches[1])[:1]
    assert sorted(valid) == [100, 110, 120]


def test_tfds_missing_dataset_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tfds build imagenet2012"):
        sources.TfdsImages("imagenet2012", "train", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"not registered.*tfds build no_such_dataset"):
        sources.TfdsImages("no_such_dataset", "train", data_dir=str(tmp_path))


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="Unknown data.kind"):
        data.make_train_iterator(make_cfg(kind="webdataset"), batch_size=2, seed=0)
    with pytest.raises(ValueError, match="resize_shorter"):
        data.make_train_iterator(make_cfg(kind="folder", path=str(tmp_path), resize_shorter=32),
                                 batch_size=2, seed=0)
    with pytest.raises(ValueError, match="shard_index"):
        data.make_eval_iterator(make_cfg(), batch_size=2, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="photo_size"):
        data.make_train_iterator(make_cfg(demo_photo_size=32), batch_size=2, seed=0)
    assert pipeline.eval_shard_indices(5, 2, 1, 2).tolist() == [1, 3, -1, -1]
