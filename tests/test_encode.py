"""The `encode` task and its reader: shards equal the Tokenizer on the same images (codes,
latents, flipped and ten-crop copies), a killed run resumes with every image once, temporaries
are ignored, another tokenizer or other settings are refused, the command line end to end."""
import os
import shutil
import subprocess
import sys

import grain
import numpy as np
import pytest

import tiny_tokenizer
from vqlc.configs import encode_demo
from vqlc import encode_task, parallel
from vqlc.data import encoded, sources, transforms
from vqlc.tokenizer import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_IMAGES, PER_SHARD, BATCH = 20, 6, 4  # shards of 6, 6, 6, 2 images; batches straddle nothing


@pytest.fixture(scope="module")
def tokdir(tmp_path_factory):
    return tiny_tokenizer.make_workdir(str(tmp_path_factory.mktemp("tok") / "run"))


@pytest.fixture(scope="module")
def tok(tokdir):
    return Tokenizer.load(tokdir, mesh=parallel.make_mesh())  # the 4 test devices, as the task


def _config(tokdir, **overrides):
    c = encode_demo.get_config("tiny")
    c.update_from_flattened_dict({
        "tokenizer.workdir": tokdir, "encode.max_images": NUM_IMAGES,
        "encode.images_per_shard": PER_SHARD, "encode.batch_size": BATCH, **overrides})
    return c


@pytest.fixture(scope="module")
def reference(tokdir, tmp_path_factory):
    """An uninterrupted run: codes + latents, each image and its mirror image."""
    workdir = str(tmp_path_factory.mktemp("enc") / "ref")
    results = encode_task.run(_config(tokdir), workdir)
    assert results["images_encoded"] == NUM_IMAGES and results["shards"] == 4
    return workdir


def _demo_crops(n, seed=0):
    """The demo's training crops, written out here without the task's code."""
    source = sources.DemoPhotos("train", photo_size=48, crop_size=16)
    crops = [transforms.seeded_train_crop(source[i]["image"], 16, 0, seed, i) for i in range(n)]
    return np.stack(crops), np.array([source[i]["label"] for i in range(n)])


