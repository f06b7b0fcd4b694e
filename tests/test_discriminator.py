"""PatchGAN discriminator: parity with taming's NLayerDiscriminator (eval and train BatchNorm), init."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqlc.models.discriminator import NLayerDiscriminator
from vqlc.models.taming_names import CHECKPOINT_DISCRIMINATOR_PREFIX_MAP, torch_to_flax

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "taming_tiny.npz")
TOL = dict(atol=1e-4, rtol=1e-4)
# sum(p.numel() for p in NLayerDiscriminator(input_nc=3, ndf=64, n_layers=2).parameters()) in taming.
TAMING_COUNT_NDF64_NLAYERS2 = 663_361


@pytest.fixture(scope="module")
def golden():
    """The golden npz in memory; the discriminator's state_dict rebuilt from its exact int8 grid."""
    with np.load(GOLDEN) as g:
        d = {k: g[k] for k in g.files}
    sd = {}
    for name in d:
        if name.startswith("sd/disc/"):
            key, kind = name[len("sd/disc/"):].rsplit("/", 1)
            if kind == "q":
                sd[key] = d[name].astype(np.float32) * np.float32(2.0 ** int(d[f"sd/disc/{key}/e"]))
            elif kind == "raw":
                sd[key] = d[name]
    d["state_dict"] = sd
    return d


def _convert(golden, disc):
    target = jax.eval_shape(disc.init, jax.random.PRNGKey(0), golden["in/x_disc"])
    return torch_to_flax(golden["state_dict"], target=target)


def test_matches_taming_in_eval_mode(golden):
    disc = NLayerDiscriminator(ndf=8, n_layers=2)
    variables = _convert(golden, disc)
    assert set(variables["params"]) == {"main_0", "main_2", "main_3", "main_5", "main_6", "main_8"}
    assert set(variables["batch_stats"]) == {"main_3", "main_6"}
    out = jax.jit(disc.apply)(variables, golden["in/x_disc"])
    assert out.shape == (4, 6, 6, 1)
    np.testing.assert_allclose(out, golden["out/disc_eval"], **TOL)


def test_matches_taming_in_train_mode(golden):
    disc = NLayerDiscriminator(ndf=8, n_layers=2)
    variables = _convert(golden, disc)
    run = jax.jit(lambda v, x: disc.apply(v, x, train=True, mutable=["batch_stats"]))
    out, updated = run(variables, golden["in/x_disc"])
    np.testing.assert_allclose(out, golden["out/disc_train"], **TOL)  # batch statistics
    # Running stats, momentum 0.1 in torch's convention. torch folds the unbiased batch variance
    # into running_var, Flax the biased one: undo that factor n/(n-1), n = B*H*W at the layer.
    for idx, n in ((3, 4 * 8 * 8), (6, 4 * 7 * 7)):
        new = updated["batch_stats"][f"main_{idx}"]
        old_var = variables["batch_stats"][f"main_{idx}"]["var"]
        np.testing.assert_allclose(new["mean"], golden[f"out/disc_train_running_mean/{idx}"], **TOL)
        biased = (new["var"] - 0.9 * old_var) / 0.1
        unbiased_update = 0.9 * old_var + 0.1 * biased * n / (n - 1)
        torch_var = golden[f"out/disc_train_running_var/{idx}"]
        np.testing.assert_allclose(unbiased_update, torch_var, atol=2e-6, rtol=0)
        assert np.abs(new["var"] - torch_var).max() > 2e-5  # the gap is real, ~0.1*var/(n-1)


def test_checkpoint_prefix_and_num_batches_tracked(golden):
    """Keys as in a VQGAN-LC training checkpoint (`loss.discriminator.main.N...`)."""
    disc = NLayerDiscriminator(ndf=8, n_layers=2)
    sd = {f"loss.discriminator.{k}": v for k, v in golden["state_dict"].items()}
    assert "loss.discriminator.main.3.num_batches_tracked" in sd
    target = jax.eval_shape(disc.init, jax.random.PRNGKey(0), golden["in/x_disc"])
    variables = torch_to_flax(sd, CHECKPOINT_DISCRIMINATOR_PREFIX_MAP, target=target)
    np.testing.assert_array_equal(variables["params"]["main_5"]["kernel"],
                                  np.transpose(golden["state_dict"]["main.5.weight"], (2, 3, 1, 0)))
    with pytest.raises(ValueError, match=r"missing.*batch_stats/main_6/var"):
        torch_to_flax({k: v for k, v in sd.items() if not k.endswith("main.6.running_var")},
                      CHECKPOINT_DISCRIMINATOR_PREFIX_MAP, target=target)


def test_release_size_parameter_count_and_shape():
    disc = NLayerDiscriminator()  # ndf 64, n_layers 2 as the release
    x = jnp.zeros((1, 64, 64, 3))
    shapes = jax.eval_shape(disc.init, jax.random.PRNGKey(0), x)
    count = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes["params"]))
    assert count == TAMING_COUNT_NDF64_NLAYERS2
    assert jax.eval_shape(disc.apply, shapes, jnp.zeros((1, 256, 256, 3))).shape == (1, 62, 62, 1)



def test_init_follows_taming_weights_init():
    # An "rbg" key: XLA on CPU compiles threefry draws for seconds each, RngBitGenerator at once.
    disc = NLayerDiscriminator(ndf=16)
    params = jax.jit(disc.init)(jax.random.key(0, impl="rbg"), jnp.zeros((1, 32, 32, 3)))["params"]
    kernel = np.asarray(params["main_5"]["kernel"])  # 4*4*32*64 draws of normal(0, 0.02)
    assert abs(kernel.mean()) < 5e-4 and abs(kernel.std() - 0.02) < 5e-4
    scale = np.concatenate([params["main_3"]["scale"], params["main_6"]["scale"]])
    assert abs(scale.mean() - 1.0) < 0.01 and 0.01 < scale.std() < 0.03
    np.testing.assert_array_equal(params["main_3"]["bias"], 0.0)
    assert "bias" not in params["main_2"] and "bias" not in params["main_5"]
    # Conv biases keep torch's default uniform(+-1/sqrt(fan_in)): taming's weights_init skips them.
    bias = np.asarray(params["main_0"]["bias"])
    assert np.all(np.abs(bias) <= 1 / np.sqrt(3 * 16)) and bias.std() > 0.05
    assert np.all(np.abs(params["main_8"]["bias"]) <= 1 / np.sqrt(64 * 16))
