"""Metrics to TensorBoard (clu) and <workdir>/metrics.jsonl, plus a progress bar.

Only process 0 writes; the others keep their own log lines.
"""
import json
import os
import time

import jax
import tqdm

from vqlc import atomic_io, rundir

METRICS_FILE = rundir.METRICS


class Reporter:

    def __init__(self, workdir: str, *, num_steps: int, start_step: int, batch_size: int,
                 progress_bar: bool = True):
        self.is_writer = jax.process_index() == 0
        self.batch_size = batch_size
        self._writer = None
        self._jsonl = None
        if self.is_writer:
            from clu import metric_writers  # imports TensorFlow: only where it writes
            self._writer = metric_writers.create_default_writer(workdir, asynchronous=False)
            _drop_records_after(rundir.metrics(workdir), start_step)
            self._jsonl = open(rundir.metrics(workdir), "a")
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
            self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
            self._jsonl.flush()
        self._bar.set_postfix(loss=f"{scalars.get('loss', float('nan')):.4f}",
                              util=f"{scalars.get('utilization', float('nan')):.3f}",
                              img_s=f"{rate:.1f}", refresh=False)
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


def _drop_records_after(path: str, step: int) -> None:
    """A run resumed at `step` redoes the steps after it: their records from before a kill
    (and a half-written last line) would be duplicates, so they go, atomically."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = []
    for line in lines:
        record = _parse([line])
        if record and record[0].get("step", 0) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) != len(lines):
        atomic_io.write_text(path, "".join(kept))


def read_metrics(workdir: str) -> list[dict]:
    path = rundir.metrics(workdir)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return _parse(line for line in f if line.strip())