def test_shards_equal_the_tokenizer_on_the_same_images(reference, tok):
    ds = encoded.EncodedDataset(reference, expect_tokenizer=tok)
    assert len(ds) == 2 * NUM_IMAGES
    images, labels = _demo_crops(NUM_IMAGES)
    np.testing.assert_array_equal(ds.column("indices"), np.repeat(np.arange(NUM_IMAGES), 2))
    np.testing.assert_array_equal(ds.column("aug"), np.tile([0, 1], NUM_IMAGES))
    np.testing.assert_array_equal(ds.column("labels"), np.repeat(labels, 2))
    codes, latents = ds.column("codes"), ds.column("latents")
    assert codes.dtype == np.int32 and codes.shape == (2 * NUM_IMAGES, 8, 8)
    assert latents.dtype == np.float32 and latents.shape == (2 * NUM_IMAGES, 8, 8, 8)
    flipped = np.ascontiguousarray(images[:, :, ::-1])
    np.testing.assert_array_equal(codes[0::2], tok.encode(images))
    np.testing.assert_array_equal(codes[1::2], tok.encode(flipped))
    np.testing.assert_allclose(latents[0::2], tok.encode_latents(images), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(latents[1::2], tok.encode_latents(flipped), rtol=1e-5, atol=1e-5)
    # One row, and the reader as a grain source.
    row = ds[5]
    assert set(row) == {"codes", "latents", "label", "index", "aug"}
    assert (int(row["index"]), int(row["aug"]), int(row["label"])) == (2, 1, labels[2])
    np.testing.assert_array_equal(row["codes"], codes[5])
    batch = next(iter(grain.MapDataset.source(ds).shuffle(seed=0).batch(8)))
    assert batch["codes"].shape == (8, 8, 8) and batch["latents"].shape == (8, 8, 8, 8)
    manifest = ds.manifest
    assert manifest["tokenizer"] == tok.identity() and manifest["num_images"] == NUM_IMAGES
    assert manifest["arrays"]["codes"]["shape"] == [8, 8]
    assert manifest["arrays"]["latents"] == {"shape": [8, 8, 8], "dtype": "float32"}
    assert sorted(os.listdir(os.path.join(reference, "shards"))) == [
        f"shard_0000{i}.npz" for i in range(4)]


def test_ten_crop_codes_only(tokdir, tok, tmp_path):
    n = 3
    encode_task.run(_config(tokdir, **{"encode.what": "codes", "encode.augment": "ten_crop",
                                       "encode.crop": "center", "encode.max_images": n}),
                    str(tmp_path / "enc"))
    ds = encoded.EncodedDataset(str(tmp_path / "enc"))
    assert len(ds) == 10 * n and "latents" not in ds[0]
    np.testing.assert_array_equal(ds.column("aug"), np.tile(np.arange(10), n))
    source = sources.DemoPhotos("train", photo_size=48, crop_size=16)
    for i in range(n):
        # LlamaGen's ten-crop at 1.1x: shorter side to 17 px, central 17 px square, its five
        # 16 px crops, then those of its mirror image.
        square = transforms.center_crop(
            transforms.resize_shorter_side(source[i]["image"], 17), 17)
        crops = np.stack(transforms.ten_crop(source[i]["image"], 16, 17))
        np.testing.assert_array_equal(crops[1], square[:16, 1:])
        np.testing.assert_array_equal(crops[3], square[1:, 1:])
        np.testing.assert_array_equal(crops[5], square[:16, ::-1][:, :16])
        np.testing.assert_array_equal(crops[6], crops[0][:, ::-1])
        np.testing.assert_array_equal(ds.column("codes")[10 * i:10 * (i + 1)], tok.encode(crops))


def test_killed_run_resumes_with_every_image_once(tokdir, reference, tmp_path, monkeypatch):
    workdir = str(tmp_path / "enc")
    real_write = encode_task._write_shard

    def killed_at_shard_2(directory, shard, arrays):
        if shard == 2:
            raise KeyboardInterrupt("simulated kill")
        return real_write(directory, shard, arrays)

    monkeypatch.setattr(encode_task, "_write_shard", killed_at_shard_2)
    with pytest.raises(KeyboardInterrupt):
        encode_task.run(_config(tokdir), workdir)
    monkeypatch.setattr(encode_task, "_write_shard", real_write)
    shard_dir = os.path.join(workdir, "shards")
    done = sorted(os.listdir(shard_dir))
    assert done == ["shard_00000.npz", "shard_00001.npz"]
    with pytest.raises(ValueError, match="incomplete"):
        encoded.EncodedDataset(workdir)
    # A shard half-written when the process died: a hidden temporary, ignored, then removed.
    with open(os.path.join(shard_dir, ".shard_00002.npz.tmp-12345"), "wb") as f:
        f.write(b"PK\x03\x04 half a zip")
    mtimes = {d: os.path.getmtime(os.path.join(shard_dir, d)) for d in done}
    results = encode_task.run(_config(tokdir), workdir)
    assert results["shards_written"] == 2 and results["images_encoded"] == NUM_IMAGES - 12
    assert {d: os.path.getmtime(os.path.join(shard_dir, d)) for d in done} == mtimes
    assert sorted(os.listdir(shard_dir)) == [f"shard_0000{i}.npz" for i in range(4)]
    resumed, ref = encoded.EncodedDataset(workdir), encoded.EncodedDataset(reference)
    np.testing.assert_array_equal(resumed.column("indices"),
                                  np.repeat(np.arange(NUM_IMAGES), 2))  # every image once
    for name in ("labels", "aug", "codes"):
        np.testing.assert_array_equal(resumed.column(name), ref.column(name))
    np.testing.assert_allclose(resumed.column("latents"), ref.column("latents"), rtol=1e-6,
                               atol=1e-6)
    # A finished run re-run writes nothing.
    assert encode_task.run(_config(tokdir), workdir)["shards_written"] == 0


def test_other_tokenizer_or_settings_are_refused(tokdir, tok, reference, tmp_path):
    other_dir = str(tmp_path / "other_tok")
    shutil.copytree(tokdir, other_dir)  # same config and weights, another tokenizer workdir
    workdir = str(tmp_path / "enc")
    shutil.copytree(reference, workdir)
    with pytest.raises(ValueError, match="tokenizer") as error:
        encode_task.run(_config(other_dir), workdir)
    assert tokdir in str(error.value) and other_dir in str(error.value)
    with pytest.raises(ValueError, match="augment.*Use a new workdir"):
        encode_task.run(_config(tokdir, **{"encode.augment": "none"}), workdir)
    # The reader: another workdir, another config, another step.
    for other in ({**tok.identity(), "workdir": other_dir},
                  {**tok.identity(), "config_hash": "0123456789abcdef"},
                  {**tok.identity(), "step": 7}):
        with pytest.raises(ValueError, match="not by the expected tokenizer") as error:
            encoded.EncodedDataset(workdir, expect_tokenizer=other)
        assert encoded.describe_tokenizer(tok.identity()) in str(error.value)
        assert encoded.describe_tokenizer(other) in str(error.value)
    assert len(encoded.EncodedDataset(workdir, expect_tokenizer={**tok.identity(),
                                                                  "step": None})) == 40


def test_processes_split_every_batch():
    for count in (1, 2, 4):
        blocks = [encode_task.process_indices([0, 2, 3], 20, 6, 4, p, count)
                  for p in range(count)]
        assert len({len(b) for b in blocks}) == 1  # the same number of steps everywhere
        steps = np.stack([b.reshape(-1, 4 // count) for b in blocks], 1).reshape(-1, 4)
        np.testing.assert_array_equal(  # process order = image order within each batch
            steps.reshape(-1), [0, 1, 2, 3, 4, 5, -1, -1, 12, 13, 14, 15, 16, 17, -1, -1,
                                18, 19, -1, -1])


def test_bad_settings_fail_before_any_work(tokdir):
    for overrides, message in [({"tokenizer.workdir": ""}, "tokenizer.workdir"),
                               ({"encode.what": "tokens"}, "encode.what"),
                               ({"encode.augment": "rotate"}, "encode.augment"),
                               ({"encode.augment": "ten_crop"}, "encode.crop='center'"),
                               ({"encode.split": "val"}, "encode.split"),
                               ({"encode.batch_size": 0}, "encode.batch_size")]:
        with pytest.raises(ValueError, match=message):
            encode_task.check_config(_config(tokdir, **overrides))
    with pytest.raises(ValueError, match="data.image_size=0"):
        encode_task.data_config(_config(tokdir, **{"data.image_size": 32}), 16)
    from vqlc.configs import encode_imagenet
    for arg in ("", "ten_crop"):
        c = encode_imagenet.get_config(arg)
        c.tokenizer.workdir = tokdir
        encode_task.check_config(c)
    assert c.encode.augment == "ten_crop" and c.data.kind == "tfds"


def test_command_line_end_to_end(tokdir, tok, tmp_path):
    workdir = str(tmp_path / "enc")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    out = subprocess.run(
        [sys.executable, "-m", "vqlc.main", "--config=configs/encode_demo.py:tiny",
         f"--workdir={workdir}", f"--config.tokenizer.workdir={tokdir}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "images_per_second" in out.stdout
    print(out.stdout)  # the throughput, with -s
    ds = encoded.EncodedDataset(workdir, expect_tokenizer=tok.identity())
    assert len(ds) == 2 * 40  # :tiny = 40 images and their mirror images
    images, _ = _demo_crops(4)
    np.testing.assert_array_equal(ds.column("codes")[0:8:2], tok.encode(images))


@pytest.mark.slow
def test_two_processes_write_the_shards_of_one(tokdir, tmp_path):
    """launch/local.sh: 2 processes x 2 CPU devices, one writer, the same shards as one process
    with 4 devices."""
    env = dict(os.environ, PYTHON=sys.executable, VQLC_LOCAL_DEVICES="2", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    flags = [f"--config.tokenizer.workdir={tokdir}", "--config.encode.max_images=20",
             "--config.encode.images_per_shard=6", "--config.encode.batch_size=4"]
    two = str(tmp_path / "two")
    out = subprocess.run(["bash", os.path.join(REPO, "launch", "local.sh"), "2",
                          "configs/encode_demo.py:tiny", two, *flags],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    one = str(tmp_path / "one")
    encode_task.run(_config(tokdir), one)
    a, b = encoded.EncodedDataset(two), encoded.EncodedDataset(one)
    for name in ("indices", "labels", "aug", "codes"):
        np.testing.assert_array_equal(a.column(name), b.column(name))
    # Codes are exact; latents to float32 rounding: the processes run other batch shapes, for
    # which XLA:CPU may pick other conv kernels (seen up to 4e-6 on an AVX2-only CPU).
    np.testing.assert_allclose(a.column("latents"), b.column("latents"), rtol=1e-5, atol=1e-5)
