"""vqlc.cls (issue 14's foundations): the ViT against timm / MAE's fine-tuning model on a tiny
MAE checkpoint in the release's layout (tests/golden/make_mae_golden.py), the position-embedding
interpolation against PyTorch's bicubic, MAE's layer-wise lr decay and weight-decay groups,
mixup / cutmix on token maps, drop path, the stems, and the errors."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vqlc.cls import convert_mae, pos_embed, recipe, vit

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
PTH = os.path.join(GOLDEN, "mae_tiny.pth")
# The golden's geometry: depth 2, width 48, 3 heads, patch 4, pretrained at 32 px (8x8), 5 classes.
TINY = dict(depth=2, width=48, num_heads=3, patch_size=4, num_classes=5)


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(os.path.join(GOLDEN, "mae_tiny.npz")))


def tiny(grid_size=8, **fields):
    return vit.ViT(grid_size=grid_size, **{**TINY, **fields})


def with_golden_head(params, golden):
    """The deterministic head / fc_norm the golden's PyTorch model was given."""
    params = dict(params)
    params["head"] = {"kernel": golden["fresh/head_weight"].T, "bias": golden["fresh/head_bias"]}
    params["fc_norm"] = {"scale": golden["fresh/fc_norm_weight"],
                         "bias": golden["fresh/fc_norm_bias"]}
    return params


# ------------------------------------------------------------------------- MAE conversion

