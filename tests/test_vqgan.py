"""VQGAN encoder/decoder: parameter counts, parity with taming's PyTorch modules, VQModel, converter."""
import os

import flax
import flax.errors
import flax.traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqlc.models.taming_names import IDENTITY_PREFIX_MAP, VQMODEL_PREFIX_MAP, torch_to_flax
from vqlc.models.vqgan import Decoder, Encoder, ResnetBlock, VQModel

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "taming_tiny.npz")
TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=16, z_channels=8)
# Smaller still, for tests that need no reference: 8 px in, attention only in the middle block.
MINI = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), resolution=8, z_channels=8)
TOL = dict(atol=1e-4, rtol=1e-4)

F16 = dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), resolution=256,
           z_channels=256)
F8 = dict(F16, ch_mult=(1, 2, 2, 4), attn_resolutions=())
# Exact parameter counts of taming's PyTorch modules, obtained once with the torch venv:
#   from taming.modules.diffusionmodules.model import Encoder, Decoder
#   sum(p.numel() for p in Encoder(**cfg, out_ch=3, in_channels=3, dropout=0.0,
#                                  double_z=False).parameters())   (and the same for Decoder)
TAMING_COUNTS = {
    "f16": {"encoder": 29_298_176, "decoder": 42_449_795},
    "f8": {"encoder": 26_455_936, "decoder": 38_260_227},
}


def load_state_dict(golden, net: str) -> dict:
    """Rebuild one torch state_dict from the golden file (int8 grid values times 2**e, exact)."""
    sd = {}
    for name in golden.files:
        if not name.startswith(f"sd/{net}/"):
            continue
        key, kind = name[len(f"sd/{net}/"):].rsplit("/", 1)
        if kind == "q":
            sd[key] = golden[name].astype(np.float32) * np.float32(2.0 ** int(golden[f"sd/{net}/{key}/e"]))
        elif kind == "raw":
            sd[key] = golden[name]
    return sd


class _Golden:
    """The golden npz read into memory: `.files` and item access, like np.load's result."""

    def __init__(self, path):
        with np.load(path) as g:
            self._d = {k: g[k] for k in g.files}
        self.files = list(self._d)

    def __getitem__(self, k):
        return self._d[k]


