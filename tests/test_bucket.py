"""A gs:// workdir: the tasks and readers that write and read run files go through etils.epath
only (a fake bucket serves gs:// from a local folder; plain os/open/np.load calls find nothing
there). Orbax checkpoints use orbax's own gs:// support and are not exercised here."""
import json
import os
import shutil

import numpy as np
import pytest

from vqlc.configs import encode_demo, sample_demo
from tests import tiny_tokenizer
from tests import fake_bucket
from vqlc import atomic_io, checkpoint, rundir, storage
from vqlc.codebook import frozen
from vqlc.data import encoded, shards
from vqlc.eval import analysis
from vqlc.train import reporting


bucket = fake_bucket.bucket  # the fixture


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return tiny_tokenizer.make_workdir(str(tmp_path_factory.mktemp("tok") / "run"))


def _encode_config(tok_dir):
    c = encode_demo.get_config("tiny")
    c.update_from_flattened_dict({"tokenizer.workdir": tok_dir, "encode.max_images": 10,
                                  "encode.images_per_shard": 4, "encode.batch_size": 2})
    return c


def test_encode_into_a_bucket_equals_a_local_run(tok_dir, tmp_path, bucket):
    from vqlc import encode_task
    local = str(tmp_path / "local")
    encode_task.run(_encode_config(tok_dir), local)
    results = encode_task.run(_encode_config(tok_dir), "gs://b/enc")
    assert results["shards_written"] == 3
    assert sorted(os.listdir(bucket.local("gs://b/enc/shards"))) == [
        "shard_00000.npz", "shard_00001.npz", "shard_00002.npz"]
    mine, theirs = encoded.EncodedDataset("gs://b/enc"), encoded.EncodedDataset(local)
    assert len(mine) == len(theirs) == 20
    for name in ("codes", "latents", "labels", "indices", "aug"):
        np.testing.assert_array_equal(mine.column(name), theirs.column(name))
    assert encode_task.run(_encode_config(tok_dir), "gs://b/enc")["shards_written"] == 0


def test_sample_into_a_bucket_equals_a_local_run(tok_dir, tmp_path, bucket):
    from vqlc.gen import sample
    c = sample_demo.get_config("tiny")
    c.update_from_flattened_dict({"tokenizer.workdir": tok_dir, "sample.per_class": 2})
    local = str(tmp_path / "local")
    sample.run(c, local)
    sample.run(c, "gs://b/samples")
    with np.load(os.path.join(local, "samples.npz")) as a, \
            np.load(bucket.local("gs://b/samples/samples.npz")) as b:
        assert a.files == b.files
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k])
    record = json.loads(open(bucket.local("gs://b/samples/samples.json")).read())
    assert record["npz"] == "gs://b/samples/samples.npz"


def test_metrics_file_in_a_bucket_appends_and_drops_redone_steps(bucket):
    path = "gs://b/run/metrics.jsonl"
    metrics = reporting.MetricsFile(path, 0)
    for step in (2, 4, 6):
        metrics.append({"step": step, "loss": 1.0 / step})
    metrics.close()
    assert [r["step"] for r in reporting.read_metrics("gs://b/run")] == [2, 4, 6]
    metrics = reporting.MetricsFile(path, 4)  # resumed from the checkpoint of step 4
    metrics.append({"step": 6, "loss": 0.25})
    metrics.close()
    assert [r["loss"] for r in reporting.read_metrics("gs://b/run")] == [0.5, 0.25, 0.25]
    assert not [p for p, mode in bucket.opened if "a" in mode]  # no append to an object


def test_codebook_checkpoint_listing_and_analysis_in_a_bucket(tok_dir, bucket):
    codes = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    frozen.save_codebook("gs://b/run", codes, {"mode": "test"})
    np.testing.assert_array_equal(frozen.load_codebook(rundir.codebook("gs://b/run"), 16, 8),
                                  codes)
    with pytest.raises(ValueError, match="shape"):
        frozen.load_codebook(rundir.codebook("gs://b/run"), 32, 8)

    # A copy of a trained workdir's checkpoints, plus the leftovers of a killed save.
    shutil.copytree(os.path.join(tok_dir, "checkpoints"), bucket.local("gs://b/run/checkpoints"))
    steps = checkpoint.completed_steps("gs://b/run/checkpoints")
    assert steps and steps == checkpoint.completed_steps(os.path.join(tok_dir, "checkpoints"))
    os.makedirs(bucket.local(f"gs://b/run/checkpoints/{steps[-1] + 1}.orbax-checkpoint-tmp-7"))
    assert checkpoint.remove_unfinished_saves("gs://b/run/checkpoints") == [
        f"{steps[-1] + 1}.orbax-checkpoint-tmp-7"]
    assert checkpoint.completed_steps("gs://b/run/checkpoints") == steps
    assert storage.listdir("gs://b/run/checkpoints") == [str(s) for s in steps]

    atomic_io.write_text(rundir.config("gs://b/run"), open(rundir.config(tok_dir)).read())
    reporting.MetricsFile(rundir.metrics("gs://b/run"), 0).append(
        {"step": 1, "utilization": 0.5})
    assert analysis.check_workdir("gs://b/run") == "gs://b/run"
    steps_, util = analysis.load_utilization("gs://b/run")
    assert list(steps_) == [1] and list(util) == [0.5]


def test_shard_spec_and_unfinished_writes_in_a_bucket(bucket):
    spec = {"a": 1}
    shards.check_or_write_spec("gs://b/d/spec.json", spec, what="x", remedy="y")
    shards.check_or_write_spec("gs://b/d/spec.json", spec, what="x", remedy="y")
    with pytest.raises(ValueError, match="a: on disk 1, now 2"):
        shards.check_or_write_spec("gs://b/d/spec.json", {"a": 2}, what="x", remedy="y")
    atomic_io.write_text("gs://b/d/.shard_00001.npz.tmp-12", "partial")
    shards.remove_unfinished("gs://b/d")
    assert storage.listdir("gs://b/d") == ["spec.json"]


def test_codebook_features_in_a_bucket_are_refused_clearly():
    from vqlc.codebook import recipes, task
    c = recipes.vgg16_demo(tiny=True)
    with pytest.raises(ValueError, match="memory-mapped.*features.dir"):
        task.make_codebook(c, "gs://b/features")
