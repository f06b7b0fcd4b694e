"""vqlc.torch_files: PyTorch zip checkpoints read without torch.

Goldens: tests/golden/clip/torch_files_*.pt written by tests/golden/make_clip_golden.py
with torch, and torch_files.npz holding what torch itself reads back from them.
"""
import os
import pickle
import zipfile

import numpy as np
import pytest

from vqlc import torch_files
from vqlc.torch_files import TorchFileError, load_torch_file, load_torch_object

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "clip")
STATE = os.path.join(GOLDEN, "torch_files_state.pt")
SCRIPT = os.path.join(GOLDEN, "torch_files_script.pt")


@pytest.fixture(scope="module")
def expected():
    with np.load(os.path.join(GOLDEN, "torch_files.npz")) as f:
        return {k: f[k] for k in f.files}


def test_state_dict_dtypes_and_values_match_torch(expected):
    got = load_torch_file(STATE)
    want = {k: v for k, v in expected.items() if not k.startswith("script.")}
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype, k
        assert got[k].shape == v.shape, k
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    # Spot-check the dtype mapping itself (bfloat16 widens to float32).
    assert got["f16"].dtype == np.float16
    assert got["bf16"].dtype == np.float32
    assert got["i64"].dtype == np.int64 and got["flag"].dtype == np.bool_
    assert got["scalar"].shape == () and got["empty"].shape == (0, 3)


def test_shared_storage_views(expected):
    got = load_torch_file(STATE)
    base = got["base"]
    np.testing.assert_array_equal(got["view_t"], base.T)
    np.testing.assert_array_equal(got["view_slice"], base[1:, 2:5])
    np.testing.assert_array_equal(got["view_flat"], base.reshape(-1)[5:11])
    # Results are independent copies, not views into one shared read-only buffer.
    assert not np.shares_memory(got["view_t"], base)
    assert got["view_slice"].flags.writeable


def test_checkpoint_tree_and_unknown_classes_stay_inert():
    obj = load_torch_object(STATE)
    assert obj["epoch"] == 3 and obj["note"] == "golden"
    hp = obj["hparams"]
    assert isinstance(hp, torch_files.Opaque)
    assert hp.qualname == "__main__.HParams"
    assert hp.state == {"lr": 1e-4, "name": "tiny"}
    # key= picks a top-level entry explicitly.
    sub = load_torch_file(STATE, key="state_dict")
    assert "nested.inner.w" in sub
    with pytest.raises(TorchFileError, match="no entry 'ema'"):
        load_torch_file(STATE, key="ema")


def test_torchscript_module_state(expected):
    got = load_torch_file(SCRIPT)
    want = {k[len("script."):]: v for k, v in expected.items() if k.startswith("script.")}
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype, k
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    obj, consts = load_torch_object(SCRIPT, constants=True)
    assert isinstance(obj, torch_files.TorchModule)
    assert obj.qualname.startswith("__torch__")
    assert isinstance(consts, tuple)


def test_openai_torchscript_equals_its_state_dict():
    a = load_torch_file(os.path.join(GOLDEN, "openai_tiny.pt"))
    b = load_torch_file(os.path.join(GOLDEN, "openai_tiny_state_dict.pt"))
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="not found"):
        load_torch_file("/nonexistent/model.pth")


def test_legacy_format_says_how_to_fix(tmp_path):
    path = tmp_path / "legacy.pth"
    # Legacy torch.save files start with a protocol-2 pickle of a magic number.
    path.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + b"rest")
    with pytest.raises(TorchFileError, match=r"legacy.*torch >= 1\.6"):
        load_torch_file(str(path))
    other = tmp_path / "random.bin"
    other.write_bytes(b"hello world")
    with pytest.raises(TorchFileError, match="not a PyTorch zip checkpoint"):
        load_torch_file(str(other))


def test_corrupt_files(tmp_path):
    data = open(STATE, "rb").read()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(TorchFileError, match="corrupt"):
        load_torch_file(str(truncated))

    # A zip whose pickle names a storage that is not in the archive.
    dropped = tmp_path / "dropped.pt"
    with zipfile.ZipFile(STATE) as src, zipfile.ZipFile(dropped, "w") as dst:
        for info in src.infolist():
            if not info.filename.endswith("/data/0"):
                dst.writestr(info, src.read(info.filename))
    with pytest.raises(TorchFileError, match="missing from the archive"):
        load_torch_file(str(dropped))

    # A zip that is not a torch archive at all.
    plain = tmp_path / "plain.zip"
    with zipfile.ZipFile(plain, "w") as z:
        z.writestr("readme.txt", "hi")
    with pytest.raises(TorchFileError, match="data.pkl"):
        load_torch_file(str(plain))


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch " + _Evil.marker,))


def test_pickled_code_is_never_run(tmp_path):
    marker = tmp_path / "pwned"
    _Evil.marker = str(marker)
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"x": _Evil()}, protocol=2))
    obj = load_torch_object(str(path))
    assert not marker.exists()
    assert isinstance(obj["x"], torch_files.Opaque)
    assert obj["x"].qualname.endswith(".system")
    assert load_torch_file(str(path)) == {}


def test_argparse_namespace_stays_inert(tmp_path):
    """Training scripts (DiT-LC's, SiT-LC's) save their argparse.Namespace beside the weights,
    which torch's weights_only refuses: here it is an inert Opaque holding its fields, and a
    hostile object inside it stays inert too."""
    import argparse
    marker = tmp_path / "pwned"
    _Evil.marker = str(marker)
    path = tmp_path / "ckpt.pt"
    args = argparse.Namespace(model="DiT-XL/2", lr=1e-4, evil=_Evil())
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("ckpt/data.pkl", pickle.dumps({"args": args}, protocol=2))
    obj = load_torch_object(str(path))
    assert not marker.exists()
    assert isinstance(obj["args"], torch_files.Opaque)
    assert obj["args"].qualname == "argparse.Namespace"
    assert obj["args"].state["model"] == "DiT-XL/2" and obj["args"].state["lr"] == 1e-4
    assert isinstance(obj["args"].state["evil"], torch_files.Opaque)
    # the golden DiT-LC checkpoint, written by torch.save with its Namespace
    dit = load_torch_object(os.path.join(GOLDEN, "..", "dit_release_tiny.pt"))
    assert dit["args"].qualname == "argparse.Namespace"
    assert dit["args"].state["model"] == "DiT-Tiny/2"


def test_lazy_tensors_equal_eager_ones(expected):
    lazy = torch_files.flatten_arrays(load_torch_object(STATE, lazy=True))
    eager = torch_files.flatten_arrays(load_torch_object(STATE))
    assert sorted(lazy) == sorted(eager) and eager
    for k, v in eager.items():
        assert isinstance(lazy[k], torch_files.LazyTensor), k
        assert lazy[k].shape == v.shape and lazy[k].dtype == v.dtype, k  # before reading
        np.testing.assert_array_equal(lazy[k].load(), v, err_msg=k)
    np.testing.assert_array_equal(lazy["state_dict.view_t"].load(), eager["state_dict.base"].T)


def test_view_outside_storage_is_rejected():
    storage = torch_files._Storage(np.arange(6, dtype=np.float32), "FloatStorage")
    np.testing.assert_array_equal(
        torch_files._rebuild_tensor(storage, 1, (2, 2), (1, 2)),
        np.array([[1, 3], [2, 4]], np.float32))
    with pytest.raises(TorchFileError, match="outside its storage"):
        torch_files._rebuild_tensor(storage, 3, (2, 2), (2, 1))
