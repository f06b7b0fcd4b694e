"""Optional dependencies as a user without them meets them: each missing package gives one line
naming the pip extra that installs it (exit status 2 on the command line), never a traceback;
configs are found by name from any folder."""
import os
import subprocess
import sys

import pytest

from vqlc import cli, extras

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs `-m <module> args...` with the named top-level packages absent (None in sys.modules:
# imports raise ModuleNotFoundError and importlib.util.find_spec returns None, as when absent).
WITHOUT = '''
import runpy, sys
for name in sys.argv[1].split(","):  # what an absent package looks like to import machinery
    if name:
        sys.modules[name] = None
sys.argv = sys.argv[2:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
'''


def _run_without(tmp_path, packages, module, *args):
    script = tmp_path / "without.py"
    script.write_text(WITHOUT)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run([sys.executable, str(script), ",".join(packages), module, *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("packages, flags, extra", [
    (["grain"], [], "train"),
    (["skimage"], [], "demo"),
    (["tensorflow_datasets", "tensorflow"], ["--config.data.kind=tfds",
                                             "--config.data.name=imagenet2012"], "tfds"),
])
def test_a_missing_extra_is_one_line_naming_it(tmp_path, packages, flags, extra):
    proc = _run_without(tmp_path, packages, "vqlc.main", "--config=default:tiny",
                        f"--workdir={tmp_path / 'run'}", *flags)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"pip install 'vqlc[{extra}]'" in proc.stderr.strip().splitlines()[-1]
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_the_extra_named_is_the_one_that_installs_the_package():
    with pytest.raises(extras.MissingExtra, match=r"'sklearn' .*vqlc\[figures\]"):
        with extras.needed("train"):
            raise ModuleNotFoundError("No module named 'sklearn.manifold'",
                                      name="sklearn.manifold")
    with pytest.raises(ModuleNotFoundError):  # an import error of vqlc itself is not hidden
        with extras.needed("train"):
            import vqlc.no_such_module  # noqa: F401


def test_configs_by_name_from_any_folder(tmp_path):
    assert "default" in cli.config_names() and "imagenet_lc" in cli.config_names()
    resolved = cli._config_by_name("--config=imagenet_lc:eval")
    assert resolved.endswith(os.path.join("vqlc", "configs", "imagenet_lc.py") + ":eval")
    assert cli._config_by_name("--config=my/own.py:x") == "--config=my/own.py:x"
    # Outside the clone: the name finds the packaged config (the task name is then refused).
    proc = _run_without(tmp_path, [], "vqlc.main", "--config=default:tiny",
                        "--config.task=nosuch", f"--workdir={tmp_path / 'run'}")
    assert proc.returncode == 2 and "valid tasks: codebook, tokenizer" in proc.stderr, \
        proc.stderr[-2000:]
    proc = _run_without(tmp_path, [], "vqlc.main", "--config=defualt", f"--workdir={tmp_path}")
    assert proc.returncode == 2 and "no config named 'defualt'" in proc.stderr
    assert "Traceback" not in proc.stderr
