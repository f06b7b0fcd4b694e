"""TensorBoard event files without TensorFlow: clu's MetricWriter interface over tensorboardX.

clu's own SummaryWriter imports TensorFlow, and so does `clu/metric_writers/__init__.py`, which
Python runs before any of its submodules. The submodules used here (interface, LoggingWriter,
MultiWriter) need only numpy and jax, so they are imported without that __init__.

Events are written synchronously (tensorboardX's summary builders and its EventsWriter), not
through tensorboardX's SummaryWriter: its background thread takes events from a queue that its
flush() does not drain, so a flushed file could still lack the last events.

A remote workdir (gs://...): tensorboardX reaches buckets only through its own, separately
configured clients, so the event file is written to a local temporary folder and uploaded
whole through vqlc.atomic_io on flush, on close and every `upload_every_s` seconds of writing.
Event files are append-only logs: each upload holds everything the previous one did.
"""
import importlib
import importlib.util
import os
import shutil
import sys
import tempfile
import time
import uuid

import numpy as np

from vqlc import atomic_io, extras, rundir, storage

CLU_WRITERS = "clu.metric_writers"
HISTOGRAM_BUCKETS = 30  # TensorBoard's default (and clu's LoggingWriter's)


def import_without_package_init(package: str, names):
    """The submodules `names` of `package`, without running package/__init__.py.

    A bare package object stands in for `package` while they load and is then dropped, so a
    later plain `import package` still runs the real __init__ (which reuses these modules, so
    their classes stay the same; only `package.<name>` attribute chains then miss them, while
    `from package import <name>` finds them)."""
    if package in sys.modules:  # the real package is already loaded: nothing to avoid
        return [importlib.import_module(f"{package}.{name}") for name in names]
    bare = importlib.util.module_from_spec(importlib.util.find_spec(package))
    sys.modules[package] = bare
    try:
        return [importlib.import_module(f"{package}.{name}") for name in names]
    finally:
        if sys.modules.get(package) is bare:
            del sys.modules[package]


with extras.needed("train", "TensorBoard metrics"):
    try:
        interface, logging_writer, multi_writer = import_without_package_init(
            CLU_WRITERS, ("interface", "logging_writer", "multi_writer"))
    except ImportError:  # another clu layout: its public package (which may need TensorFlow)
        from clu.metric_writers import interface, logging_writer, multi_writer
    from tensorboardX import event_file_writer
    from tensorboardX import summary as tensorboardx_summary
    from tensorboardX.proto import event_pb2


def create_writer(workdir: str) -> "multi_writer.MultiWriter":
    """What clu's create_default_writer(workdir, asynchronous=False) builds, minus TensorFlow:
    the INFO log plus TensorBoard event files in `workdir`."""
    return multi_writer.MultiWriter([logging_writer.LoggingWriter(), TensorBoardWriter(workdir)])


class TensorBoardWriter(interface.MetricWriter):
    """Scalars, images, texts, histograms and hyperparameters to TensorBoard event files in
    `logdir` (local, or remote through a local copy). Audio, video and raw summaries raise
    NotImplementedError."""

    def __init__(self, logdir: str, *, upload_every_s: float = 60.0):
        self._remote = str(logdir) if storage.is_remote(logdir) else None
        self._local = tempfile.mkdtemp(prefix="vqlc-tensorboard-") if self._remote else logdir
        os.makedirs(self._local, exist_ok=True)
        # The file name has only the time in seconds: a run resumed within the same second
        # (as tests do) would truncate the earlier file without a suffix of its own.
        self._events = event_file_writer.EventsWriter(
            os.path.join(self._local, "events"), filename_suffix=f".{uuid.uuid4().hex[:8]}")
        self._upload_every_s = upload_every_s
        self._last_upload = time.monotonic()
        self._uploaded_sizes = {}  # local path -> size at its last upload

    def write_scalars(self, step: int, scalars):
        for key, value in scalars.items():
            self._write(step, tensorboardx_summary.scalar(key, float(np.asarray(value))))

    def write_images(self, step: int, images):
        """{name: [N, H, W, C] or [H, W, C]}, uint8 or float in [0, 1]. tensorboardX tiles the
        N images of a name into one grid image."""
        for key, value in images.items():
            value = np.asarray(value)
            if value.ndim == 3:
                value = value[None]
            if value.dtype != np.uint8:  # tensorboardX casts x * 255 to uint8: 1.01 would wrap
                value = np.clip(value.astype(np.float32), 0.0, 1.0)
            self._write(step, tensorboardx_summary.image(key, value, dataformats="NHWC"))

    def write_texts(self, step: int, texts):
        for key, value in texts.items():
            self._write(step, tensorboardx_summary.text(key, value))

    def write_histograms(self, step: int, arrays, num_buckets=None):
        num_buckets = num_buckets or {}
        for key, value in arrays.items():
            value = np.asarray(value).reshape(-1)
            if value.size == 0:  # no values, no histogram (as clu's LoggingWriter does)
                continue
            bins = num_buckets.get(key) or HISTOGRAM_BUCKETS
            self._write(step, tensorboardx_summary.histogram(key, value, bins))

    def write_hparams(self, hparams):
        """Into this run's own event file (tensorboardX's add_hparams would open a sub-run)."""
        flat = {key: _hparam_value(value) for key, value in _flatten(hparams)}
        for summary in tensorboardx_summary.hparams(flat, {}):
            self._write(0, summary)

    def write_audios(self, step: int, audios, *, sample_rate: int):
        raise NotImplementedError(_unsupported("audio"))

    def write_videos(self, step: int, videos):
        raise NotImplementedError(_unsupported("videos"))

    def write_summaries(self, step: int, values, metadata=None):
        raise NotImplementedError(_unsupported("raw tensor summaries"))

    def flush(self):
        self._events.flush()
        self._upload()

    def close(self):
        self._events.close()
        self._upload()
        if self._remote:
            shutil.rmtree(self._local, ignore_errors=True)

    def _write(self, step: int, summary) -> None:
        self._events.write_event(event_pb2.Event(summary=summary, step=step,
                                                 wall_time=time.time()))
        if self._remote and time.monotonic() - self._last_upload >= self._upload_every_s:
            self.flush()

    def _upload(self):
        """Copies each local event file that grew since its last upload to the remote logdir."""
        if not self._remote:
            return
        for folder, _, names in os.walk(self._local):
            for name in names:
                path = os.path.join(folder, name)
                size = os.path.getsize(path)
                if self._uploaded_sizes.get(path) == size:
                    continue
                with open(path, "rb") as f:
                    data = f.read()
                relative = os.path.relpath(path, self._local)
                atomic_io.write_bytes(rundir.join(self._remote, relative), data)
                self._uploaded_sizes[path] = len(data)
        self._last_upload = time.monotonic()


def _unsupported(what: str) -> str:
    return (f"vqlc's TensorBoardWriter (tensorboardX) does not write {what}; it writes scalars, "
            "images, texts, histograms and hyperparameters.")


def _flatten(tree, prefix: str = ""):
    """(dotted key, leaf) pairs of nested mappings, as clu flattens hyperparameters."""
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if hasattr(value, "items"):  # a Mapping, or an ml_collections.ConfigDict
            yield from _flatten(value, f"{name}.")
        elif isinstance(value, (list, tuple)):
            yield from _flatten(dict(enumerate(value)), f"{name}.")
        else:
            yield name, value


def _hparam_value(value):
    """A value TensorBoard's hparams plugin shows: bool, number or string."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None:
        return ""
    return value if isinstance(value, (bool, int, float, str)) else str(value)
