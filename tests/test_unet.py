"""The latent-diffusion UNet (vqlc.gen.networks.unet): the release's two LDM-LC networks have
the parameter counts their architecture gives, the zero-initialised output, conditioning and
the null class, bfloat16 and remat, a short real training run through the `diffusion` task and
DDIM samples from it, parity with a torch UNet through vqlc.gen.convert_ldm,
the shipped LDM-LC configs, and the settings check_config refuses."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import tiny_tokenizer
from tests.test_diffusion_train import _mean_loss, _params
from vqlc.configs import dit_demo, ldm_lc_ffhq, ldm_lc_imagenet
from vqlc.gen import diffusion_train
from vqlc.gen.networks import unet

CLASSES, SIDE, CHANNELS = 5, 8, 8


def tiny(**overrides) -> unet.UNet:
    return unet.make_unet("Ti", **{"input_size": SIDE, "in_channels": CHANNELS,
                                   "num_classes": CLASSES, **overrides})


def batch(size: int = 4, seed: int = 0):
    x = jax.random.normal(jax.random.key(seed), (size, SIDE, SIDE, CHANNELS))
    t = jnp.linspace(0.0, 999.0, size).astype(jnp.int32)
    labels = jnp.arange(size, dtype=jnp.int32) % (CLASSES + 1)  # the null class included
    return x, t, labels


@jax.jit
def randomised(params, scale: float = 0.05, seed: int = 1):
    """Noise on every parameter: at init the output is exactly zero."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [leaf + scale * jax.random.normal(k, leaf.shape)
                                     for leaf, k in zip(leaves, keys)])


_CACHE = {}


def tiny_params():
    if "params" not in _CACHE:
        x, t, labels = batch()
        _CACHE["params"] = jax.jit(tiny().init)(jax.random.key(0), x, t, labels)["params"]
    return _CACHE["params"]


# --------------------------------------------------------------------------- parameter counts

def expected_count(in_channels, model_channels, channel_mult, num_res_blocks,
                   attention_resolutions, num_head_channels, context_dim):
    """openaimodel's UNetModel(use_spatial_transformer=True, transformer_depth=1, legacy) counted
    layer by layer from its constructor, as sum(p.numel()) over model.diffusion_model would."""
    def conv(i, o, k=3):
        return i * o * k * k + o

    def lin(i, o, bias=True):
        return i * o + (o if bias else 0)

    emb = 4 * model_channels

    def res(i, o):
        return (2 * i + conv(i, o) + lin(emb, o) + 2 * o + conv(o, o)
                + (conv(i, o, 1) if i != o else 0))

    def transformer(c):
        assert c % num_head_channels == 0
        attn1 = 3 * lin(c, c, False) + lin(c, c)
        attn2 = lin(c, c, False) + 2 * lin(context_dim, c, False) + lin(c, c)
        ff = lin(c, 2 * 4 * c) + lin(4 * c, c)
        return 2 * c + 2 * conv(c, c, 1) + 3 * 2 * c + attn1 + attn2 + ff

    total = lin(model_channels, emb) + lin(emb, emb) + conv(in_channels, model_channels)
    chans, ch, ds = [model_channels], model_channels, 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            total += res(ch, mult * model_channels)
            ch = mult * model_channels
            total += transformer(ch) if ds in attention_resolutions else 0
            chans.append(ch)
        if level != len(channel_mult) - 1:
            total += conv(ch, ch)
            chans.append(ch)
            ds *= 2
    total += 2 * res(ch, ch) + transformer(ch)
    for level, mult in reversed(list(enumerate(channel_mult))):
        for i in range(num_res_blocks + 1):
            total += res(ch + chans.pop(), mult * model_channels)
            ch = mult * model_channels
            total += transformer(ch) if ds in attention_resolutions else 0
            if level and i == num_res_blocks:
                total += conv(ch, ch)
                ds //= 2
    return total + 2 * ch + conv(model_channels, in_channels)


# The release's networks at the LC geometry: f16 over 16x16x8, f8 over 32x32x4 latents; the
# class table is 1,001 x 512 (ClassEmbedder n_classes 1001 / ours num_classes + 1).
RELEASE = {"f16": (16, 8, 270_265_864), "f8": (32, 4, 394_984_196)}