@pytest.mark.parametrize("px", [32, 40])
def test_mae_conversion_matches_timm(golden, px):
    """32 px: the checkpoint's own 8x8 grid; 40 px: pos_embed interpolated 8x8 -> 10x10 as
    MAE's interpolate_pos_embed does."""
    model = tiny(grid_size=px // 4)
    params, report = convert_mae.convert_mae_file(PTH, model)
    assert report["pos_embed"] == ("kept 8x8" if px == 32 else "8x8 -> 10x10")
    assert sorted(report["fresh"]) == ["fc_norm/bias", "fc_norm/scale", "head/bias",
                                       "head/kernel"]
    assert sorted(report["skipped"]) == ["norm.bias", "norm.weight"]
    assert "fc_norm" in report["skipped"]["norm.weight"]
    assert len(report["loaded"]) == 4 + 2 * 12  # cls, pos, patch conv w/b + 12 per block
    images = jnp.asarray(golden[f"in/images{px}"].transpose(0, 2, 3, 1))
    out = model.apply({"params": with_golden_head(params, golden)}, images)
    assert out.shape == (3, 5) and out.dtype == jnp.float32
    assert float(np.max(np.abs(np.asarray(out) - golden[f"out/logits{px}"]))) < 1e-4
    assert float(np.abs(golden[f"out/logits{px}"]).mean()) > 0.1  # not a vacuous comparison


def test_mae_fresh_head_is_maes_init():
    params, _ = convert_mae.convert_mae_file(PTH, tiny(num_classes=1000), seed=3)
    kernel = np.asarray(params["head"]["kernel"])
    assert kernel.shape == (48, 1000) and np.all(np.asarray(params["head"]["bias"]) == 0)
    assert 1e-5 < kernel.std() < 3e-5 and np.abs(kernel).max() <= 2 * 2e-5 + 1e-12
    assert np.all(np.asarray(params["fc_norm"]["scale"]) == 1)
    assert np.all(np.asarray(params["fc_norm"]["bias"]) == 0)


@pytest.mark.parametrize("stem,fields,shape", [
    ("projected", dict(in_channels=8), (2, 8, 8, 8)),
    ("codebook", dict(in_channels=32), (2, 8, 8, 32)),
    ("embed", dict(vocab_size=50), (2, 8, 8)),
])
def test_mae_conversion_for_token_stems_skips_patch_embed(stem, fields, shape):
    model = tiny(stem=stem, **fields)
    params, report = convert_mae.convert_mae_file(PTH, model)
    assert {"patch_embed.proj.weight", "patch_embed.proj.bias"} <= set(report["skipped"])
    assert "replaces MAE's patch embedding" in report["skipped"]["patch_embed.proj.weight"]
    assert "patch_embed" not in params and "stem" in params
    assert any(p.startswith("stem/") for p in report["fresh"])
    x = (jnp.zeros(shape, jnp.int32) if stem == "embed"
         else jax.random.normal(jax.random.key(0), shape))
    assert model.apply({"params": params}, x).shape == (2, 5)


def test_mae_conversion_errors_name_keys(tmp_path, golden):
    state = convert_mae.read_mae_checkpoint(PTH)
    with pytest.raises(ValueError, match=r"(?s)missing.*blocks_2.*has depth 2.*asks for depth 3"):
        convert_mae.mae_to_params(state, tiny(depth=3))
    with pytest.raises(ValueError, match=r"unexpected checkpoint keys.*blocks\.1\.attn\.qkv"):
        convert_mae.mae_to_params(state, tiny(depth=1))
    with pytest.raises(ValueError, match=r"shapes that disagree.*cls_token"):
        convert_mae.mae_to_params(state, tiny(width=96))
    extra = dict(state, **{"blocks.0.ls1.gamma": np.ones(48, np.float32)})
    with pytest.raises(ValueError,
                       match=r"unexpected checkpoint keys: \['blocks\.0\.ls1\.gamma'\]"):
        convert_mae.mae_to_params(extra, tiny())
    # MAE's pretraining decoder (a full main_pretrain.py checkpoint) is skipped, listed.
    with_decoder = dict(state, mask_token=np.zeros((1, 1, 16), np.float32),
                        **{"decoder_pred.weight": np.zeros((48, 16), np.float32)})
    _, report = convert_mae.mae_to_params(with_decoder, tiny())
    assert report["skipped"]["mask_token"] == "MAE's pretraining decoder"
    # A fine-tuned checkpoint's layout (fc_norm + head, no norm): fc_norm used; a head for
    # another label set skipped whole and re-initialised (main_finetune.py --finetune).
    finetuned = {k: v for k, v in state.items() if not k.startswith("norm.")}
    finetuned.update({"fc_norm.weight": np.full(48, 2.0, np.float32),
                      "fc_norm.bias": np.zeros(48, np.float32),
                      "head.weight": np.ones((7, 48), np.float32),
                      "head.bias": np.ones(7, np.float32)})
    params, report = convert_mae.mae_to_params(finetuned, tiny())
    assert "does not fit 5 classes" in report["skipped"]["head.weight"]
    assert "head.bias" in report["skipped"] and sorted(report["fresh"]) == ["head/bias",
                                                                          "head/kernel"]
    assert np.all(params["fc_norm"]["scale"] == 2.0) and np.all(params["head"]["bias"] == 0)
    with pytest.raises(ValueError, match=r"pos_embed \(1, 64, 48\)"):  # not 1 + a square
        convert_mae.mae_to_params(dict(state, pos_embed=np.zeros((1, 64, 48), np.float32)),
                                  tiny())
    with pytest.raises(FileNotFoundError, match="mae_pretrain_vit_base"):
        convert_mae.read_mae_checkpoint(str(tmp_path / "nope.pth"))


def test_global_pool_false_keeps_norm():
    params, report = convert_mae.convert_mae_file(PTH, tiny(global_pool=False))
    assert "norm.weight" in report["loaded"] and "fc_norm" not in params
    assert sorted(report["fresh"]) == ["head/bias", "head/kernel"]


# ------------------------------------------------------------------- pos-embed interpolation

@pytest.mark.parametrize("side", [7, 16, 20])
def test_pos_embed_interpolation_matches_torch_bicubic(golden, side):
    table = golden["pe/table"]  # [1, 1 + 14*14, 8]
    out = pos_embed.interpolate_pos_embed(table, side)
    want = golden[f"pe/side{side}"]
    assert out.shape == want.shape == (1, 1 + side * side, 8) and out.dtype == np.float32
    assert np.array_equal(out[:, 0], table[:, 0])  # the class token is kept
    assert float(np.max(np.abs(out - want))) < 1e-5


def test_pos_embed_interpolation_edges():
    table = np.random.default_rng(0).standard_normal((1, 1 + 9, 4)).astype(np.float32)
    assert np.array_equal(pos_embed.interpolate_pos_embed(table, 3), table)
    # torch's kernel (a = -0.75), not Keys a = -0.5: the rows of the matrix sum to 1
    m = pos_embed.bicubic_matrix(14, 16)
    assert np.allclose(m.sum(axis=1), 1.0)
    with pytest.raises(ValueError, match="square grid"):
        pos_embed.interpolate_pos_embed(table[:, :9], 4)


# ---------------------------------------------------------------------- layer-wise decay

def test_layer_decay_assigns_maes_scales():
    model = vit.make_vit("B/16", grid_size=16, num_classes=10)
    shapes = vit.param_shapes(model)
    scales = recipe.lr_scales(shapes, depth=12, decay=0.65)
    num_layers = 13
    mae = [0.65 ** (num_layers - i) for i in range(num_layers + 1)]  # MAE's layer_scales
    assert recipe.layer_scales(12, 0.65) == mae
    assert scales["cls_token"] == scales["pos_embed"] == mae[0]
    assert scales["patch_embed"]["proj"]["kernel"] == mae[0]
    for i in range(12):
        leaves = jax.tree.leaves(scales[f"blocks_{i}"])
        assert leaves and all(s == mae[i + 1] for s in leaves)
    assert scales["head"]["kernel"] == scales["fc_norm"]["scale"] == mae[13] == 1.0
    token = vit.make_vit("B/16", grid_size=16, num_classes=10, stem="projected", in_channels=8)
    assert recipe.lr_scales(vit.param_shapes(token), 12)["stem"]["proj"]["kernel"] == mae[0]

    mask = recipe.weight_decay_mask(shapes)
    assert not mask["cls_token"] and not mask["pos_embed"]
    assert mask["patch_embed"]["proj"]["kernel"] and not mask["patch_embed"]["proj"]["bias"]
    assert mask["blocks_3"]["attn"]["qkv"]["kernel"] and not mask["blocks_3"]["norm1"]["scale"]
    assert mask["head"]["kernel"] and not mask["head"]["bias"] and not mask["fc_norm"]["bias"]


def test_optimizer_is_torch_adamw_with_group_scales():
    """One step from zero moments: update = -lr * scale * (sign-like adam(g) + wd * p)."""
    params = {"blocks_0": {"mlp": {"fc1": {"kernel": jnp.full((2, 3), 2.0),
                                           "bias": jnp.full((3,), 2.0)}}},
              "head": {"kernel": jnp.full((3, 4), 2.0)},
              "pos_embed": jnp.full((1, 5, 3), 2.0)}
    grads = jax.tree.map(jnp.ones_like, params)
    tx = recipe.make_optimizer(params, 0.1, depth=2, layer_decay=0.5, weight_decay=0.05)
    updates, _ = tx.update(grads, tx.init(params), params)
    adam = 1.0 / (1.0 + 1e-8)  # first step of Adam on a constant gradient
    np.testing.assert_allclose(updates["head"]["kernel"], -0.1 * 1.0 * (adam + 0.05 * 2.0),
                               rtol=2e-5)
    np.testing.assert_allclose(updates["blocks_0"]["mlp"]["fc1"]["kernel"],
                               -0.1 * 0.5 ** 2 * (adam + 0.05 * 2.0), rtol=2e-5)
    np.testing.assert_allclose(updates["blocks_0"]["mlp"]["fc1"]["bias"],
                               -0.1 * 0.5 ** 2 * adam, rtol=2e-5)
    np.testing.assert_allclose(updates["pos_embed"], -0.1 * 0.5 ** 3 * adam, rtol=2e-5)
    schedule = recipe.mae_lr_schedule(1e-3, warmup_steps=10, total_steps=110, min_lr=1e-6)
    assert float(schedule(0)) == 0.0 and abs(float(schedule(5)) - 5e-4) < 1e-9
    assert abs(float(schedule(10)) - 1e-3) < 1e-9 and abs(float(schedule(110)) - 1e-6) < 1e-9
    assert isinstance(tx, optax.GradientTransformation)


# -------------------------------------------------------------------------- mixup / cutmix

def test_mixup_cutmix_on_token_maps():
    config = recipe.MixupConfig(num_classes=10)
    x = jax.random.normal(jax.random.key(0), (6, 16, 16, 8))
    labels = jnp.arange(6) % 10

    @jax.jit
    def draw(key):
        mix = recipe.draw_mix(key, (16, 16), config)
        return mix, recipe.mix_targets(labels, mix, 10, 0.1), recipe.mix_vectors(x, mix)

    kinds = set()
    for i in range(40):
        mix, targets, mixed = draw(jax.random.key(i))
        np.testing.assert_allclose(np.asarray(targets).sum(axis=1), 1.0, atol=1e-6)
        lam = float(mix.lam)
        if bool(mix.use_cutmix):
            kinds.add("cutmix")
            area = int(np.asarray(mix.mask).sum())
            y0, y1, x0, x1 = np.asarray(mix.box)
            assert area == (y1 - y0) * (x1 - x0)
            assert abs(lam - (1.0 - area / 256.0)) < 1e-6  # lambda = the unpasted fraction
            inside = np.asarray(mix.mask)
            got, want = np.asarray(mixed), np.asarray(x)
            np.testing.assert_array_equal(got[:, inside], want[::-1][:, inside])
            np.testing.assert_array_equal(got[:, ~inside], want[:, ~inside])
        else:
            kinds.add("mixup")
            assert not np.asarray(mix.mask).any() and 0.0 <= lam <= 1.0
            np.testing.assert_allclose(mixed, lam * x + (1 - lam) * x[::-1], atol=1e-6)
        # the label weights follow lam: the sample's own class gets lam*(on-off) + off (+ flip's)
        t = np.asarray(targets)
        own = lam * 0.9 + 0.01 + (1 - lam) * 0.9 * (labels[0] == labels[-1])
        assert abs(t[0, int(labels[0])] - own) < 1e-5
    assert kinds == {"cutmix", "mixup"}

    # ids: cutmix-only pastes ids; a mixup-capable draw is refused
    ids = jax.random.randint(jax.random.key(1), (4, 16, 16), 0, 100)
    cut_only = recipe.MixupConfig(num_classes=10, mixup_alpha=0.0)
    mix = recipe.draw_mix(jax.random.key(2), (16, 16), cut_only)
    pasted = np.asarray(recipe.cut_paste(ids, mix))
    assert pasted.dtype == np.asarray(ids).dtype
    inside = np.asarray(mix.mask)
    assert inside.any() or float(mix.lam) == 1.0
    np.testing.assert_array_equal(pasted[:, inside], np.asarray(ids[::-1])[:, inside])
    with pytest.raises(ValueError, match="cannot apply a mixup"):
        recipe.cut_paste(ids, recipe.draw_mix(jax.random.key(2), (16, 16), config))
    with pytest.raises(ValueError, match="blends float vectors"):
        recipe.mix_vectors(ids[..., None], mix)
    # no mixing: prob 0 -> lam 1, the input unchanged, smoothed one-hot targets
    off = recipe.MixupConfig(num_classes=10, prob=0.0)
    mixed, targets, mix = recipe.mix_batch(jax.random.key(3), x, labels, off)
    assert float(mix.lam) == 1.0 and np.array_equal(mixed, x)
    np.testing.assert_allclose(np.asarray(targets).max(axis=1), 0.91, atol=1e-6)


def test_embed_stem_mixes_embedded_vectors():
    model = tiny(grid_size=4, stem="embed", vocab_size=30)
    params = vit.init_params(model, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (2, 4, 4), 0, 30)
    vectors = vit.embed_ids(params, ids)
    assert vectors.shape == (2, 4, 4, 48)
    apply = jax.jit(model.apply)
    np.testing.assert_allclose(apply({"params": params}, ids),
                               apply({"params": params}, vectors), atol=1e-6)
    mix = recipe.draw_mix(jax.random.key(0), (4, 4), recipe.MixupConfig(num_classes=5))
    assert apply({"params": params}, recipe.mix_vectors(vectors, mix)).shape == (2, 5)

    @jax.jit
    @jax.grad
    def grad(p):  # the table gets gradients through embed_ids (as a mixed train step would)
        return model.apply({"params": p}, recipe.mix_vectors(vit.embed_ids(p, ids), mix)).sum()
    assert float(jnp.abs(grad(params)["stem"]["embedding"]).sum()) > 0


# ------------------------------------------------------------------- network and its errors

def test_drop_path_identity_at_eval_random_at_train():
    model = tiny(grid_size=4, stem="projected", in_channels=8, drop_path=0.5, depth=4)
    x = jax.random.normal(jax.random.key(0), (8, 4, 4, 8))
    params = vit.init_params(model, jax.random.key(1))
    params["head"]["kernel"] = jax.random.normal(jax.random.key(2), (48, 5))
    apply = jax.jit(model.apply, static_argnames="train")
    evaluated = apply({"params": params}, x)
    again = apply({"params": params}, x, train=False, rngs={"dropout": jax.random.key(3)})
    np.testing.assert_array_equal(evaluated, again)
    no_drop = tiny(grid_size=4, stem="projected", in_channels=8, drop_path=0.0, depth=4)
    np.testing.assert_allclose(jax.jit(no_drop.apply)({"params": params}, x), evaluated,
                               atol=1e-6)
    a = apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(4)})
    b = apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(5)})
    assert np.max(np.abs(a - b)) > 1e-4 and np.max(np.abs(a - evaluated)) > 1e-4
    assert vit.drop_path_rates(0.5, 4) == [0.0, 0.5 / 3, 1.0 / 3, 0.5]
    with pytest.raises(ValueError, match="needs a 'dropout' rng"):
        model.apply({"params": params}, x, train=True)
    remat = tiny(grid_size=4, stem="projected", in_channels=8, drop_path=0.5, depth=4, remat=True)
    remat_apply = jax.jit(remat.apply, static_argnames="train")
    np.testing.assert_allclose(
        remat_apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(4)}), a,
        atol=1e-5)