@pytest.fixture(scope="module")
def golden():
    return _Golden(GOLDEN)


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("name,cfg", [("f16", F16), ("f8", F8)])
def test_parameter_counts_shapes_and_names_match_taming(name, cfg):
    rng = jax.random.PRNGKey(0)
    x = jnp.zeros((1, 256, 256, 3))
    enc, dec = Encoder(**cfg), Decoder(**cfg)
    enc_vars = jax.eval_shape(enc.init, rng, x)
    f = 2 ** (len(cfg["ch_mult"]) - 1)
    z = jax.eval_shape(enc.apply, enc_vars, x)
    assert z.shape == (1, 256 // f, 256 // f, 256)
    dec_vars = jax.eval_shape(dec.init, rng, z)
    assert jax.eval_shape(dec.apply, dec_vars, z).shape == (1, 256, 256, 3)
    assert _count(enc_vars["params"]) == TAMING_COUNTS[name]["encoder"]
    assert _count(dec_vars["params"]) == TAMING_COUNTS[name]["decoder"]
    # Attention blocks: f16 at the 16x16 level (taming's down.4 / up.4) and in the middle; f8 only
    # in the middle. The coarsest level has no downsample, the finest no upsample.
    attn = {"f16": ["down_4_attn_0", "down_4_attn_1", "mid_attn_1"], "f8": ["mid_attn_1"]}[name]
    assert sorted(k for k in enc_vars["params"] if "attn" in k) == attn
    up_attn = {"f16": ["mid_attn_1", "up_4_attn_0", "up_4_attn_1", "up_4_attn_2"], "f8": ["mid_attn_1"]}[name]
    assert sorted(k for k in dec_vars["params"] if "attn" in k) == up_attn
    last = len(cfg["ch_mult"]) - 1
    assert f"down_{last}_downsample" not in enc_vars["params"] and "up_0_upsample" not in dec_vars["params"]


def test_encoder_decoder_match_taming(golden):
    g = golden
    x, z = g["in/x"], g["in/z"]
    enc, dec = Encoder(**TINY), Decoder(**TINY)
    rng = jax.random.PRNGKey(0)
    enc_vars = torch_to_flax(load_state_dict(g, "encoder"), target=jax.eval_shape(enc.init, rng, x))
    dec_vars = torch_to_flax(load_state_dict(g, "decoder"), IDENTITY_PREFIX_MAP,
                             target=jax.eval_shape(dec.init, rng, z))
    np.testing.assert_allclose(jax.jit(enc.apply)(enc_vars, x), g["out/encoder"], **TOL)
    np.testing.assert_allclose(jax.jit(dec.apply)(dec_vars, z), g["out/decoder"], **TOL)


class _TestOutput(flax.struct.PyTreeNode):
    z_q: jax.Array
    indices: jax.Array
    loss: jax.Array


class _NearestQuantizer(nn.Module):
    """Test-only quantizer: nearest code by brute force, straight-through, MSE commitment loss."""
    num_codes: int
    dim: int

    def setup(self):
        self.codebook = self.param("codebook", nn.initializers.normal(1.0), (self.num_codes, self.dim))

    def __call__(self, z, *, train: bool):
        d = jnp.sum((z[..., None, :] - self.codebook) ** 2, axis=-1)
        indices = jnp.argmin(d, axis=-1).astype(jnp.int32)
        q = self.embed(indices)
        return _TestOutput(z + jax.lax.stop_gradient(q - z), indices, jnp.mean((q - z) ** 2))

    def embed(self, indices):
        return self.codebook[indices]


def test_vqmodel_encode_decode_match_taming(golden):
    """encoder+quant_conv and post_quant_conv+decoder, converted with the VQModel prefix map."""
    g = golden
    model = VQModel(**TINY, embed_dim=4, quantizer=_NearestQuantizer(num_codes=16, dim=4))
    target = jax.eval_shape(model.init, jax.random.PRNGKey(0), g["in/x"])
    codebook = target["params"].pop("quantizer")  # the quantizer's own weights are not taming's
    sd = {}
    for net in ("encoder", "decoder", "quant_conv", "post_quant_conv"):
        sd |= {f"{net}.{k}": v for k, v in load_state_dict(g, net).items()}
    sd["quantize.embedding.weight"] = np.zeros((16, 4), np.float32)  # skipped on purpose (None)
    variables = torch_to_flax(sd, VQMODEL_PREFIX_MAP | {"quantize.": None}, target=target)
    variables["params"]["quantizer"] = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape), codebook)
    encode = jax.jit(lambda v, x: model.apply(v, x, method=VQModel.encode))
    decode = jax.jit(lambda v, z: model.apply(v, z, method=VQModel.decode))
    np.testing.assert_allclose(encode(variables, g["in/x"]), g["out/encode"], **TOL)
    np.testing.assert_allclose(decode(variables, g["in/zq"]), g["out/decode"], **TOL)


def _numpy_variables(module, *args, seed=0):
    """Random variables for `module` without jax.random: XLA on CPU compiles each threefry draw for
    seconds (tens for a whole init), while numpy fills the shapes from `jax.eval_shape` at once."""
    rng = np.random.default_rng(seed)
    shapes = flax.traverse_util.flatten_dict(jax.eval_shape(module.init, jax.random.PRNGKey(0), *args))
    out = {}
    for path, s in shapes.items():
        if path[-1] == "kernel":  # fan-in scaling keeps activations O(1) through the depth
            v = rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))
        elif path[-1] == "scale":
            v = 1.0 + 0.1 * rng.normal(size=s.shape)
        else:
            v = 0.1 * rng.normal(size=s.shape)
        out[path] = jnp.asarray(v, s.dtype)
    return flax.traverse_util.unflatten_dict(out)


def test_vqmodel_methods_agree_and_sow_conv_out_input():
    model = VQModel(**MINI, embed_dim=4, quantizer=_NearestQuantizer(num_codes=16, dim=4))
    x = np.random.default_rng(1).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    variables = _numpy_variables(model, x)
    assert set(variables["params"]) == {"encoder", "decoder", "quant_conv", "post_quant_conv", "quantizer"}

    @jax.jit  # one compilation for all four entry points: the test stays fast on a busy CPU
    def run(variables, x):
        (x_rec, q), state = model.apply(variables, x, train=True, mutable=["intermediates"])
        z = model.apply(variables, x, method=VQModel.encode)
        from_codes = model.apply(variables, q.indices, method=VQModel.decode_code)
        from_z_q = model.apply(variables, q.z_q, method=VQModel.decode)
        return x_rec, q, state["intermediates"], z, from_codes, from_z_q

    x_rec, q, intermediates, z, from_codes, from_z_q = run(variables, x)
    assert x_rec.shape == x.shape and q.indices.shape == (2, 4, 4) and q.indices.dtype == jnp.int32
    codebook = variables["params"]["quantizer"]["codebook"]
    brute = jnp.argmin(jnp.sum((z[..., None, :] - codebook) ** 2, -1), -1)
    np.testing.assert_array_equal(q.indices, brute)
    np.testing.assert_allclose(q.loss, jnp.mean((codebook[brute] - z) ** 2), rtol=1e-5)
    np.testing.assert_allclose(from_z_q, x_rec, atol=1e-6)
    np.testing.assert_allclose(from_codes, x_rec, atol=1e-5)  # z + (q - z) vs q: rounding only

    # conv_out_input is exactly what enters conv_out: conv_out applied to it gives the output. The
    # output is linear in the conv_out kernel and this input does not depend on it, so the trainer
    # gets d loss / d kernel from it and the output cotangent (taming's adaptive GAN weight).
    (h,) = intermediates["decoder"]["conv_out_input"]
    assert h.shape == (2, 8, 8, 32)
    from_h = nn.Conv(3, (3, 3), padding=1).apply({"params": variables["params"]["decoder"]["conv_out"]}, h)
    np.testing.assert_allclose(from_h, x_rec, atol=1e-5)


