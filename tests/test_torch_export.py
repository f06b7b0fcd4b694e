"""vqlc.torch_export: a tokenizer as a taming VQModel state_dict, checked against PyTorch.

Two golden files, made in this order:
  tests/golden/torch_export_tiny.safetensors   the export of `golden_tokenizer()`, written by
                                               `python -m tests.test_torch_export`
  tests/golden/torch_export_tiny.npz           what taming's PyTorch modules compute with that
                                               file, and their real key lists
                                               (tests/golden/make_torch_export_golden.py)
No torch here: the tests read the goldens.
"""
import hashlib
import importlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import safetensors.numpy

from tests import tiny_tokenizer
from vqlc import Tokenizer, parallel, tokenizer, torch_export
from vqlc.eval.images import to_float
from vqlc.models import quantizers, taming_names, vqgan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN_DIR = os.path.join(REPO, "tests", "golden")
SAFETENSORS = os.path.join(GOLDEN_DIR, "torch_export_tiny.safetensors")
NPZ = os.path.join(GOLDEN_DIR, "torch_export_tiny.npz")
# Smaller than the tiny default (whose weights take 2.6 MB) so the committed file stays small,
# yet with a downsample, an upsample, attention in a ModuleList and the middle blocks.
OVERRIDES = {"model.ch_mult": (1, 1), "model.num_res_blocks": 0,
             "model.attn_resolutions": (8,), "model.z_channels": 8, "data.image_size": 16}
# The golden's key lists for shipped geometries: golden name -> (vqlc config module, variant).
SHIPPED = {"demo": ("default", ""), "imagenet_f16": ("imagenet_lc", ""),
           "imagenet_f8": ("imagenet_lc", "f8")}
TOL = 1e-4


# ---------------------------------------------------------------------------------------------
# The golden tokenizer: numpy draws, not a model init


def _draw(name: str, shape: tuple, rng: np.random.Generator) -> np.ndarray:
    """Fan-in scaled kernels; norm scales near 1 and biases near 0 but not equal, so that a
    mixed-up norm or bias shows in the outputs (a fresh init has scale 1, bias 0 everywhere)."""
    noise = rng.standard_normal(shape)
    if name == "kernel":
        noise /= np.sqrt(np.prod(shape[:-1]))
    elif name == "scale":
        noise = 1.0 + 0.2 * noise
    elif name == "bias":
        noise *= 0.2
    return noise.astype(np.float32)


def _drawn_tree(shapes, rng: np.random.Generator):
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    paths = sorted((tuple(k.key for k in path), leaf.shape) for path, leaf in flat)
    drawn = {}
    for path, shape in paths:
        node = drawn
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = _draw(path[-1], shape, rng)
    return drawn


def golden_tokenizer(kind: str = "lc", seed: int = 0) -> Tokenizer:
    """A tiny Tokenizer (OVERRIDES) whose variables are numpy draws from `seed`: the same
    numbers on every machine, with no checkpoint and no jax initialiser involved."""
    config = tiny_tokenizer.tiny_config(**OVERRIDES, **{"quantizer.kind": kind})
    model, trained, frozen = tokenizer.inference_shapes(config)
    mesh = parallel.make_mesh(1)
    variables = jax.device_put(_drawn_tree(trained, np.random.default_rng(seed)),
                               parallel.replicated(mesh))
    codes = np.random.default_rng(seed + 1).standard_normal(
        (config.quantizer.codebook_size, config.codebook.feature_dim)).astype(np.float32)
    variables.update(tokenizer.place_frozen(frozen, codes, mesh))
    return Tokenizer(config, model, variables, mesh=mesh)


def _autoencoder(params) -> dict:
    return {k: v for k, v in params.items() if k != torch_export.QUANTIZER_MODULE}


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def golden():
    with np.load(NPZ) as g:
        return {k: g[k] for k in g.files}


