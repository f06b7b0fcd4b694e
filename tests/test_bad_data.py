"""Bad data: odd image modes decode correctly, unreadable files are skipped, counted and named,
and too many of them stop the run with a clear message before any batch."""
import logging
import os
import struct
import zlib

import ml_collections
import numpy as np
import pytest
from PIL import Image

from vqlc import data
from vqlc.data import pipeline
from vqlc.data import sources
from vqlc.data import transforms

JPEG_TOLERANCE = 3  # a solid-colour JPEG decodes to within a few levels of its colour


def make_cfg(root, **overrides):
    cfg = ml_collections.ConfigDict(dict(
        kind="folder", path=str(root), eval_path="", name="", train_split="train",
        eval_split="validation", image_size=8, resize_shorter=0, num_workers=0,
        eval_max_images=0, demo_photo_size=160, check_images=True, max_bad_fraction=0.5))
    cfg.update(overrides)
    return cfg


def write_png_rgb16(path, rgb16: np.ndarray):
    """A 16-bit-per-channel RGB PNG, written by hand (PIL cannot write this mode)."""
    height, width, _ = rgb16.shape
    rows = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind, payload):
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                + chunk(b"IEND", b""))


def noise(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def write_bad_folder(root):
    """Each kind of file in one folder. Returns {good file: its expected solid RGB colour}."""
    os.makedirs(root)
    good = {}

    def solid(name, colour, size=(12, 16), mode="RGB", expected=None, **save):
        array = np.empty(size + (len(mode),), np.uint8)
        array[...] = colour
        Image.fromarray(array.squeeze(-1) if len(mode) == 1 else array, mode).save(
            os.path.join(root, name), **save)
        good[name] = tuple(expected if expected is not None else colour)

    solid("a_rgb.jpg", (200, 30, 30), quality=95)
    solid("b_rgb.png", (30, 200, 30))
    solid("c_gray.png", (90,), mode="L", expected=(90, 90, 90))
    # CMYK JPEG: PIL's own CMYK -> RGB is the reference (c=0, m=255, y=255, k=0 is red-ish).
    solid("d_cmyk.jpg", (0, 0, 255, 60), mode="CMYK", quality=95)
    with Image.open(os.path.join(root, "d_cmyk.jpg")) as image:
        assert image.mode == "CMYK"
        good["d_cmyk.jpg"] = tuple(int(v) for v in np.asarray(image.convert("RGB"))[5, 5])
    # RGBA, fully transparent: composited on white, whatever RGB the pixels hold.
    solid("e_rgba.png", (10, 20, 30, 0), mode="RGBA", expected=(255, 255, 255))
    Image.fromarray(np.full((10, 9), 150 * 257, np.uint16)).save(os.path.join(root, "f_16.png"))
    good["f_16.png"] = (150, 150, 150)
    write_png_rgb16(os.path.join(root, "g_rgb16.png"),
                    np.broadcast_to(np.array([257 * 40, 257 * 120, 65535], np.uint16), (7, 6, 3)))
    good["g_rgb16.png"] = (40, 120, 255)
    solid("h_tiny.png", (120, 60, 180), size=(5, 3))  # smaller than the 8 x 8 crop
    solid("i_sliver.png", (60, 60, 220), size=(40, 1))  # one pixel wide

    # Unreadable: found by the header check at construction...
    (root / "x_random.jpg").write_bytes(np.random.default_rng(1).bytes(700))
    (root / "x_empty.png").write_bytes(b"")
    (root / "x_text.jpg").write_text("this is not a JPEG\n")
    # ... and only when decoded: truncated pixel data behind a valid header.
    for name, fmt in (("c_truncated.jpg", "JPEG"), ("g_truncated.png", "PNG")):
        path = os.path.join(root, name)
        Image.fromarray(noise((48, 48, 3))).save(path, format=fmt)
        with open(path, "rb") as f:
            payload = f.read()
        with open(path, "wb") as f:
            f.write(payload[:len(payload) // 2])
    # Not images by extension: ignored (neither read nor counted).
    (root / "notes.txt").write_text("hello")
    (root / "README").write_text("about this folder")
    return good


HEADER_BAD = ("x_empty.png", "x_random.jpg", "x_text.jpg")
DECODE_BAD = ("c_truncated.jpg", "g_truncated.png")


def colour_of(image_pm1: np.ndarray, good: dict) -> str:
    """The good file whose solid colour a [-1, 1] image shows (asserting it is that colour)."""
    pixels = np.rint((image_pm1 + 1.0) * 127.5).reshape(-1, 3)
    for name, colour in good.items():
        tolerance = JPEG_TOLERANCE if name.endswith(".jpg") else 0
        if np.all(np.abs(pixels - np.array(colour)) <= tolerance):
            return name
    raise AssertionError(f"image is none of the good images: {np.unique(pixels, axis=0)[:5]}")


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad") / "images"
    return root, write_bad_folder(root)


def test_modes_decode_to_expected_values(tmp_path):
    # Every good file of the folder, decoded directly: the expected solid colour everywhere.
    good = write_bad_folder(tmp_path / "f")
    for name, colour in good.items():
        image = sources.load_image(str(tmp_path / "f" / name))
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
        tolerance = JPEG_TOLERANCE if name.endswith(".jpg") else 0
        assert np.abs(image.astype(int) - colour).max() <= tolerance, name

    # 16-bit extremes; LA and a palette with a transparent index on white; 1-bit.
    ramp = np.array([[0, 257, 65535]], np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    np.testing.assert_array_equal(sources.load_image(str(tmp_path / "ramp16.png"))[0, :, 0],
                                  [0, 1, 255])
    la = np.array([[[40, 255], [40, 0]]], np.uint8)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(sources.load_image(str(tmp_path / "la.png"))[0],
                                  [[40, 40, 40], [255, 255, 255]])
    palette = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.save(tmp_path / "p.png", transparency=0)
    np.testing.assert_array_equal(sources.load_image(str(tmp_path / "p.png"))[0],
                                  [[255, 255, 255], [200, 100, 50]])
    Image.fromarray(np.array([[0, 255]], np.uint8)).convert("1").save(tmp_path / "bw.png")
    np.testing.assert_array_equal(sources.load_image(str(tmp_path / "bw.png"))[0],
                                  [[0, 0, 0], [255, 255, 255]])


def test_small_and_sliver_images_resize_up():
    for shape in ((5, 3, 3), (3, 5, 3), (1, 1, 3), (40, 1, 3), (1, 3, 3)):
        image = noise(shape)
        train = transforms.TrainTransform(8, 8).random_map({"image": image},
                                                           np.random.default_rng(0))["image"]
        evaluated = transforms.EvalTransform(8, 8).map({"image": image})["image"]
        assert train.shape == evaluated.shape == (8, 8, 3)
    # A 1 x 100,000 sliver is centre-cropped to 1:32 before scaling (not a 20 GB resize).
    assert transforms.resize_shorter_side(noise((1, 100_000, 3)), 8).shape == (8, 256, 3)
    assert transforms.resize_shorter_side(noise((64, 2, 3)), 4).shape == (128, 4, 3)


def test_folder_scan_skips_counts_and_names(bad_folder, caplog):
    root, good = bad_folder
    with caplog.at_level(logging.WARNING, logger="vqlc.data.sources"):
        folder = sources.ImageFolder(str(root), max_bad_fraction=0.5)
    names = [os.path.basename(p) for p in folder.paths]
    assert names == sorted(list(good) + list(DECODE_BAD))  # README, notes.txt: not images
    assert [name for name, _ in folder.bad_files] == list(HEADER_BAD)
    assert dict(folder.bad_files)["x_empty.png"] == "empty file (0 bytes)"
    summary = [r.getMessage() for r in caplog.records if "unreadable skipped" in r.getMessage()]
    assert len(summary) == 1 and "11 images, 3 unreadable skipped" in summary[0]
    assert all(name in summary[0] for name in HEADER_BAD)

    # Decode-time failures: try_read gives None (logged once), [] gives the next good record.
    caplog.clear()
    index = names.index("c_truncated.jpg")
    with caplog.at_level(logging.WARNING, logger="vqlc.data.sources"):
        assert folder.try_read(index) is None
        assert folder.try_read(index) is None
        record = folder[index]
    assert sum("c_truncated.jpg" in r.getMessage() for r in caplog.records) == 1
    assert folder.bad_files[-1][0] == "c_truncated.jpg"
    following = folder.try_read(index + 1)["image"]
    np.testing.assert_array_equal(record["image"], following)

    # Without the header check the three non-images are decode-time failures instead.
    unchecked = sources.ImageFolder(str(root), check_images=False, max_bad_fraction=0.5)
    assert len(unchecked) == 14 and unchecked.bad_files == []
    assert unchecked.try_read([os.path.basename(p) for p in unchecked.paths].index(
        "x_text.jpg")) is None


def test_train_iterator_yields_exactly_the_good_images(bad_folder, caplog):
    root, good = bad_folder
    cfg = make_cfg(root)
    with caplog.at_level(logging.WARNING, logger="vqlc.data.sources"):
        iterator = data.make_train_iterator(cfg, batch_size=11, seed=3)
        epoch = [next(iterator)]  # 11 records: 9 good + 2 truncated
    seen = [colour_of(image, good) for batch in epoch for image in batch["image"]]
    # Each truncated file is replaced by its successor in sorted order (a good file here).
    order = sorted(list(good) + list(DECODE_BAD))
    expected = list(good) + [order[order.index(name) + 1] for name in DECODE_BAD]
    assert set(expected) <= set(good)
    assert sorted(seen) == sorted(expected)
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert all(name in logged for name in HEADER_BAD + DECODE_BAD)

    # Same batches from two worker processes (which log the truncated files to their stderr).
    workers = data.make_train_iterator(make_cfg(root, num_workers=2), batch_size=11, seed=3)
    try:
        for batch in epoch:
            np.testing.assert_array_equal(next(workers)["image"], batch["image"])
    finally:
        workers.close()


def test_eval_iterator_masks_the_unreadable(bad_folder, caplog):
    root, good = bad_folder
    cfg = make_cfg(root)
    assert data.num_eval_examples(cfg) == 11
    with caplog.at_level(logging.WARNING, logger="vqlc.data.sources"):
        batches = list(data.make_eval_iterator(cfg, batch_size=4))
    assert len(batches) == 3
    masks = np.concatenate([b["mask"] for b in batches])
    assert int(masks.sum()) == len(good)  # 12 rows: 9 good, 2 truncated, 1 padding
    images = np.concatenate([b["image"] for b in batches])
    assert sorted(colour_of(image, good) for image in images[masks]) == sorted(good)
    assert np.all(images[~masks] == 0.0)
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert all(name in logged for name in DECODE_BAD)

    # The raw-image evaluation (rFID reference) masks the same examples.
    raw = list(data.make_eval_source_iterator(
        cfg, lambda image: transforms.resize_shorter_side(image, 8)[:8, :8], (8, 8, 3),
        np.uint8, batch_size=4))
    np.testing.assert_array_equal(np.concatenate([b["mask"] for b in raw]), masks)


def test_too_much_bad_data_fails_clearly(bad_folder):
    root, _ = bad_folder
    # Header check: 3 of 14 files (21%) > 10%: fails when the iterator is built.
    with pytest.raises(sources.BadDataError,
                       match=r"3 of 14 records \(21\.43%\) are unreadable, more than "
                             r"data\.max_bad_fraction=0\.1 allows: x_empty\.png \(empty file"):
        data.make_train_iterator(make_cfg(root, max_bad_fraction=0.1), batch_size=5, seed=0)
    with pytest.raises(sources.BadDataError, match="data.max_bad_fraction"):
        data.make_eval_iterator(make_cfg(root, max_bad_fraction=0.1), batch_size=4)
    # 3 of 14 pass at 25%, but the first truncated file read makes it 4 of 14 (29%; 5 when
    # the reading threads find both truncated files at once).
    cfg = make_cfg(root, max_bad_fraction=0.25)
    with pytest.raises(sources.BadDataError, match=r"found while decoding.*[45] of 14 records"):
        list(data.make_eval_iterator(cfg, batch_size=4))
    # Nothing readable at all.
    empty = root.parent / "all_bad"
    empty.mkdir()
    (empty / "a.jpg").write_text("no")
    with pytest.raises(sources.BadDataError, match="none of its 1 image files can be opened"):
        pipeline.make_source(make_cfg(empty, max_bad_fraction=1.0), "train")


def test_feature_extraction_records_replace_the_unreadable(bad_folder):
    # The codebook's feature extraction reads source[i] too: no error, the successor's image.
    from vqlc.codebook import features
    root, good = bad_folder
    folder = pipeline.make_source(make_cfg(root), "train")
    names = [os.path.basename(p) for p in folder.paths]
    record = features._Record(folder, np.arange(len(folder)), lambda image: image[:1, :1],
                              None, 0)
    pixels = [record.map(i)["image"][0, 0] for i in range(len(folder))]
    index = names.index("g_truncated.png")
    np.testing.assert_array_equal(pixels[index], good[names[index + 1]])
    assert [name for name, _ in folder.bad_files] == list(HEADER_BAD) + list(DECODE_BAD)