@pytest.mark.parametrize("variant", ["f16", "f8"])
def test_release_parameter_counts(variant):
    side, channels, count = RELEASE[variant]
    model = unet.make_unet(variant, input_size=side, in_channels=channels, num_classes=1000)
    counts = unet.param_counts(model)
    print(variant, counts)
    v = unet.VARIANTS[variant]
    assert count == expected_count(channels, v["model_channels"], v["channel_mult"],
                                   v["num_res_blocks"], v["attention_resolutions"],
                                   v["num_head_channels"], v["context_dim"])
    assert counts["unet"] == count
    assert counts["cond_stage_model"] == 1001 * 512
    assert counts["total"] == count + 1001 * 512


def test_parameter_names_follow_the_torch_state_dict():
    names = {"/".join(k.key for k in path)
             for path, _ in jax.tree_util.tree_leaves_with_path(tiny_params())}
    # Ti: levels (1, 2), one res block each, attention at rate 2 only.
    for name in ["time_embed_0/kernel", "time_embed_2/bias", "input_blocks_0_0/kernel",
                 "input_blocks_1_0/in_layers_0/scale", "input_blocks_1_0/emb_layers_1/kernel",
                 "input_blocks_1_0/out_layers_3/kernel", "input_blocks_2_0/op/kernel",
                 "input_blocks_3_0/skip_connection/kernel", "input_blocks_3_1/proj_in/kernel",
                 "input_blocks_3_1/transformer_blocks_0/attn1/to_q/kernel",
                 "input_blocks_3_1/transformer_blocks_0/attn2/to_out_0/bias",
                 "input_blocks_3_1/transformer_blocks_0/ff/net_0/proj/kernel",
                 "input_blocks_3_1/transformer_blocks_0/ff/net_2/kernel",
                 "input_blocks_3_1/transformer_blocks_0/norm3/scale",
                 "middle_block_1/proj_out/kernel", "middle_block_2/out_layers_0/bias",
                 "output_blocks_1_2/conv/kernel", "output_blocks_3_0/skip_connection/kernel",
                 "out_0/scale", "out_2/kernel", "cond_stage_model/embedding/embedding"]:
        assert name in names, name
    assert not any("to_q/bias" in n or "to_k/bias" in n or "to_v/bias" in n for n in names)
    assert tiny_params()["cond_stage_model"]["embedding"]["embedding"].shape == (CLASSES + 1,
                                                                                 32)


# -------------------------------------------------------------------------------- the forward

def test_output_shape_and_zero_at_init():
    x, t, labels = batch()
    out = jax.jit(tiny().apply)({"params": tiny_params()}, x, t, labels)
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert np.all(np.asarray(out) == 0.0)  # out_2 is zero-initialised
    model = tiny()
    assert model.out_channels == CHANNELS and model.null_label == CLASSES
    assert not model.learn_sigma


def test_conditioning_and_the_null_label():
    x, t, _ = batch()
    params = randomised(tiny_params())
    model = tiny()
    apply = jax.jit(model.apply)
    outs = [np.asarray(apply({"params": params}, x, t, jnp.full((4,), y, jnp.int32)))
            for y in (0, 1, model.null_label)]
    assert all(np.all(np.isfinite(o)) for o in outs)
    assert not np.allclose(outs[0], outs[1]) and not np.allclose(outs[0], outs[2])
    later = np.asarray(apply({"params": params}, x, t + 100, jnp.zeros((4,), jnp.int32)))
    assert not np.allclose(outs[0], later)  # the timestep matters too


