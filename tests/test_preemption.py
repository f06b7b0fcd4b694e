"""Preemption as a user meets it: `python -m vqlc.main` in a subprocess, stopped by SIGTERM or
killed with SIGKILL (mid-step and mid-save), then re-run with the same command.

Every run goes through a small driver (written to tmp) that calls vqlc.main's own main after
recording, per train step, a fingerprint of the batch it feeds the model; on request it also
stalls a checkpoint save after all of its files are written but before orbax commits it (the
rename of the temporary directory), so the test can kill the process inside that window.
The finished runs must end with bitwise the parameters of an uninterrupted run, having trained
on the same images in the same order.
"""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 8
ARGS = ("--config=configs/default.py:tiny", f"--config.train.num_steps={NUM_STEPS}",
        "--config.train.checkpoint_every=2", "--config.train.log_every=1",
        "--config.train.image_every=100", "--config.eval.at_end=False",
        "--config.loss.perceptual_weight=0.0")  # LPIPS costs most of a CPU step
TIMEOUT = 400  # seconds for one run on a loaded 2-core machine

DRIVER = '''
import hashlib, os, sys, time
import numpy as np
from orbax.checkpoint._src.path import atomicity
from vqlc import checkpoint, parallel
from vqlc import main as vqlc_main

LOG = os.environ.get("VQLC_TEST_BATCHES", "")
HANG_STEP = os.environ.get("VQLC_TEST_HANG_SAVE_STEP", "")
seen = {"start": 0, "calls": 0}
real_restore, real_global_batch = checkpoint.restore_latest, parallel.global_batch
real_finalize = atomicity.AtomicRenameTemporaryPath.finalize


def restore_latest(manager, abstract_state, data_iterator=None):
    state = real_restore(manager, abstract_state, data_iterator)
    seen["start"] = 0 if state is None else int(state.step)
    return state


def global_batch(local, mesh):  # called once per train step, just before the step runs
    seen["calls"] += 1
    digest = hashlib.sha256(np.ascontiguousarray(local["image"]).tobytes()).hexdigest()[:20]
    with open(LOG, "a") as f:
        f.write(f"{seen['start'] + seen['calls']} {digest}\\n")
    return real_global_batch(local, mesh)


async def finalize(self):  # the commit of a save: everything is written, nothing renamed yet
    if HANG_STEP and self.get_final().name == HANG_STEP:
        with open(os.environ["VQLC_TEST_HANG_MARK"], "w") as f:
            f.write(str(self.get()))
        time.sleep(3600)
    return await real_finalize(self)


if __name__ == "__main__":  # not in grain's worker processes, which import this module
    checkpoint.restore_latest, parallel.global_batch = restore_latest, global_batch
    atomicity.AtomicRenameTemporaryPath.finalize = finalize
    sys.exit(vqlc_main.main(sys.argv[1:]))
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("preemption")
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    # A fixed random codebook: the runs skip the k-means build, not the LC quantizer.
    codebook = root / "codebook.npy"
    np.save(codebook, np.random.default_rng(0).normal(size=(32, 256)).astype(np.float32))
    return root, str(driver), str(codebook)


def launch(setup, name: str, **env_extra) -> subprocess.Popen:
    root, driver, codebook = setup
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu", PYTHONPATH=REPO, VQLC_TEST_BATCHES=str(root / f"{name}.txt"),
               JAX_COMPILATION_CACHE_DIR=os.path.join(
                   os.environ.get("TMPDIR", "/tmp"), "vqlc-test-jax-cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5", **env_extra)
    log = open(root / f"{name}.log", "a")
    return subprocess.Popen(
        [sys.executable, driver, *ARGS,
         f"--workdir={env_extra.get('VQLC_TEST_WORKDIR', root / name)}",
         f"--config.codebook.path={codebook}"], cwd=REPO, env=env, stdout=log,
        stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen) -> int:
    try:
        return proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def read_log(setup, name: str) -> str:
    return (setup[0] / f"{name}.log").read_text()


def batches(setup, name: str) -> dict[int, str]:
    """Step -> fingerprint of the batch trained on; a re-run's later one replaces a step done
    again after a kill (the killed run's work past its last checkpoint was lost)."""
    path = setup[0] / f"{name}.txt"
    out = {}
    if path.exists():
        for line in path.read_text().split("\n"):
            if line.strip():
                step, digest = line.split()
                out[int(step)] = digest
    return out


def wait_until(predicate, proc: subprocess.Popen, what: str, log: str = ""):
    deadline = time.time() + TIMEOUT
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run exited (rc {proc.returncode}) before {what}\n{log}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def checkpoint_dirs(setup, name: str) -> list[str]:
    return sorted(os.listdir(setup[0] / name / "checkpoints"))


def final_params(setup, name: str) -> dict:
    state = ocp.StandardCheckpointer().restore(setup[0] / name / "checkpoints" / str(NUM_STEPS)
                                               / "state")
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(state)}


def assert_same_run(setup, name: str, reference: str = "reference") -> None:
    got, want = final_params(setup, name), final_params(setup, reference)
    assert got.keys() == want.keys()
    for key in want:  # the whole train state: parameters, EMA, optimiser moments, RNG, step
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert batches(setup, name) == batches(setup, reference)


@pytest.fixture(scope="module")
def reference(setup):
    proc = launch(setup, "reference")
    assert finish(proc) == 0, read_log(setup, "reference")
    seen = batches(setup, "reference")
    assert sorted(seen) == list(range(1, NUM_STEPS + 1))
    assert len(set(seen.values())) == NUM_STEPS  # distinct batches: the fingerprints mean something
    return "reference"


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_the_rerun_finishes_identically(setup, reference):
    proc = launch(setup, "sigterm")
    wait_until(lambda: max(batches(setup, "sigterm"), default=0) >= 3, proc, "step 3")
    proc.send_signal(signal.SIGTERM)
    assert finish(proc) == 0, read_log(setup, "sigterm")
    log = read_log(setup, "sigterm")
    stopped = max(batches(setup, "sigterm"))  # the step in flight when the signal came
    assert 3 <= stopped < NUM_STEPS
    assert "SIGTERM received" in log and f"Stopped at step {stopped} of {NUM_STEPS}" in log
    assert str(stopped) in checkpoint_dirs(setup, "sigterm")

    proc = launch(setup, "sigterm")
    assert finish(proc) == 0, read_log(setup, "sigterm")
    assert f"Resumed from checkpoint at step {stopped}" in read_log(setup, "sigterm")
    assert_same_run(setup, "sigterm")


@pytest.mark.slow
def test_kill9_mid_save_and_mid_step_loses_nothing_past_the_last_checkpoint(setup, reference):
    root = setup[0]
    mark = root / "hang_mark"
    # 1. Killed while committing the step-4 checkpoint: its files are written, the rename not.
    proc = launch(setup, "kill9", VQLC_TEST_HANG_SAVE_STEP="4", VQLC_TEST_HANG_MARK=str(mark))
    wait_until(mark.exists, proc, "the step-4 save", read_log(setup, "kill9"))
    proc.send_signal(signal.SIGKILL)
    assert finish(proc) == -signal.SIGKILL
    left = checkpoint_dirs(setup, "kill9")
    assert "2" in left and "4" not in left
    unfinished = [d for d in left if d.startswith("4.orbax-checkpoint-tmp")]
    assert len(unfinished) == 1, left  # what orbax leaves behind: a full but uncommitted step

    # 2. Re-run: it removes that directory, resumes from step 2, and is killed mid step 7.
    proc = launch(setup, "kill9")
    wait_until(lambda: max(batches(setup, "kill9"), default=0) >= 7, proc, "step 7")
    proc.send_signal(signal.SIGKILL)
    assert finish(proc) == -signal.SIGKILL
    log = read_log(setup, "kill9")
    assert f"Removing {root / 'kill9' / 'checkpoints' / unfinished[0]}" in log
    assert "Resumed from checkpoint at step 2" in log
    assert "6" in checkpoint_dirs(setup, "kill9")

    # 3. Re-run to the end: from step 6, to the uninterrupted run's exact state and data order.
    proc = launch(setup, "kill9")
    assert finish(proc) == 0, read_log(setup, "kill9")
    assert "Resumed from checkpoint at step 6" in read_log(setup, "kill9")
    assert not [d for d in checkpoint_dirs(setup, "kill9") if "tmp" in d]
    assert_same_run(setup, "kill9")


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(setup):
    """A preemption notice reaches the processes of a job at different moments (here: only one):
    they must still save the same step together (a save is a collective) and exit cleanly."""
    def launch_pair():
        port = _free_port()
        return [launch(setup, f"two_p{i}", VQLC_COORDINATOR_ADDRESS=f"localhost:{port}",
                       VQLC_NUM_PROCESSES="2", VQLC_PROCESS_ID=str(i),
                       VQLC_TEST_WORKDIR=str(setup[0] / "two")) for i in range(2)]

    procs = launch_pair()
    wait_until(lambda: max(batches(setup, "two_p1"), default=0) >= 3, procs[1], "step 3")
    procs[1].send_signal(signal.SIGTERM)
    assert [finish(p) for p in procs] == [0, 0], read_log(setup, "two_p0")[-3000:]
    stopped = {max(batches(setup, f"two_p{i}")) for i in range(2)}
    assert len(stopped) == 1, stopped
    stopped = stopped.pop()
    assert stopped < NUM_STEPS
    assert "SIGTERM received" in read_log(setup, "two_p1")
    assert "SIGTERM received" not in read_log(setup, "two_p0")
    for i in range(2):
        assert f"Stopped at step {stopped} of {NUM_STEPS}" in read_log(setup, f"two_p{i}")
    assert str(stopped) in os.listdir(setup[0] / "two" / "checkpoints")

    procs = launch_pair()
    assert [finish(p) for p in procs] == [0, 0], read_log(setup, "two_p0")[-3000:]
    for i in range(2):
        assert f"Resumed from checkpoint at step {stopped}" in read_log(setup, f"two_p{i}")
    assert str(NUM_STEPS) in os.listdir(setup[0] / "two" / "checkpoints")


def test_resumed_run_drops_the_metrics_of_redone_steps(tmp_path):
    from vqlc.train import reporting
    path = tmp_path / reporting.METRICS_FILE
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (2, 4, 6, 8)]
    path.write_text("".join(lines) + '{"step": 10, "lo')  # killed mid-write
    assert [r["step"] for r in reporting.read_metrics(str(tmp_path))] == [2, 4, 6, 8]
    reporting.MetricsFile(str(path), 6).close()  # the checkpoint the run resumes from
    assert path.read_text() == "".join(lines[:3])
    mtime = path.stat().st_mtime_ns
    metrics = reporting.MetricsFile(str(path), 6)  # nothing to drop: file untouched
    assert path.stat().st_mtime_ns == mtime
    metrics.append({"step": 8, "loss": 0.5})
    metrics.close()
    assert [r["step"] for r in reporting.read_metrics(str(tmp_path))] == [2, 4, 6, 8]