@pytest.mark.parametrize("stem,fields,shape,dtype", [
    ("pixels", {}, (2, 32, 32, 3), jnp.float32),
    ("projected", dict(in_channels=8), (2, 8, 8, 8), jnp.float32),
    ("codebook", dict(in_channels=64), (2, 8, 8, 64), jnp.float32),
    ("embed", dict(vocab_size=100), (2, 8, 8), jnp.int32),
])
def test_stems_shapes(stem, fields, shape, dtype):
    model = tiny(stem=stem, **fields)
    assert model.input_shape(2) == shape
    params = vit.init_params(model, jax.random.key(0))
    assert ("patch_embed" in params) == (stem == "pixels")
    assert ("stem" in params) == (stem != "pixels")
    assert params["pos_embed"].shape == (1, 65, 48) and params["cls_token"].shape == (1, 1, 48)
    x = (jax.random.randint(jax.random.key(1), shape, 0, 100) if dtype == jnp.int32
         else jax.random.normal(jax.random.key(1), shape))
    out = model.apply({"params": params}, x)
    assert out.shape == (2, 5) and out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
    bf16 = tiny(stem=stem, dtype=jnp.bfloat16, **fields)
    assert np.max(np.abs(bf16.apply({"params": params}, x) - out)) < 0.1