def test_bfloat16_and_remat():
    x, t, labels = batch()
    params = randomised(tiny_params())
    reference = jax.jit(tiny().apply)({"params": params}, x, t, labels)
    half = jax.jit(tiny(dtype="bfloat16").apply)({"params": params}, x, t, labels)
    assert half.dtype == jnp.float32
    scale = float(jnp.max(jnp.abs(reference)))
    assert float(jnp.max(jnp.abs(half - reference))) < 0.05 * scale
    loss = lambda m: lambda p: jnp.mean(m.apply({"params": p}, x, t, labels) ** 2)  # noqa
    g_plain = jax.jit(jax.grad(loss(tiny())))(params)
    g_remat = jax.jit(jax.grad(loss(tiny(remat=True))))(params)
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_geometry_is_checked():
    with pytest.raises(ValueError, match="expects latents"):
        x, t, labels = batch()
        tiny(input_size=16).init(jax.random.key(0), x, t, labels)
    with pytest.raises(ValueError, match="multiple of 2"):
        tiny(input_size=7).check_geometry((1, 7, 7, CHANNELS))
    with pytest.raises(ValueError, match="valid sizes"):
        unet.make_unet("XL", input_size=8, in_channels=4)


# ------------------------------------------------------------------------ the diffusion task

@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    tok_dir = tiny_tokenizer.make_workdir(str(tmp_path_factory.mktemp("tok") / "run"))
    latents = tiny_tokenizer.make_tokens(tok_dir, str(tmp_path_factory.mktemp("enc") / "lat"),
                                         what="latents")
    return tok_dir, latents


def _config(dirs, **overrides):
    c = dit_demo.get_config("tiny")
    c.update_from_flattened_dict({
        "tokenizer.workdir": dirs[0], "data.tokens": dirs[1], "mesh.data": 1,
        "eval.at_end": False, "network.kind": "unet", "network.size": "Ti",
        "network.learn_sigma": False, "objective.schedule": "linear_sqrt",
        "eval.sampler.kind": "ddim", **overrides})
    return c


@pytest.fixture(scope="module")
def trained(dirs, tmp_path_factory):
    """(config, workdir) of a 60-step run of the tiny UNet."""
    workdir = str(tmp_path_factory.mktemp("unet") / "run")
    c = _config(dirs, **{"train.num_steps": 60, "optim.lr": 2e-3})
    results = diffusion_train.run(c, workdir)
    assert results["step"] == 60
    return c, workdir


def test_tiny_unet_trains_through_the_diffusion_task(dirs, trained):
    c, workdir = trained
    model = diffusion_train.make_model(c.network, c.model, (8, 8, 8))
    assert isinstance(model, unet.UNet)
    initial = jax.jit(diffusion_train.init_params_fn(model, (8, 8, 8)))(jax.random.key(c.seed))
    before = _mean_loss(workdir, initial, dirs[1])
    after = _mean_loss(workdir, _params(workdir), dirs[1])
    print(f"loss on fixed keys: {before:.4f} at init, {after:.4f} after 60 steps")
    assert after < 0.8 * before, (before, after)


def test_sample_task_draws_from_a_trained_unet(dirs, trained, tmp_path):
    """learn_sigma False reaches the sampler (C output channels) and guidance uses the UNet's
    null class: LDM's DDIM with classifier-free guidance."""
    from vqlc.configs import sample_demo
    from vqlc.gen import sample
    c = sample_demo.get_config("tiny")
    c.update_from_flattened_dict({
        "tokenizer.workdir": dirs[0], "generator.kind": "diffusion",
        "generator.workdir": trained[1], "sample.per_class": 1, "mesh.data": 1,
        "generator.diffusion.kind": "ddim", "generator.diffusion.num_steps": 5,
        "generator.diffusion.cfg_scale": 2.0})
    out = str(tmp_path / "samples")
    sample.run(c, out)
    with np.load(os.path.join(out, "samples.npz")) as a:
        assert a["arr_0"].shape == (7, 16, 16, 3)


@pytest.mark.parametrize("overrides, message", [
    ({"objective.kind": "flow", "eval.sampler.kind": "euler"}, "objective.kind='ddpm'"),
    ({"network.size": "XL/2"}, "valid sizes"),
    ({"network.learn_sigma": True}, "learn_sigma=False"),
])
def test_bad_unet_settings_fail_clearly(dirs, overrides, message):
    with pytest.raises(ValueError, match=message):
        diffusion_train.check_config(_config(dirs, **overrides))


# ---------------------------------------------------------------------------- shipped configs

@pytest.mark.parametrize("variant, lr, batch_size, cfg", [
    ("", 4.5e-5 * 56 * 8, 448, 1.6), ("f8", 1e-5 * 32 * 8, 256, 1.4)])
