"""The command lines share one flag library (vqlc.cli): the same errors, the same exit codes."""
import os
import subprocess
import sys

import pytest

from vqlc import cli, figures, main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_every_task_resolves_to_a_run_function():
    import inspect
    for name in main.TASKS:
        params = list(inspect.signature(main.task_function(name)).parameters)
        assert params[:2] == ["config", "workdir"], name


def test_unknown_task_is_a_usage_error(tmp_path):
    proc = _run("vqlc.main", "--config=configs/default.py:tiny", "--config.task=tokeniser",
                f"--workdir={tmp_path}")
    assert proc.returncode != 0 and "valid tasks: codebook, tokenizer" in proc.stderr
    assert "Traceback" not in proc.stderr and not os.listdir(tmp_path)


def test_bad_flags_exit_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        figures.main(["tsne", "--workdir", "x", "--no_such_flag=1"])
    assert e.value.code == 2 and "no_such_flag" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        figures.main(["utilization", "--workdir", "x", "--max-codes", "10"])
    assert e.value.code == 2 and "--max_codes applies to tsne" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        figures.main(["histogram", "--workdir", "x"])
    assert e.value.code == 2 and "utilization, token_replacement, tsne" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        figures.main(["--help"])
    assert e.value.code == 0 and "--max_codes" in capsys.readouterr().out


def test_convert_requires_its_flags():
    proc = _run("vqlc.convert", "--config=configs/default.py:tiny")
    assert proc.returncode == 2 and "--src" in proc.stderr and "Traceback" not in proc.stderr


def test_user_errors_become_exit_2(capsys):
    def broken():
        raise FileNotFoundError("weights.pth not found")
    with pytest.raises(SystemExit) as e:
        cli.main_wrapper("vqlc.x", broken)()
    assert e.value.code == 2 and "vqlc.x: weights.pth not found" in capsys.readouterr().err
