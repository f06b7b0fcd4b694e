"""Two JAX processes x two CPU devices (launch/local.sh: localhost coordinator, gloo collectives)
against one process with four devices, on the same global batches: same parameters, same
evaluation metrics and code counts; only process 0 writes; one start line per process."""
import json
import os
import re
import subprocess
import tempfile
import time

import jax
import numpy as np
import pytest

from vqlc.configs import default as default_config
from vqlc import checkpoint, distributed, parallel
from vqlc.train import reporting, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A few steps of the tiny config, no GAN and no LPIPS in the loss (per-image terms that add
# nothing cross-process, at a large compile cost; evaluation still reports LPIPS). A fixed random
# codebook replaces the k-means build. Even so, two processes compiling on two cores take over a
# minute: the end-to-end tests are marked slow; the launch-plan tests below them are not.
STEPS = 4
OVERRIDES = {"train.num_steps": STEPS, "train.log_every": 2, "train.checkpoint_every": STEPS,
             "train.image_every": 100, "optim.warmup_steps": 2, "optim.lr": 3e-3,
             "loss.disc_start": 10**6, "loss.perceptual_weight": 0.0, "codebook.build": ""}


def _config(codebook_path: str):
    c = default_config.get_config("tiny")
    c.update_from_flattened_dict({**OVERRIDES, "codebook.path": codebook_path})
    return c


def _subprocess_env() -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # conftest's four devices are for this process only
    for name in ("VQLC_DISTRIBUTED", distributed.ENV_ADDRESS, distributed.ENV_NUM_PROCESSES,
                 distributed.ENV_PROCESS_ID):
        env.pop(name, None)
    # The same persistent compilation cache as conftest: reruns skip most compiles.
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(tempfile.gettempdir(),
                                                    "vqlc-test-jax-cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env["PYTHON"] = os.environ.get("PYTHON", __import__("sys").executable)
    env["VQLC_LOCAL_DEVICES"] = "2"
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    codebook = str(root / "codebook.npy")
    np.save(codebook, np.random.default_rng(0).standard_normal((32, 256)).astype(np.float32))
    config = _config(codebook)

    two = str(root / "two_processes")
    flags = [f"--config.{k}={v}" for k, v in {**OVERRIDES, "codebook.path": codebook}.items()]
    start = time.time()
    proc = subprocess.run(
        ["bash", os.path.join(REPO, "launch", "local.sh"), "2", "configs/default.py:tiny", two,
         *flags], cwd=REPO, env=_subprocess_env(), capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    print(f"2 processes x 2 devices: {time.time() - start:.1f} s")

    one = str(root / "one_process")
    assert jax.process_count() == 1 and jax.device_count() == 4
    start = time.time()
    trainer.train_and_evaluate(config, one)
    print(f"1 process x 4 devices: {time.time() - start:.1f} s")
    return config, one, two, log


def _params(config, workdir):
    mesh = parallel.make_mesh(-1)
    *_, abstract, _ = trainer.setup_model(config, workdir, mesh, abstract=True)
    state, step = checkpoint.restore_state_only(os.path.join(workdir, "checkpoints"), abstract)
    assert step == STEPS
    return jax.device_get(state)


@pytest.mark.slow
def test_parameters_match_one_process(runs):
    config, one, two, _ = runs
    a, b = _params(config, one), _params(config, two)
    leaves_a, leaves_b = jax.tree.leaves_with_path(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    worst = 0.0
    null, total = [], 0
    for (path, x), y in zip(leaves_a, leaves_b):
        x, y = np.asarray(x), np.asarray(y)
        name = jax.tree_util.keystr(path)
        assert x.shape == y.shape and x.dtype == y.dtype, name
        if not (x.size and np.issubdtype(x.dtype, np.floating)):
            np.testing.assert_array_equal(y, x, err_msg=name)
            continue
        total += x.size if name.startswith(".g_params") else 0
        if name.startswith(".g_params") and max(np.abs(x).max(), np.abs(y).max()) < 1e-4:
            # Zero-gradient parameters (biases right before a GroupNorm, attention key
            # biases): their gradients are pure float rounding, which Adam scales up to
            # lr-sized random steps. Both runs must agree that they stay at noise level.
            null.append((name, x.size))
            continue
        # The two runs sum the same per-example gradients in a different order (the processes
        # interleave the batch rows), so equality is to float32 rounding, not bitwise (a few
        # ulps of the gradient sums, scaled by Adam over the steps: up to ~2e-6 on an AVX2 CPU).
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=5e-6, err_msg=name)
        worst = max(worst, float(np.max(np.abs(x - y))))
    print(f"largest parameter difference after {STEPS} steps: {worst:.2e}; "
          f"{len(null)} zero-gradient leaves skipped")
    assert all(n.endswith("['bias']") for n, _ in null), null
    assert sum(size for _, size in null) < 0.01 * total, null
    # Training moved the parameters: the comparison is not between two initialisations.
    init = trainer.setup_model(config, one, parallel.make_mesh(-1))[4]
    moved = [float(np.max(np.abs(np.asarray(p) - np.asarray(q)))) for p, q in
             zip(jax.tree.leaves(jax.device_get(init.g_params)), jax.tree.leaves(a.g_params))]
    assert max(moved) > 100 * max(worst, 1e-7)


@pytest.mark.slow
def test_metrics_and_code_counts_match(runs):
    _, one, two, _ = runs
    with open(os.path.join(one, "eval", "metrics.json")) as f:
        m1 = json.load(f)
    with open(os.path.join(two, "eval", "metrics.json")) as f:
        m2 = json.load(f)
    assert m1["num_processes"] == 1 and m2["num_processes"] == 2
    assert m1["num_devices"] == m2["num_devices"] == 4
    for key in ("num_images", "num_tokens", "dead_codes", "step", "codebook_size"):
        assert m1[key] == m2[key], key
    for key in ("psnr", "psnr_y", "ssim", "lpips", "utilization", "perplexity"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-5), key
    np.testing.assert_array_equal(np.load(os.path.join(one, "eval", "code_counts.npy")),
                                  np.load(os.path.join(two, "eval", "code_counts.npy")))
    # Training-time code usage (per log window) and losses, from metrics.jsonl.
    r1, r2 = reporting.read_metrics(one), reporting.read_metrics(two)
    assert [r["step"] for r in r1] == [r["step"] for r in r2] == list(range(2, STEPS + 1, 2))
    for x, y in zip(r1, r2):
        for key in ("utilization", "perplexity", "batch_perplexity"):
            assert y[key] == pytest.approx(x[key], rel=1e-6), key
        for key in ("loss", "l1", "lpips", "q_loss"):
            assert y[key] == pytest.approx(x[key], rel=1e-5), key


@pytest.mark.slow
def test_only_process_zero_writes(runs):
    _, _, two, log = runs
    with open(os.path.join(two, reporting.METRICS_FILE)) as f:
        lines = [line for line in f if line.strip()]
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == sorted(set(steps)), steps  # one line per logged step, no duplicates
    events = [n for n in os.listdir(two) if n.startswith("events.out.tfevents")]
    assert len(events) == 1, events
    for path in ("config.json", "codebook.npy", "eval/metrics.json", "eval/code_counts.npy",
                 "eval/reconstructions.png", "plots/utilization.png",
                 f"images/step_{STEPS:08d}.png", f"checkpoints/{STEPS}"):
        assert os.path.exists(os.path.join(two, path)), path
    # No stray temporary files from a second writer.
    leftovers = [os.path.join(d, n) for d, _, ns in os.walk(two) for n in ns if ".tmp" in n]
    assert not leftovers, leftovers
    # The results summary is printed by process 0 only.
    assert re.search(r"^\[p0\]   psnr: ", log, re.M) and not re.search(r"^\[p1\]   psnr", log,
                                                                      re.M)


@pytest.mark.slow
def test_one_start_line_per_process(runs):
    *_, log = runs
    for i in range(2):
        lines = re.findall(rf"^\[p{i}\] .*process {i}/2 on \S+: 2 local / 4 global devices "
                           r"\(cpu\)$", log, re.M)
        assert len(lines) == 1, (i, lines)
    assert "local.sh: all 2 processes finished" in log


# ------------------------------------------------------------------ when to initialise, and how


def test_plan_single_process_by_default():
    assert distributed.plan(None, {}) is None
    assert distributed.plan(False, {"VQLC_DISTRIBUTED": "1"}) is None  # the flag wins
    assert distributed.plan(None, {"VQLC_DISTRIBUTED": "0",
                                   "VQLC_COORDINATOR_ADDRESS": "h:1"}) is None


def test_plan_explicit_coordinator():
    env = {"VQLC_COORDINATOR_ADDRESS": "localhost:1234", "VQLC_NUM_PROCESSES": "2",
           "VQLC_PROCESS_ID": "1"}
    assert distributed.plan(None, env)["kwargs"] == {
        "coordinator_address": "localhost:1234", "num_processes": 2, "process_id": 1}
    # Forced on without an address: JAX's own cluster detection fills everything in.
    assert distributed.plan(True, {})["kwargs"] == {}
    assert distributed.plan(None, {"VQLC_DISTRIBUTED": "true"})["kwargs"] == {}


@pytest.mark.parametrize("env, message", [
    ({"VQLC_NUM_PROCESSES": "2"}, "VQLC_COORDINATOR_ADDRESS=host:port"),
    ({"VQLC_COORDINATOR_ADDRESS": "localhost:1"}, "VQLC_NUM_PROCESSES"),
    ({"VQLC_COORDINATOR_ADDRESS": "localhost", "VQLC_NUM_PROCESSES": "2",
      "VQLC_PROCESS_ID": "0"}, "host:port"),
    ({"VQLC_COORDINATOR_ADDRESS": "h:1", "VQLC_NUM_PROCESSES": "2", "VQLC_PROCESS_ID": "2"},
     "0..1"),
    ({"VQLC_COORDINATOR_ADDRESS": "h:1", "VQLC_NUM_PROCESSES": "two", "VQLC_PROCESS_ID": "0"},
     "not an integer"),
    ({"VQLC_DISTRIBUTED": "maybe"}, "use 1"),
])
def test_plan_errors_are_clear(env, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        distributed.plan(None, env)


SRUN = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "node[001-004]", "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8"}


def test_plan_detects_slurm_steps_with_several_tasks():
    todo = distributed.plan(None, SRUN)
    assert todo["kwargs"] == {} and "SLURM job 4242 with 8 tasks" in todo["reason"]
    assert distributed.plan(None, {**SRUN, "SLURM_STEP_NUM_TASKS": "1"}) is None
    # A bare sbatch script (no srun step) runs one process whatever --ntasks says.
    batch = {k: v for k, v in SRUN.items() if not k.startswith("SLURM_STEP")}
    assert distributed.plan(None, batch) is None
    assert distributed.plan(False, SRUN) is None


def test_plan_detects_tpu_slices_with_several_workers():
    assert "4 workers" in distributed.plan(None, {"TPU_WORKER_HOSTNAMES": "a,b,c,d"})["reason"]
    assert distributed.plan(None, {"TPU_WORKER_HOSTNAMES": "a"}) is None  # one host
    two_slices = {"TPU_WORKER_HOSTNAMES": "a,b", "MEGASCALE_NUM_SLICES": "2"}
    assert "4 workers" in distributed.plan(None, two_slices)["reason"]


def test_tpu_vm_detection_reads_sysfs_and_the_metadata_server(tmp_path, monkeypatch):
    for name, vendor in (("0000:00:04.0", "0x1af4"), ("0000:00:05.0", "0x1ae0")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "vendor").write_text(vendor + "\n")
    assert distributed.on_tpu_vm(str(tmp_path))
    (tmp_path / "0000:00:05.0" / "vendor").write_text("0x10de\n")  # a GPU, not a TPU
    assert not distributed.on_tpu_vm(str(tmp_path))
    assert not distributed.on_tpu_vm(str(tmp_path / "missing"))
    monkeypatch.setattr(distributed, "on_tpu_vm", lambda: True)
    monkeypatch.setattr(distributed, "gce_metadata",
                        lambda key: "a:b:10.0.0.1,a:b:10.0.0.2" if "endpoints" in key else None)
    assert "2 workers" in distributed.plan(None, {})["reason"]
    monkeypatch.setattr(distributed, "gce_metadata", lambda key: None)  # no metadata server
    assert distributed.plan(None, {}) is None


def test_no_private_jax_imports():
    """JAX's private modules (jax._src) change without notice between releases."""
    for root, _, files in os.walk(os.path.join(REPO, "vqlc")):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(root, name)) as f:
                    assert "jax._src" not in f.read(), os.path.join(root, name)


def _fake_python(tmp_path, body: str) -> dict:
    """An environment whose $PYTHON runs `body` (bash) for `-m vqlc.main` and the real
    interpreter otherwise (local.sh's free-port query)."""
    fake = tmp_path / "python"
    fake.write_text("#!/usr/bin/env bash\n"
                    f'if [[ $1 == -c ]]; then exec {__import__("sys").executable} "$@"; fi\n'
                    + body)
    fake.chmod(0o755)
    env = _subprocess_env()
    env.update({"PYTHON": str(fake), "VQLC_KILL_GRACE": "1", "VQLC_LOCAL_DEVICES": "3",
                "XLA_FLAGS": "--xla_force_host_platform_device_count=4 --xla_cpu_foo=1"})
    return env


def _local_sh(env, n=3, *flags):
    return subprocess.run(["bash", os.path.join(REPO, "launch", "local.sh"), str(n), "cfg.py",
                           "wd", *flags], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)


def test_local_launcher_environment_and_prefixes(tmp_path):
    env = _fake_python(tmp_path, 'echo "id=$VQLC_PROCESS_ID n=$VQLC_NUM_PROCESSES '
                                 'addr=$VQLC_COORDINATOR_ADDRESS xla=$XLA_FLAGS args=$*"\n')
    proc = _local_sh(env, 3, "--config.seed=3")
    assert proc.returncode == 0, proc.stderr
    lines = sorted(proc.stdout.splitlines())
    assert len(lines) == 3, lines
    addresses = set()
    for i, line in enumerate(lines):
        m = re.fullmatch(rf"\[p{i}\] id={i} n=3 addr=(localhost:\d+) xla=(.*) args=(.*)", line)
        assert m, line
        addresses.add(m.group(1))
        # The caller's device count is replaced, its other XLA flags are kept.
        assert m.group(2).split() == ["--xla_cpu_foo=1",
                                      "--xla_force_host_platform_device_count=3"], line
        assert m.group(3) == "-m vqlc.main --config=cfg.py --workdir=wd --config.seed=3"
    assert len(addresses) == 1  # one coordinator for all


def test_local_launcher_stops_the_others_when_one_fails(tmp_path):
    # Process 1 fails at once; the others would run for a minute (and ignore SIGTERM, like a
    # process stuck in a collective): local.sh must stop them and return process 1's status.
    env = _fake_python(tmp_path, 'if [[ $VQLC_PROCESS_ID == 1 ]]; then echo boom; exit 3; fi\n'
                                 "trap '' TERM\nsleep 60\n")
    start = time.time()
    proc = _local_sh(env, 3)
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    assert "[p1] boom" in proc.stdout
    assert "local.sh: process 1 exited with status 3; stopping the others" in proc.stderr
    assert time.time() - start < 30