def test_ldm_lc_imagenet_is_the_releases_model_and_schedule(variant, lr, batch_size, cfg):
    c = ldm_lc_imagenet.get_config(variant)
    diffusion_train.check_config(c)
    side, channels, count = RELEASE[variant or "f16"]
    model = diffusion_train.make_model(c.network, c.model, (side, side, channels))
    assert unet.param_counts(model)["unet"] == count
    assert c.objective.schedule == "linear_sqrt" and c.objective.latent_norm == "none"
    assert not c.network.learn_sigma and c.network.class_dropout == 0.1
    assert c.train.batch_size == batch_size and c.optim.lr == pytest.approx(lr)
    assert c.train.num_steps == 100 * (1_281_167 // batch_size)  # 100 epochs
    assert (c.optim.weight_decay, c.optim.ema_decay, c.optim.warmup_steps) == (0.01, 0.9999, 0)
    s = c.eval.sampler
    assert (s.kind, s.num_steps, s.eta, s.cfg_scale, s.guided_channels) == ("ddim", 200, 1.0,
                                                                           cfg, 0)
    assert c.eval.per_class == 50
    bf16 = ldm_lc_imagenet.get_config(",".join(filter(None, [variant, "bf16"])))
    assert bf16.model.dtype == "bfloat16" and bf16.model.remat == "blocks"


def test_ldm_lc_ffhq_is_unconditional():
    c = ldm_lc_ffhq.get_config()
    diffusion_train.check_config(c)
    model = diffusion_train.make_model(c.network, c.model, (16, 16, 8))
    assert c.network.num_classes == 0 and model.null_label == 0
    assert unet.param_counts(model)["cond_stage_model"] == 512  # the one null-class row
    assert c.eval.sampler.cfg_scale == 1.0


# ------------------------------------------------------------------- parity with the torch UNet

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "ldm_unet_tiny.npz")


def test_matches_the_torch_unet_through_the_converter():
    """tests/golden/make_ldm_unet_golden.py: our own torch UNet with openaimodel's module names
    (random weights), its LatentDiffusion-layout state dict and float64 outputs."""
    from vqlc.gen import convert_ldm
    with np.load(GOLDEN) as f:
        golden = {k: f[k] for k in f.files}
    state_dict = {k[len("sd/"):]: v.astype(np.float32) for k, v in golden.items()
                  if k.startswith("sd/")}
    model = unet.UNet(input_size=8, in_channels=4, model_channels=32, channel_mult=(1, 1),
                      num_res_blocks=1, attention_resolutions=(1, 2), num_head_channels=16,
                      context_dim=16, num_classes=6)
    params = convert_ldm.torch_to_params(state_dict, template=unet.param_shapes(model))
    x = jnp.asarray(golden["in/x"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
    out = jax.jit(model.apply)({"params": params}, x, jnp.asarray(golden["in/t"], jnp.int32),
                               jnp.asarray(golden["in/y"], jnp.int32))
    np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), golden["out/eps"],
                               atol=1e-4, rtol=0)

    # LitEma's copies: the same names with the dots removed; the class table has none.
    ema = dict(state_dict)
    for key in [k for k in state_dict if k.startswith(convert_ldm.UNET_PREFIX)]:
        ema[convert_ldm.ema_key(key)] = 2 * state_dict[key]
    doubled = convert_ldm.torch_to_params(ema, ema=True)
    np.testing.assert_array_equal(doubled["out_2"]["kernel"], 2 * params["out_2"]["kernel"])
    np.testing.assert_array_equal(doubled["cond_stage_model"]["embedding"]["embedding"],
                                  params["cond_stage_model"]["embedding"]["embedding"])
    wrong = unet.UNet(input_size=8, in_channels=4, model_channels=32, channel_mult=(1, 1),
                      num_res_blocks=1, attention_resolutions=(2,), num_head_channels=16,
                      context_dim=16, num_classes=6)
    with pytest.raises(ValueError, match="unexpected"):
        convert_ldm.torch_to_params(state_dict, template=unet.param_shapes(wrong))
