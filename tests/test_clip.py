"""vqlc.models.clip: parity with transformers / OpenAI layout on a tiny random CLIP.

Goldens (tests/golden/clip/, from tests/golden/make_clip_golden.py with torch): one tiny
vision tower (32 px, patch 8, width 32, 2 layers, 2 heads, MLP 64, projection 24,
quick_gelu) saved as an HF snapshot, a sharded CLIPModel snapshot, OpenAI's TorchScript
layout and a plain OpenAI state dict; reference features
``visual_projection(post_layernorm(last_hidden_state))[:, 1:]`` from transformers.
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vqlc.models import clip

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "clip")
TINY = clip.ClipVisionConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=2,
                             num_heads=2, intermediate_size=64, projection_dim=24)
ATOL = 1e-5


@pytest.fixture(scope="module")
def golden():
    with np.load(os.path.join(GOLDEN, "golden.npz")) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def hf_extractor():
    return clip.load(os.path.join(GOLDEN, "hf"))


def test_hf_snapshot_parity(golden, hf_extractor):
    e = hf_extractor
    assert e.config == TINY and e.name == "custom"
    assert (e.image_size, e.grid_size, e.feature_dim) == (32, 4, 24)
    feats = e.patch_features(golden["batch"])
    assert feats.shape == (5, 16, 24) and feats.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(feats), golden["features"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("source", ["hf_sharded", "openai_tiny.pt", "openai_tiny_state_dict.pt"])
def test_other_formats_parity(golden, source):
    path = os.path.join(GOLDEN, source)
    # OpenAI files carry no head count: a geometry outside KNOWN_GEOMETRIES needs config=.
    e = clip.load(path, config=TINY) if source.endswith(".pt") else clip.load(path)
    assert e.config == TINY
    np.testing.assert_allclose(np.asarray(e.patch_features(golden["batch"])),
                               golden["features"], atol=ATOL, rtol=0)


def test_all_formats_give_identical_params(hf_extractor):
    others = [clip.load(os.path.join(GOLDEN, "hf_sharded")),
              clip.load(os.path.join(GOLDEN, "openai_tiny.pt"), config=TINY)]
    ref = jax.tree_util.tree_leaves_with_path(hf_extractor.params)
    for other in others:
        leaves = jax.tree_util.tree_leaves_with_path(other.params)
        assert [p for p, _ in leaves] == [p for p, _ in ref]
        for (path, a), (_, b) in zip(ref, leaves):
            np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_param_names_follow_hf_keys(hf_extractor):
    p = hf_extractor.params
    assert p["embeddings"]["patch_embedding"]["kernel"].shape == (8, 8, 3, 32)
    assert p["embeddings"]["class_embedding"].shape == (32,)
    assert p["embeddings"]["position_embedding"]["embedding"].shape == (17, 32)
    assert set(p) == {"embeddings", "pre_layrnorm", "encoder", "post_layernorm",
                      "visual_projection"}
    assert set(p["encoder"]["layers_1"]["self_attn"]) == {"q_proj", "k_proj", "v_proj",
                                                          "out_proj"}
    assert p["visual_projection"]["kernel"].shape == (32, 24)
    assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(p))


def test_preprocessing_matches_pil_reference_exactly(golden, hf_extractor):
    # Both sides are PIL bicubic on uint8, so equality is exact.
    for raw, ref in (("wide", "pre_wide"), ("tall", "pre_tall")):
        out = clip.preprocess_image(golden[raw], 32)
        assert out.dtype == np.uint8 and out.shape == (32, 32, 3)
        np.testing.assert_array_equal(out, golden[ref])
    square = golden["square"]
    assert hf_extractor.preprocess(square) is square  # already 32x32: untouched
    np.testing.assert_array_equal(clip.preprocess_image(square[0], 32), square[0])


def test_patch_features_preprocesses_raw_images(golden, hf_extractor):
    # 45x61 -> resize 32x43 -> crop at left = round(5.5) = 6 (torchvision), features as golden.
    # A list of differently sized images works too (same batch shape as the golden: no
    # recompilation).
    raw = [golden["square"][0], golden["square"][1], golden["square"][2], golden["wide"],
           golden["tall"]]
    feats = hf_extractor.patch_features(raw)
    np.testing.assert_allclose(np.asarray(feats), golden["features"], atol=ATOL, rtol=0)


def test_features_fn_jits_with_sharded_batch(golden, hf_extractor):
    devices = np.array(jax.devices()[:4])
    mesh = Mesh(devices, ("data",))
    images = jax.device_put(golden["batch"][:4], NamedSharding(mesh, P("data")))
    fn = jax.jit(hf_extractor.features_fn, out_shardings=NamedSharding(mesh, P("data")))
    feats = fn(hf_extractor.params, images)
    assert feats.sharding.spec == P("data")
    np.testing.assert_allclose(np.asarray(feats), golden["features"][:4], atol=ATOL, rtol=0)


def test_bfloat16_activations_stay_close(golden):
    e = clip.load(os.path.join(GOLDEN, "hf"), dtype=jnp.bfloat16)
    feats = np.asarray(e.patch_features(golden["batch"]))
    assert feats.dtype == np.float32
    ref = golden["features"]
    rel = np.linalg.norm(feats - ref) / np.linalg.norm(ref)
    assert rel < 0.05, rel


def test_random_init_shapes_and_distinct_features(golden):
    e = clip.random_init(TINY, seed=3)
    assert e.name == "custom"
    feats = np.asarray(e.patch_features(golden["batch"]))
    assert feats.shape == (5, 16, 24)
    assert np.isfinite(feats).all()
    assert np.abs(feats[0] - feats[1]).max() > 1e-3  # distinct images
    assert np.abs(feats[0, 0] - feats[0, 1]).max() > 1e-3  # distinct tokens
    other = np.asarray(clip.random_init(TINY, seed=4).patch_features(golden["batch"]))
    assert np.abs(other[0] - feats[0]).max() > 1e-3  # seed matters


def test_known_geometries():
    known = clip.KNOWN_GEOMETRIES
    assert known["ViT-L/14"].grid_size == 16 and known["ViT-L/14"].projection_dim == 768
    assert known["ViT-L/14@336px"].grid_size == 24
    assert known["ViT-B/32"].grid_size == 7 and known["ViT-B/16"].grid_size == 14
    for name, cfg in known.items():
        assert clip.geometry_name(cfg) == name
    # ViT-L/14 output shape without running it: [B, 256, 768].
    module = clip.ClipVisionTower.from_config(known["ViT-L/14"])
    x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    out, variables = jax.eval_shape(
        lambda x: module.init_with_output(jax.random.PRNGKey(0), x), x)
    assert out.shape == (2, 256, 768)
    n_params = sum(np.prod(v.shape) for v in jax.tree_util.tree_leaves(variables))
    assert 303_000_000 < n_params < 304_500_000  # ViT-L/14 vision tower + projection


def test_hf_config_reading():
    # A CLIPConfig uses its top-level projection_dim, not vision_config's.
    cfg = clip.config_from_hf({"projection_dim": 768, "vision_config": {
        "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
        "num_attention_heads": 16, "patch_size": 14, "projection_dim": 512}})
    assert cfg == clip.KNOWN_GEOMETRIES["ViT-L/14"]
    assert clip.geometry_name(cfg) == "ViT-L/14"


# ------------------------------------------------------------------------- errors


def test_missing_path_error():
    with pytest.raises(FileNotFoundError, match="config.json.*model.safetensors"):
        clip.load("/nonexistent/clip-vit-large-patch14")


def test_dir_without_config_names_expected_files(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as err:
        clip.load(str(tmp_path))
    msg = str(err.value)
    assert "no config.json" in msg and "model.safetensors.index.json" in msg
    assert "found: ['model.safetensors']" in msg


def test_dir_without_weights_names_expected_files(tmp_path):
    shutil.copy(os.path.join(GOLDEN, "hf", "config.json"), tmp_path)
    with pytest.raises(FileNotFoundError, match="no model.safetensors or "
                                                "model.safetensors.index.json"):
        clip.load(str(tmp_path))


def test_missing_shard_is_named(tmp_path):
    snap = tmp_path / "snap"
    shutil.copytree(os.path.join(GOLDEN, "hf_sharded"), snap)
    os.remove(snap / "model-00002-of-00003.safetensors")
    with pytest.raises(FileNotFoundError, match="model-00002-of-00003.safetensors"):
        clip.load(str(snap))


def test_unknown_openai_geometry_lists_known_ones():
    with pytest.raises(ValueError) as err:
        clip.load(os.path.join(GOLDEN, "openai_tiny.pt"))
    msg = str(err.value)
    for name in clip.KNOWN_GEOMETRIES:
        assert name in msg
    assert "config=" in msg


def test_config_inconsistent_with_weights(tmp_path):
    wrong = clip.ClipVisionConfig(32, 8, 32, 3, 2, 64, 24)
    with pytest.raises(ValueError, match="num_layers"):
        clip.load(os.path.join(GOLDEN, "openai_tiny.pt"), config=wrong)
    snap = tmp_path / "snap"
    shutil.copytree(os.path.join(GOLDEN, "hf"), snap)
    cfg = json.loads((snap / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (snap / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.fc1\.weight.*\(64, 32\).*\(48, 32\)"):
        clip.load(str(snap))


def test_missing_weight_is_named(hf_extractor):
    from safetensors.numpy import load_file
    weights = load_file(os.path.join(GOLDEN, "hf", "model.safetensors"))
    clip.convert_hf_weights(weights, TINY)  # complete: fine
    del weights["visual_projection.weight"]
    with pytest.raises(KeyError, match="visual_projection.weight"):
        clip.convert_hf_weights(weights, TINY, source="snap")
