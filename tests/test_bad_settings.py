"""Bad settings, as a user meets them on the command line: `python -m vqlc.main` exits with a
clear error before any compute, and leaves no checkpoint, metrics or (for a new run) workdir.

All cases start at once in one fixture: each process spends ~2 CPU seconds importing and
checking, so running them side by side keeps the module to seconds of wall time.
(A config typo is tested in test_train.py.)
"""
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqlc.configs import default as default_config
from vqlc import checkpoint, config_io, parallel
from vqlc.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K, D = 32, 256  # the tiny config's codebook_size and codebook.feature_dim
CASES = {  # name -> (extra flags, what the error must say); {root} is the test's tmp dir
    "codebook_wrong_k": (["--config.codebook.path={root}/k64.npy"],
                         "has shape (64, 256), but the config asks for "
                         "quantizer.codebook_size=32 x codebook.feature_dim=256"),
    "codebook_wrong_dim": (["--config.codebook.path={root}/d128.npy"], "has shape (32, 128)"),
    "codebook_not_2d": (["--config.codebook.path={root}/3d.npy"], "has shape (32, 256, 1)"),
    "codebook_nan": (["--config.codebook.path={root}/nan.npy"],
                     "contains NaN or Inf values (in 2 of its 32 rows, first row 3)"),
    "codebook_integer": (["--config.codebook.path={root}/int.npy"], "has dtype int32"),
    "codebook_not_npy": (["--config.codebook.path={root}/text.npy"],
                         "is not a readable .npy array file"),
    "codebook_missing": (["--config.codebook.path={root}/missing.npy"],
                         "Codebook file not found"),
    "train_batch": (["--config.train.batch_size=7"],
                     "train.batch_size=7 must be divisible by the 2 devices"),
    "eval_batch": (["--config.eval.batch_size=9"],
                   "eval.batch_size=9 must be divisible by the 2 devices"),
    "mesh_too_big": (["--config.mesh.data=3"], "mesh.data=3 x mesh.model=1 devices asked for, but 2 are available"),
    # Existing workdirs (made by the fixture):
    "other_config": (["--workdir={root}/other_run"],
                     "holds a run with a different config (quantizer differ"),
    "other_codebook": (["--workdir={root}/started_run", "--config.codebook.path={root}/good.npy"],
                       "differs from the codebook this workdir's run was started with"),
    "checkpoint_only": (["--workdir={root}/checkpoint_only",
                         "--config.codebook.path={root}/good.npy"],
                        "is of a different model than this config"),
}


def _write_files(root) -> None:
    rng = np.random.default_rng(0)
    codes = rng.normal(size=(K, D)).astype(np.float32)
    np.save(root / "good.npy", codes)
    np.save(root / "k64.npy", rng.normal(size=(64, D)).astype(np.float32))
    np.save(root / "d128.npy", codes[:, :128])
    np.save(root / "3d.npy", codes[..., None])
    nan = codes.copy()
    nan[3, 7], nan[9, 0] = np.nan, np.inf
    np.save(root / "nan.npy", nan)
    np.save(root / "int.npy", np.zeros((K, D), np.int32))
    (root / "text.npy").write_text("not an array\n")
    # A run of a bigger codebook: the config.json an earlier run wrote.
    other = default_config.get_config("tiny")
    other.quantizer.codebook_size = 64
    config_io.write_or_check(other, str(root / "other_run"))
    # A run started with another codebook of the right shape, which the workdir keeps.
    np.save(root / "started_run.npy", rng.normal(size=(K, D)).astype(np.float32))
    started = default_config.get_config("tiny")
    started.codebook.path = str(root / "started_run.npy")
    config_io.write_or_check(started, str(root / "started_run"))
    np.save(root / "started_run" / "codebook.npy", np.load(root / "started_run.npy"))
    # A checkpoint of another model (K=64) without its config.json (e.g. copied by hand).
    _, _, _, _, abstract, _ = trainer.setup_model(other, str(root / "unused"),
                                                  parallel.make_mesh(1), abstract=True)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)
    manager = checkpoint.make_manager(str(root / "checkpoint_only"), keep=1)
    checkpoint.save(manager, 2, zeros)
    manager.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_settings")
    _write_files(root)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    procs, results = {}, {}
    for name, (flags, _) in CASES.items():
        flags = [f.format(root=root) for f in flags]
        if not any(f.startswith("--workdir") for f in flags):
            flags.append(f"--workdir={root / name}")
        before = _listing([f for f in flags if f.startswith("--workdir=")][0].split("=", 1)[1])
        procs[name] = (subprocess.Popen(
            [sys.executable, "-m", "vqlc.main", "--config=configs/default.py:tiny", *flags],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
            time.time(), before)
    for name, (proc, start, before) in procs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = (proc.returncode, out + err, time.time() - start, before)
    return root, results


def _listing(path) -> list | None:
    return sorted(os.listdir(path)) if os.path.isdir(path) else None


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_setting_fails_clearly_before_any_compute(runs, name):
    root, results = runs
    rc, output, seconds, before = results[name]
    assert rc != 0, output
    assert CASES[name][1] in output, output
    workdir = root / {"other_config": "other_run", "other_codebook": "started_run"}.get(name, name)
    if name == "checkpoint_only":
        # Found at restore, after the model is built (config.json and codebook.npy are written
        # by then) but before any train step: no metrics, the checkpoint untouched.
        assert not os.path.exists(workdir / "metrics.jsonl")
        assert _listing(workdir / "checkpoints") == ["2"]
    else:
        # Nothing was started: a new workdir is not even created, an existing one is unchanged.
        assert _listing(workdir) == before, (before, _listing(workdir))
    # All cases ran side by side on a shared CPU; no train step compiles in this time.
    assert seconds < 120, seconds


def test_existing_run_keeps_its_config_json(runs):
    root, _ = runs
    with open(root / "other_run" / "config.json") as f:
        assert json.load(f)["quantizer"]["codebook_size"] == 64
