"""Metrics to TensorBoard (clu's writer interface over tensorboardX: no TensorFlow, see
vqlc.train.tensorboard) and <workdir>/metrics.jsonl, plus a progress bar.

Only process 0 writes; the others keep their own log lines.
"""
import json
import time

import jax

from vqlc import atomic_io, extras, rundir, storage

with extras.needed("train"):
    import tqdm

METRICS_FILE = rundir.METRICS


class Reporter:

    def __init__(self, workdir: str, *, num_steps: int, start_step: int, batch_size: int,
                 progress_bar: bool = True):
        self.is_writer = jax.process_index() == 0
        self.batch_size = batch_size
        self._writer = None
        self._jsonl = None
        if self.is_writer:
            from vqlc.train import tensorboard  # only the process that writes needs it
            self._writer = tensorboard.create_writer(workdir)
            self._jsonl = MetricsFile(rundir.metrics(workdir), start_step)
        self._bar = tqdm.tqdm(total=num_steps, initial=start_step, dynamic_ncols=True,
                              disable=not (progress_bar and self.is_writer), desc="train")
        self._last_time = time.time()
        self._last_step = start_step

    def write(self, step: int, scalars: dict) -> dict:
        now = time.time()
        rate = (step - self._last_step) * self.batch_size / max(now - self._last_time, 1e-9)
        self._last_time, self._last_step = now, step
        scalars = {k: float(v) for k, v in scalars.items()}
        scalars["images_per_s"] = rate
        if self.is_writer:
            self._writer.write_scalars(step, scalars)
            self._jsonl.append({"step": step, **scalars})
        shown = {"loss": f"{scalars.get('loss', float('nan')):.4f}"}
        if "utilization" in scalars:  # the tokenizer's; generators have none
            shown["util"] = f"{scalars['utilization']:.3f}"
        self._bar.set_postfix(**shown, img_s=f"{rate:.1f}", refresh=False)
        return scalars

    def advance(self, step: int) -> None:
        self._bar.update(step - self._bar.n)

    def write_images(self, step: int, images: dict) -> None:
        if self.is_writer:
            self._writer.write_images(step, images)

    def close(self) -> None:
        self._bar.close()
        if self.is_writer:
            self._writer.flush()
            self._writer.close()
            self._jsonl.close()


def _parse(lines) -> list[dict]:
    """JSON records, skipping a line cut short by a kill mid-write."""
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class MetricsFile:
    """metrics.jsonl, one JSON record per line. A run resumed at `start_step` redoes the steps
    after it: their records from before a kill (and a half-written last line) would be
    duplicates, so they go first, atomically. Locally each record is appended; an object store
    cannot append, so there the whole file is rewritten (atomically) with each record."""

    def __init__(self, path: str, start_step: int):
        self.path = path
        lines = _lines(path)
        kept = []
        for line in lines:
            record = _parse([line])
            if record and record[0].get("step", 0) <= start_step:
                kept.append(line)
        if len(kept) != len(lines) or storage.is_remote(path):
            atomic_io.write_text(path, "".join(f"{line}\n" for line in kept))
        self._lines = kept if storage.is_remote(path) else None
        self._file = None if storage.is_remote(path) else open(path, "a")

    def append(self, record: dict) -> None:
        line = json.dumps(record)
        if self._file is not None:
            self._file.write(line + "\n")
            self._file.flush()
            return
        self._lines.append(line)
        atomic_io.write_text(self.path, "".join(f"{x}\n" for x in self._lines))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _lines(path: str) -> list[str]:
    if not storage.exists(path):
        return []
    return [line.rstrip("\n") for line in storage.read_text(path).splitlines() if line.strip()]


def read_metrics(workdir: str) -> list[dict]:
    return _parse(_lines(rundir.metrics(workdir)))