@pytest.fixture(scope="module")
def committed():
    with safetensors.safe_open(SAFETENSORS, "np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.fixture(scope="module")
def tok():
    return golden_tokenizer()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tiny_tokenizer.make_workdir(str(tmp_path_factory.mktemp("torch_export") / "run"),
                                       **OVERRIDES)


def _key_shapes(golden, name: str) -> dict:
    return {k: tuple(int(d) for d in s.split(",") if d)
            for k, s in zip(golden[f"keys/{name}"], golden[f"shapes/{name}"])}


def _vqmodel_shapes(cfg: dict):
    """The params shapes of vqlc's VQModel for a taming ddconfig + n_embed/embed_dim."""
    dd = cfg["ddconfig"]
    model = vqgan.VQModel(
        ch=dd["ch"], ch_mult=tuple(dd["ch_mult"]), num_res_blocks=dd["num_res_blocks"],
        attn_resolutions=tuple(dd["attn_resolutions"]), resolution=dd["resolution"],
        z_channels=dd["z_channels"], embed_dim=cfg["embed_dim"],
        quantizer=quantizers.make_quantizer("vq", cfg["n_embed"], cfg["embed_dim"]))
    x = jnp.zeros((1, dd["resolution"], dd["resolution"], 3))
    return jax.eval_shape(model.init, jax.random.key(0), x)["params"]


# ---------------------------------------------------------------------------------------------
# (a) names: the real key lists of taming's modules


def test_goldens_belong_together(golden):
    with open(SAFETENSORS, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert str(golden["safetensors_sha256"]) == digest, (
        "torch_export_tiny.npz was made from another torch_export_tiny.safetensors: rerun "
        "tests/golden/make_torch_export_golden.py")
    assert os.path.getsize(SAFETENSORS) < 2**20 and os.path.getsize(NPZ) < 2**20


def test_exported_keys_and_shapes_are_tamings(golden, committed, tok):
    expected = _key_shapes(golden, "tiny")
    arrays, _ = committed
    assert {k: a.shape for k, a in arrays.items()} == expected
    assert {k: a.shape for k, a in torch_export.state_dict(tok).items()} == expected
    assert all(a.dtype == np.float32 for a in arrays.values())


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_key_lists_of_shipped_geometries(golden, name):
    cfg = json.loads(str(golden[f"config/{name}"]))
    module, variant = SHIPPED[name]
    config = importlib.import_module(f"vqlc.configs.{module}").get_config(variant)
    assert cfg["ddconfig"] == torch_export.ddconfig(config)  # the golden lists these geometries
    params = _autoencoder(_vqmodel_shapes(cfg))
    shapes = torch_export.torch_shapes(params)
    shapes[torch_export.CODEBOOK_KEY] = (cfg["n_embed"], cfg["embed_dim"])
    assert shapes == _key_shapes(golden, name)


# ---------------------------------------------------------------------------------------------
# (b) the exact inverse of taming_names.torch_to_flax


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_of_the_golden_tokenizer(tok):
    params = jax.device_get(_autoencoder(tok.variables["params"]))
    back = taming_names.torch_to_flax(torch_export.flax_to_torch(params),
                                      taming_names.VQMODEL_PREFIX_MAP)
    _assert_trees_equal(back, {"params": params})


def test_round_trip_with_every_kind_of_block():
    # Two res blocks per level (block.1 next to mid.block_1), attention in the blocks, a
    # channel change (nin_shortcut), both resamplings.
    cfg = {"ddconfig": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 2,
                        "attn_resolutions": [8], "resolution": 16, "z_channels": 8},
           "n_embed": 4, "embed_dim": 4}
    params = _drawn_tree(_autoencoder(_vqmodel_shapes(cfg)), np.random.default_rng(5))
    sd = torch_export.flax_to_torch(params)
    assert {"encoder.down.0.block.1.conv1.weight", "encoder.mid.block_1.conv1.weight",
            "encoder.down.1.block.0.nin_shortcut.weight", "decoder.up.1.attn.2.q.weight",
            "decoder.up.1.upsample.conv.weight"} <= set(sd)
    assert all(a.flags.c_contiguous and a.dtype == np.float32 for a in sd.values())
    target = {"params": _vqmodel_shapes(cfg)}
    target["params"] = _autoencoder(target["params"])
    back = taming_names.torch_to_flax(sd, taming_names.VQMODEL_PREFIX_MAP, target=target)
    _assert_trees_equal(back, {"params": params})
    # A bare Encoder, named from the root.
    enc = params["encoder"]
    sd = torch_export.flax_to_torch(enc, taming_names.IDENTITY_PREFIX_MAP)
    assert "conv_in.weight" in sd and "down.0.downsample.conv.weight" in sd
    _assert_trees_equal(taming_names.torch_to_flax(sd), {"params": enc})


@pytest.mark.parametrize("params,message", [
    ({"quantizer": {"embedding": np.zeros((4, 4))}}, "outside every prefix_map destination"),
    ({"encoder": {"mid_block_1": {"lora": {"kernel": np.zeros((1, 1, 4, 4))}}}},
     "block 'mid_block_1' has layers"),
    ({"encoder": {"side_0_block_0": {"conv1": {"bias": np.zeros(4)}}}},
     "'side_0_block_0' is not a block"),
    ({"decoder": {"kernel": np.zeros((3, 3, 4, 4))}}, "directly under an Encoder/Decoder"),
    ({"decoder": {"conv_in": {"kernel": np.zeros((3, 4, 4))}}}, "3-D 'kernel'"),
    ({"encoder": {"conv_in": {"scale": np.zeros((2, 2))}}}, "2-D 'scale'"),
    ({"params": {"encoder": {}}}, "pass variables\\['params'\\]"),
])
def test_flax_to_torch_refuses_what_taming_has_no_place_for(params, message):
    with pytest.raises(ValueError, match=message):
        torch_export.flax_to_torch(params)


# ---------------------------------------------------------------------------------------------
# The committed export


def test_reexport_equals_the_committed_file(tok, committed, tmp_path):
    arrays, meta = committed
    path = str(tmp_path / "tiny.safetensors")
    torch_export.export_tokenizer(tok, path)
    with safetensors.safe_open(path, "np") as f:
        fresh, fresh_meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    assert sorted(fresh) == sorted(arrays)
    for key in arrays:
        if key == torch_export.CODEBOOK_KEY:
            # The LC codes are a float32 matmul (projector x frozen codebook) whose summation
            # order is XLA's to choose, so they may differ in the last bits between machines.
            np.testing.assert_allclose(fresh[key], arrays[key], rtol=1e-6, atol=1e-6)
        else:
            # Layout copies of numpy draws (platform-independent): exactly equal. The per-array
            # comparison names the tensor that differs, where a bytes comparison would not.
            np.testing.assert_array_equal(fresh[key], arrays[key], err_msg=key)
    assert json.loads(fresh_meta.pop("source")) == tok.identity()
    meta = dict(meta)
    meta.pop("source")
    assert fresh_meta == meta
    assert meta["format"] == "taming-vqmodel" and meta["quantizer"] == "lc"
    assert json.loads(meta["ddconfig"]) == torch_export.ddconfig(tok.config)
    assert (meta["n_embed"], meta["embed_dim"], meta["l2_normalized_codes"]) == ("32", "8",
                                                                                 "false")


# ---------------------------------------------------------------------------------------------
# (c) parity with taming's PyTorch modules


def parity(tok, golden) -> dict:
    """Max abs differences between vqlc's Tokenizer and torch's float64 outputs, and the number
    of tokens whose code differs."""
    images = golden["images"]
    np.testing.assert_array_equal(to_float(images), golden["x"])
    codes, latents = tok.encode_with_latents(images)
    decoded = jax.device_get(tokenizer.decode_fn(tok.model)(tok.variables, golden["indices"]))
    return {"latents": float(np.abs(latents - golden["latents"]).max()),
            "decoded": float(np.abs(decoded - golden["decoded"]).max()),
            "indices_differing": int((codes != golden["indices"]).sum())}


def test_parity_with_taming(tok, golden):
    diffs = parity(tok, golden)
    assert diffs["indices_differing"] == 0, diffs
    assert diffs["latents"] <= TOL and diffs["decoded"] <= TOL, diffs
    # The comparison means something: varied codes, and no near-tie that float32 rounding of
    # the distances (about 1e-6 of them here) could flip.
    assert len(np.unique(golden["indices"])) > 8
    assert golden["gaps"].min() > 1e-4


@pytest.mark.parametrize("kind", ["vq", "ema", "fc", "lc"])
def test_tamings_nearest_code_search_gives_the_tokenizers_codes(kind, golden):
    tok = golden_tokenizer(kind, seed=3)
    table = torch_export.state_dict(tok)[torch_export.CODEBOOK_KEY]
    assert table.shape == (tok.codebook_size, tok.latent_dim)
    codes, latents = tok.encode_with_latents(golden["images"])
    z = latents.reshape(-1, tok.latent_dim).astype(np.float64)
    normalized = torch_export.metadata(tok)["l2_normalized_codes"] == "true"
    assert normalized == (kind == "fc")
    if normalized:  # what the user must do before taming's quantizer
        z /= np.linalg.norm(z, axis=1, keepdims=True)
        np.testing.assert_allclose(np.linalg.norm(table, axis=1), 1.0, rtol=1e-6)
    distances = ((z[:, None, :] - table[None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_array_equal(distances.argmin(1).reshape(codes.shape), codes)
    # The decoder sees the table's rows for those codes.
    np.testing.assert_allclose(
        jax.device_get(tok.model.apply(tok.variables, codes, method=lambda m, c:
                                       m.quantizer.embed(c))),
        table[codes], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# (d) the command, (e) models that are not taming-shaped


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_command_exports_a_workdir(workdir, tmp_path):
    dst = str(tmp_path / "out" / "tok.safetensors")
    result = _run("-m", "vqlc.torch_export", f"--workdir={workdir}", f"--dst={dst}")
    assert result.returncode == 0, result.stderr
    assert f"wrote {dst}" in result.stdout
    assert "VQModel(ddconfig=" in result.stdout and "load_state_dict" in result.stdout
    expected = torch_export.state_dict(Tokenizer.load(workdir))
    written = safetensors.numpy.load_file(dst)
    assert sorted(written) == sorted(expected)
    for key in expected:
        np.testing.assert_array_equal(written[key], expected[key], err_msg=key)


def test_command_refuses_a_bad_workdir_in_one_line(tmp_path):
    dst = tmp_path / "tok.safetensors"
    bad = _run("-m", "vqlc.torch_export", f"--workdir={tmp_path / 'nothing'}", f"--dst={dst}")
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1 and "config.json" in bad.stderr
    assert not dst.exists()


def test_command_wants_a_safetensors_destination(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        torch_export.main([f"--workdir={tmp_path}", f"--dst={tmp_path / 'tok.pth'}"])
    assert exit_.value.code == 2
    assert ".safetensors" in capsys.readouterr().err


def test_a_model_that_is_not_taming_shaped_is_refused(tok, tmp_path):
    # Every shipped config builds taming's Encoder/Decoder, so no workdir of another shape
    # exists to export; a tokenizer with one extra layer stands in for one.
    params = dict(tok.variables["params"])
    params["encoder"] = {**params["encoder"], "adapter": {"kernel": np.zeros((1, 1, 32, 32))}}
    odd = Tokenizer(tok.config, tok.model, {**tok.variables, "params": params}, mesh=tok.mesh)
    path = tmp_path / "odd.safetensors"
    with pytest.raises(ValueError, match="encoder/adapter/kernel") as error:
        torch_export.export_tokenizer(odd, str(path))
    assert "is the model taming-shaped?" in str(error.value)
    assert not path.exists()


if __name__ == "__main__":
    # Writes tests/golden/torch_export_tiny.safetensors; then run make_torch_export_golden.py.
    size = torch_export.export_tokenizer(golden_tokenizer(), SAFETENSORS)
    print(f"wrote {SAFETENSORS}: {size} bytes")
