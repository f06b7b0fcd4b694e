"""Reporter's TensorBoard event files (tensorboardX, no TensorFlow) and metrics.jsonl, locally
and in a gs:// workdir. The event files are read back with TensorBoard's EventAccumulator,
which uses its TensorFlow stub here (see `read_events`)."""
import json
import os
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest

from tests import fake_bucket
from vqlc.train import reporting, tensorboard

bucket = fake_bucket.bucket  # the fixture, under its own name in this module

LOSSES = {2: 0.5, 4: 0.25, 6: 0.125}  # exact in float32, as event files store scalars
IMAGE_SHAPE = (1, 12, 20, 3)  # [N, H, W, C]


def read_events(logdir: str):
    """An EventAccumulator over the event files in `logdir`, keeping every event. An importable
    tensorboard.compat.notf makes TensorBoard use its TensorFlow stub even where TF is
    installed (TensorBoard's own switch for this)."""
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    from tensorboard.backend.event_processing import event_accumulator
    accumulator = event_accumulator.EventAccumulator(logdir, size_guidance={
        kind: 0 for kind in (event_accumulator.SCALARS, event_accumulator.IMAGES,
                             event_accumulator.HISTOGRAMS, event_accumulator.TENSORS)})
    accumulator.Reload()
    return accumulator


def report(workdir: str) -> None:
    """What a training run reports: scalars at a few log steps and one preview image."""
    reporter = reporting.Reporter(workdir, num_steps=8, start_step=0, batch_size=4,
                                  progress_bar=False)
    for step, loss in LOSSES.items():
        reporter.write(step, {"loss": loss})
    reporter.write_images(4, {"reconstructions": np.full(IMAGE_SHAPE, 0.5, np.float32)})
    reporter.close()


def assert_reported(events) -> None:
    assert [(e.step, e.value) for e in events.Scalars("loss")] == list(LOSSES.items())
    assert [e.step for e in events.Scalars("images_per_s")] == list(LOSSES)
    (image,) = events.Images("reconstructions")
    assert (image.step, image.height, image.width) == (4, IMAGE_SHAPE[1], IMAGE_SHAPE[2])


def event_files(folder: str) -> list[str]:
    return [name for name in os.listdir(folder) if name.startswith("events.out.tfevents.")]


def test_reporter_writes_tensorboard_scalars_an_image_and_metrics_jsonl(tmp_path):
    report(str(tmp_path))
    assert len(event_files(str(tmp_path))) == 1
    assert_reported(read_events(str(tmp_path)))
    records = reporting.read_metrics(str(tmp_path))
    assert [(r["step"], r["loss"]) for r in records] == list(LOSSES.items())
    assert all(r["images_per_s"] > 0 for r in records)


def test_a_run_resumed_within_the_same_second_keeps_the_earlier_event_file(tmp_path):
    report(str(tmp_path))
    report(str(tmp_path))  # event file names carry the time in seconds, and a suffix of their own
    assert len(event_files(str(tmp_path))) == 2


def test_writer_writes_texts_histograms_and_hparams(tmp_path):
    writer = tensorboard.TensorBoardWriter(str(tmp_path))
    writer.write_texts(3, {"note": "hello"})
    writer.write_histograms(3, {"weights": np.arange(100.0), "empty": np.zeros(0)},
                            num_buckets={"weights": 10})
    writer.write_hparams({"optim": {"lr": np.float32(0.5), "betas": (0.9, 0.99)},
                          "model": "vqgan", "ema": True, "seed": None})
    writer.close()
    events = read_events(str(tmp_path))
    (text,) = events.Tensors("note/text_summary")
    assert (text.step, text.tensor_proto.string_val) == (3, [b"hello"])
    (histogram,) = events.Histograms("weights")
    assert (histogram.step, histogram.histogram_value.num) == (3, 100)
    assert histogram.histogram_value.min == 0 and histogram.histogram_value.max == 99
    assert "empty" not in events.Tags()["histograms"]
    start = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    from tensorboard.plugins.hparams import plugin_data_pb2
    hparams = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    assert hparams["optim.lr"].number_value == 0.5
    assert hparams["optim.betas.1"].number_value == 0.99
    assert hparams["model"].string_value == "vqgan"
    assert hparams["ema"].bool_value is True
    assert hparams["seed"].string_value == ""


@pytest.mark.parametrize("write", [
    lambda w: w.write_audios(0, {"a": np.zeros((1, 8, 1))}, sample_rate=8000),
    lambda w: w.write_videos(0, {"v": np.zeros((1, 2, 4, 4, 3))}),
    lambda w: w.write_summaries(0, {"s": np.zeros(3)}),
], ids=["audios", "videos", "summaries"])
def test_writer_refuses_what_tensorboardx_does_not_write(tmp_path, write):
    writer = tensorboard.TensorBoardWriter(str(tmp_path))
    with pytest.raises(NotImplementedError, match="does not write"):
        write(writer)
    writer.close()


def test_reporter_imports_no_tensorflow(tmp_path):
    """TensorFlow is made uninstalled in this subprocess; reporting and reading still work. A
    None in sys.modules is what blocks it: etils probes with importlib.util.find_spec, which
    then answers None (not installed), where a raising sys.meta_path finder would break it."""
    script = textwrap.dedent(f"""
        import json, sys
        sys.modules["tensorflow"] = None  # `import tensorflow` raises ModuleNotFoundError
        from tests import test_reporting as t
        t.report({str(tmp_path)!r})
        t.assert_reported(t.read_events({str(tmp_path)!r}))
        loaded = [m for m, v in sys.modules.items() if m.split(".")[0] == "tensorflow" and v]
        print(json.dumps(loaded))
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_reporter_in_a_bucket_uploads_event_files_and_metrics(bucket):
    report("gs://b/run")
    folder = bucket.local("gs://b/run")
    assert len(event_files(folder)) == 1
    assert_reported(read_events(folder))
    assert [r["loss"] for r in reporting.read_metrics("gs://b/run")] == list(LOSSES.values())
    assert not [p for p, mode in bucket.opened if "a" in mode]  # no append to an object


def test_writer_in_a_bucket_uploads_during_the_run_and_cleans_up(bucket):
    writer = tensorboard.TensorBoardWriter("gs://b/tb", upload_every_s=0.0)
    writer.write_scalars(1, {"loss": 0.5})
    folder = bucket.local("gs://b/tb")
    assert len(event_files(folder)) == 1  # uploaded without a flush: a kill loses little
    assert [e.value for e in read_events(folder).Scalars("loss")] == [0.5]
    writer.write_scalars(2, {"loss": 0.25})
    writer.flush()
    assert [e.value for e in read_events(folder).Scalars("loss")] == [0.5, 0.25]
    local = writer._local
    writer.close()
    assert not os.path.exists(local)