def test_bad_inputs_raise_clear_errors():
    model = tiny(stem="projected", in_channels=8)
    params = vit.init_params(model, jax.random.key(0))
    with pytest.raises(ValueError, match=r"position embedding holds 65 rows.*8x8.*interpolat"):
        model.apply({"params": params}, jnp.zeros((2, 10, 10, 8)))
    with pytest.raises(ValueError, match=r"expects per-token projected vectors \[2, 8, 8, 8\]"):
        model.apply({"params": params}, jnp.zeros((2, 8, 8, 16)))
    with pytest.raises(ValueError, match="only stem='embed' takes token ids"):
        model.apply({"params": params}, jnp.zeros((2, 8, 8, 8), jnp.int32))
    with pytest.raises(ValueError, match=r"stem='patches'; valid: pixels, projected, codebook"):
        tiny(stem="patches").init(jax.random.key(0), jnp.zeros((1, 8, 8, 8)))
    with pytest.raises(ValueError, match="needs vocab_size"):
        vit.init_params(tiny(stem="embed"), jax.random.key(0))
    pixels = tiny()
    with pytest.raises(ValueError, match=r"NHWC images \[1, 32, 32, 3\]"):
        pixels.init(jax.random.key(0), jnp.zeros((1, 3, 32, 32)))
    with pytest.raises(ValueError, match="valid sizes"):
        vit.make_vit("XXL/16", grid_size=16)
    with pytest.raises(ValueError, match="come from the name"):
        vit.make_vit("B/16", grid_size=16, depth=3)