def test_dropout_active_only_in_train():
    block = ResnetBlock(32, dropout=0.5)
    x = np.random.default_rng(1).normal(size=(1, 4, 4, 32)).astype(np.float32)
    variables = _numpy_variables(block, x)

    @jax.jit
    def run(variables, x):
        return (block.apply(variables, x), block.apply(variables, x, train=False),
                block.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2, impl="rbg")}))

    default, evaluated, trained = run(variables, x)
    np.testing.assert_array_equal(default, evaluated)
    assert not np.allclose(default, trained)
    # The encoder and decoder pass `train` down: only train=True asks for a dropout rng.
    for net, inp in ((Encoder(**MINI, dropout=0.5), jnp.zeros((1, 8, 8, 3))),
                     (Decoder(**MINI, dropout=0.5), jnp.zeros((1, 4, 4, 8)))):
        v = jax.eval_shape(net.init, jax.random.PRNGKey(0), inp)
        jax.eval_shape(lambda v, x: net.apply(v, x, train=False), v, inp)
        with pytest.raises(flax.errors.InvalidRngError):
            jax.eval_shape(lambda v, x: net.apply(v, x, train=True), v, inp)


def test_converter_refuses_missing_extra_and_unknown_keys(golden):
    g = golden
    enc = Encoder(**TINY)
    target = jax.eval_shape(enc.init, jax.random.PRNGKey(0), g["in/x"])
    sd = load_state_dict(g, "encoder")

    missing = dict(sd)
    del missing["down.1.attn.0.q.weight"]
    with pytest.raises(ValueError, match=r"missing.*down_1_attn_0/q/kernel"):
        torch_to_flax(missing, target=target)

    extra = dict(sd, **{"down.1.attn.1.q.weight": sd["down.1.attn.0.q.weight"]})
    with pytest.raises(ValueError, match=r"unexpected.*down_1_attn_1/q/kernel \(from down.1.attn.1.q.weight\)"):
        torch_to_flax(extra, target=target)

    wrong_shape = dict(sd, **{"conv_out.bias": np.zeros(7, np.float32)})
    with pytest.raises(ValueError, match=r"shape mismatch: params/conv_out/bias"):
        torch_to_flax(wrong_shape, target=target)

    # Without a target, keys outside prefix_map and unknown parameter names still raise.
    with pytest.raises(ValueError, match=r"loss.logvar: matches no prefix"):
        torch_to_flax({"encoder.conv_in.bias": np.zeros(3), "loss.logvar": np.zeros(())}, VQMODEL_PREFIX_MAP)
    with pytest.raises(ValueError, match=r"conv_in.gamma: unknown parameter name"):
        torch_to_flax({"conv_in.gamma": np.zeros(3)})


def test_converter_layouts():
    """OIHW -> HWIO, linear [out,in] -> [in,out], norm weight -> scale, BN buffers -> batch_stats."""
    w = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    lin = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = torch_to_flax({"down.0.block.1.conv1.weight": w, "head.weight": lin,
                         "main.3.weight": np.ones(2), "main.3.running_var": np.full(2, 3.0),
                         "main.3.num_batches_tracked": np.array(5)})
    k = out["params"]["down_0_block_1"]["conv1"]["kernel"]
    assert k.shape == (4, 5, 3, 2) and k[1, 2, 0, 1] == w[1, 0, 1, 2]
    np.testing.assert_array_equal(out["params"]["head"]["kernel"], lin.T)
    np.testing.assert_array_equal(out["params"]["main_3"]["scale"], np.ones(2))
    np.testing.assert_array_equal(out["batch_stats"]["main_3"]["var"], np.full(2, 3.0))
    assert set(out) == {"params", "batch_stats"}