def test_recipe_pieces_train_a_tiny_vit():
    """The pieces together (mixup on projected vectors, soft targets, MAE's AdamW with layer
    decay, drop path): a jitted step runs and a few steps lower the unmixed loss."""
    model = tiny(grid_size=4, stem="projected", in_channels=8, drop_path=0.1)
    params = vit.init_params(model, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (8, 4, 4, 8))
    labels = jnp.arange(8) % 5
    mixing = recipe.MixupConfig(num_classes=5)
    tx = recipe.make_optimizer(params, 1e-3, depth=2)

    def loss_fn(p, key, mix: bool):
        k_mix, k_drop = jax.random.split(key)
        if mix:
            inputs, targets, _ = recipe.mix_batch(k_mix, x, labels, mixing)
        else:
            inputs, targets = x, recipe.mix_targets(labels, None, 5, 0.1)
        logits = model.apply({"params": p}, inputs, train=True, rngs={"dropout": k_drop})
        return recipe.soft_cross_entropy(logits, targets)

    @jax.jit
    def step(p, opt_state, key):
        loss, grads = jax.value_and_grad(loss_fn)(p, key, True)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    evaluate = jax.jit(lambda p: recipe.soft_cross_entropy(
        model.apply({"params": p}, x), recipe.mix_targets(labels, None, 5, 0.1)))
    before = float(evaluate(params))
    opt_state = tx.init(params)
    for i in range(15):
        params, opt_state, loss = step(params, opt_state, jax.random.key(10 + i))
        assert np.isfinite(float(loss))
    assert float(evaluate(params)) < before - 0.05
