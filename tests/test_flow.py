"""Flow matching (vqlc.gen.objectives.flow) and its ODE and SDE samplers.

The samplers are checked on a toy whose exact velocity is known in closed form: data
x1 ~ N(MU, S^2) per coordinate, x0 ~ N(0, 1), x_t = alpha x1 + sigma x0. Then x_t is Gaussian
with mean m = alpha MU and variance V = alpha^2 S^2 + sigma^2, and conditioning a Gaussian pair
gives
    E[x1 | x] = MU + alpha S^2 / V (x - m),   E[x0 | x] = sigma / V (x - m),
    v*(x, t) = E[d_alpha x1 + d_sigma x0 | x]
             = d_alpha MU + (d_alpha alpha S^2 + d_sigma sigma) / V (x - m),
    score*(x, t) = -(x - m) / V.
The exact ODE flow is x(t) = m(t) + sqrt(V(t) / V(t0)) (x(t0) - m(t0)): starting from noise z
at t = 0 it ends at MU + S z.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqlc.gen.objectives import flow
from vqlc.gen.samplers.ode import initial_noise, sample_ode
from vqlc.gen.samplers.sde import sample_sde

MU, S = 1.5, 0.5
WRONG_SCALE = 1.2  # label 1 gets a velocity this many times too large
SHAPE = (16, 16, 1)  # one sample: 256 iid coordinates
SAMPLES_PER_GROUP = 8  # 2048 points for the exact field and 2048 for the wrong one


# ------------------------------------------------------------------------------------- toy

def exact_prediction(interpolant, prediction, x, t):
    """What a perfect network outputs on the toy."""
    c = flow.expand_like(flow.coefficients(interpolant, t), x)
    mean, var = c.alpha * MU, c.alpha ** 2 * S ** 2 + c.sigma ** 2
    if prediction == "velocity":
        slope = (c.d_alpha * c.alpha * S ** 2 + c.d_sigma * c.sigma) / var
        return c.d_alpha * MU + slope * (x - mean)
    if prediction == "score":
        return -(x - mean) / var
    return c.sigma / var * (x - mean)


def toy_velocity_model(x, t, labels):
    """The exact linear-path velocity for label 0, a scaled (wrong) one for label 1."""
    scale = jnp.where(labels == 1, WRONG_SCALE, 1.0).reshape(-1, 1, 1, 1)
    return scale * exact_prediction("linear", "velocity", x, t)


def toy_batch():
    keys = jax.random.split(jax.random.key(0), 2 * SAMPLES_PER_GROUP)
    labels = jnp.repeat(jnp.array([0, 1], jnp.int32), SAMPLES_PER_GROUP)
    return keys, labels


def recovers(x, disc):
    """Whether the points x have mean MU and variance S^2, up to sampling noise and `disc`.

    Four standard errors of the sample mean (S / sqrt(N)) and of the sample variance
    (S^2 sqrt(2 / (N - 1)) for Gaussian points) make a false failure rarer than 1e-4. `disc`
    bounds the solver's error on each point: it moves the mean by at most disc and the
    standard deviation by at most disc, so the variance by at most 2 S disc + disc^2."""
    x = np.asarray(x, np.float64).ravel()
    n = x.size
    mean_tol = 4 * S / math.sqrt(n) + disc
    var_tol = 4 * S ** 2 * math.sqrt(2 / (n - 1)) + 2 * S * disc + disc ** 2
    return abs(x.mean() - MU) <= mean_tol and abs(x.var(ddof=1) - S ** 2) <= var_tol


# Per-point error allowances. Euler is first order: its error is about dt times the field's
# variation along a path (order 1 here). Heun is second order; dopri5 at rtol 1e-5 is far
# tighter still. SiT's SDE sampler takes its last step (from t = 1 - 0.04) without noise,
# which by design leaves the variance a few thousandths short, plus an O(dt) Euler–Maruyama
# error.
ODE_CASES = {"euler": (dict(num_steps=100), 0.05),
             "heun": (dict(num_steps=10), 0.02),
             "dopri5": (dict(rtol=1e-5), 1e-3)}
SDE_DISC = 0.01


# --------------------------------------------------------------------- interpolant, targets

def test_interpolants_and_targets_on_fixed_numbers():
    x1, x0, t = jnp.float32(2.0), jnp.float32(-1.0), 0.25
    # linear: alpha = t, sigma = 1 - t
    assert float(flow.interpolate("linear", t, x0, x1)) == pytest.approx(0.25 * 2 - 0.75)
    assert float(flow.target("linear", "velocity", t, x0, x1)) == pytest.approx(3.0)
    assert float(flow.target("linear", "score", t, x0, x1)) == pytest.approx(1 / 0.75)
    assert float(flow.target("linear", "noise", t, x0, x1)) == pytest.approx(-1.0)
    # gvp: alpha = sin(pi t / 2), sigma = cos(pi t / 2)
    a, s = math.sin(math.pi / 8), math.cos(math.pi / 8)
    assert float(flow.interpolate("gvp", t, x0, x1)) == pytest.approx(2 * a - s, abs=1e-6)
    assert float(flow.target("gvp", "velocity", t, x0, x1)) == pytest.approx(
        math.pi / 2 * (2 * s + a), abs=1e-5)
    assert float(flow.target("gvp", "score", t, x0, x1)) == pytest.approx(1 / s, abs=1e-6)
    c = flow.coefficients("gvp", t)
    assert (float(c.alpha), float(c.sigma)) == pytest.approx((a, s), abs=1e-6)
    assert (float(c.d_alpha), float(c.d_sigma)) == pytest.approx(
        (math.pi / 2 * s, -math.pi / 2 * a), abs=1e-6)


@pytest.mark.parametrize("interpolant", flow.INTERPOLANTS)
def test_time_direction_noise_at_zero_data_at_one(interpolant):
    x1, x0 = jnp.array([2.0, 3.0]), jnp.array([-1.0, 0.5])
    np.testing.assert_allclose(flow.interpolate(interpolant, 0.0, x0, x1), x0, atol=1e-6)
    np.testing.assert_allclose(flow.interpolate(interpolant, 1.0, x0, x1), x1, atol=1e-6)


@pytest.mark.parametrize("interpolant", flow.INTERPOLANTS)
@pytest.mark.parametrize("t", [0.25, 0.7])
def test_conversions_round_trip_on_fixed_numbers(interpolant, t):
    # With a single (x0, x1) pair as the "posterior", the three targets are one quantity.
    x1, x0 = jnp.float32(2.0), jnp.float32(-1.0)
    x = flow.interpolate(interpolant, t, x0, x1)
    v, s, n = (flow.target(interpolant, p, t, x0, x1) for p in ("velocity", "score", "noise"))
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)  # noqa: E731
    close(flow.score_from_velocity(interpolant, v, x, t), s)
    close(flow.velocity_from_score(interpolant, s, x, t), v)
    close(flow.noise_from_velocity(interpolant, v, x, t), n)
    close(flow.velocity_from_noise(interpolant, n, x, t), v)
    close(flow.score_from_noise(interpolant, n, x, t), s)
    if interpolant == "linear" and t == 0.25:  # the numbers, worked by hand: x = -0.25
        assert (float(v), float(s), float(n)) == pytest.approx((3.0, 4 / 3, -1.0))
        assert float(flow.drift_var(flow.coefficients("linear", t))) == pytest.approx(3.0)


def test_drift_uses_only_the_first_channels():
    x = jnp.ones((2, 1, 1, 3))
    t = jnp.array([0.3, 0.6])
    wide = lambda x, t, labels: jnp.concatenate([2 * x, 100 + x], axis=-1)  # noqa: E731
    np.testing.assert_allclose(flow.drift(wide, prediction="velocity")(x, t, None), 2 * x)
    score = flow.score_function(wide, prediction="noise")(x, t, None)
    np.testing.assert_allclose(score, -2 * x / (1 - t).reshape(-1, 1, 1, 1), rtol=1e-6)


# ----------------------------------------------------------------------------------- loss

@pytest.mark.parametrize("interpolant", flow.INTERPOLANTS)
@pytest.mark.parametrize("prediction", flow.PREDICTIONS)
def test_loss_is_zero_for_the_exact_target(interpolant, prediction):
    x1 = jax.random.normal(jax.random.key(1), (4, 2, 2, 3))

    seen_t = []

    def oracle(x, t, labels):  # knows the data, so recovers x0 from x_t; 2C channels out
        seen_t.append(t)
        c = flow.expand_like(flow.coefficients(interpolant, t), x)
        x0 = (x - c.alpha * x1) / c.sigma
        out = flow.target(interpolant, prediction, t, x0, x1)
        return jnp.concatenate([out, jnp.full_like(out, 7.0)], axis=-1)

    loss, aux = flow.training_loss(oracle, jax.random.key(2), x1, jnp.zeros(4, jnp.int32),
                                   interpolant=interpolant, prediction=prediction,
                                   train_eps=0.05, loss_weight="velocity")
    assert float(loss) == pytest.approx(0.0, abs=1e-6)
    assert float(aux["mse"]) == pytest.approx(0.0, abs=1e-6)
    (t,) = seen_t
    assert t.shape == (4,) and bool(jnp.all((t >= 0.05) & (t <= 0.95)))


def test_loss_gradient_through_a_tiny_linear_model_is_finite():
    x1 = jax.random.normal(jax.random.key(3), (4, 2, 2, 3))

    def loss_of(params):
        def model(x, t, labels):
            return x @ params["w"] + params["b"] * t.reshape(-1, 1, 1, 1)
        return flow.training_loss(model, jax.random.key(4), x1, jnp.zeros(4, jnp.int32))[0]

    params = {"w": 0.1 * jnp.eye(3), "b": jnp.ones(3)}
    loss, grads = jax.value_and_grad(loss_of)(params)
    assert np.isfinite(float(loss)) and float(loss) > 0
    for g in jax.tree.leaves(grads):
        assert np.all(np.isfinite(g)) and np.any(g != 0)


# ------------------------------------------------------------------------------- samplers

def run_sampler(method, keys, labels):
    if method == "sde":
        return sample_sde(toy_velocity_model, keys, labels, SHAPE, num_steps=100), {}
    options, _ = ODE_CASES[method]
    return sample_ode(toy_velocity_model, keys, labels, SHAPE, method=method, **options)


@pytest.mark.parametrize("method", ["euler", "heun", "dopri5", "sde"])
def test_sampler_recovers_the_toy_gaussian_and_rejects_a_wrong_velocity(method):
    keys, labels = toy_batch()
    x, stats = run_sampler(method, keys, labels)
    exact, wrong = x[:SAMPLES_PER_GROUP], x[SAMPLES_PER_GROUP:]
    disc = SDE_DISC if method == "sde" else ODE_CASES[method][1]
    assert recovers(exact, disc), (method, float(exact.mean()), float(exact.var()))
    assert not recovers(wrong, disc), (method, float(wrong.mean()), float(wrong.var()))
    if method != "sde":  # the ODE is deterministic: each point must land on MU + S z
        z = initial_noise(keys[:SAMPLES_PER_GROUP], SHAPE)
        assert float(jnp.max(jnp.abs(exact - (MU + S * z)))) <= disc
    if method == "dopri5":
        nfe = np.asarray(stats["nfe"][:SAMPLES_PER_GROUP])
        print(f"dopri5 nfe per sample on the toy (rtol 1e-5): {nfe}")
        assert nfe.max() <= 100


@pytest.mark.parametrize("method", ["euler", "heun", "dopri5", "sde"])
def test_sample_depends_only_on_its_own_key_and_label(method):
    keys, labels = toy_batch()
    picks = [0, 3, 2 * SAMPLES_PER_GROUP - 1]  # two exact-field samples, one wrong-field
    batch, _ = run_sampler(method, keys[jnp.array(picks)], labels[jnp.array(picks)])
    for row, i in enumerate(picks):
        alone, _ = run_sampler(method, keys[i:i + 1], labels[i:i + 1])
        np.testing.assert_allclose(batch[row], alone[0], rtol=1e-5, atol=1e-5)


def test_dopri5_nfe_counts_every_network_call():
    calls = []

    def counted(x, t, labels):
        jax.debug.callback(lambda: calls.append(1))
        return toy_velocity_model(x, t, labels)

    keys, labels = toy_batch()
    _, stats = sample_ode(counted, keys[:1], labels[:1], (2, 2, 1), method="dopri5")
    jax.block_until_ready(stats)
    assert int(stats["nfe"][0]) == len(calls)


@pytest.mark.parametrize("interpolant,prediction", [("gvp", "velocity"), ("linear", "score"),
                                                    ("gvp", "score"), ("linear", "noise"),
                                                    ("gvp", "noise")])
def test_ode_follows_the_exact_flow_for_every_prediction(interpolant, prediction):
    def model(x, t, labels):
        return exact_prediction(interpolant, prediction, x, t)

    keys, labels = toy_batch()
    x, _ = sample_ode(model, keys[:2], labels[:2], (4, 4, 1), method="heun", num_steps=20,
                      interpolant=interpolant, prediction=prediction)
    t0, t1 = (0.0, 1.0) if prediction == "velocity" else (1e-3, 1 - 1e-3)  # SiT's interval
    c0, c1 = flow.coefficients(interpolant, t0), flow.coefficients(interpolant, t1)
    var0, var1 = (c.alpha ** 2 * S ** 2 + c.sigma ** 2 for c in (c0, c1))
    z = initial_noise(keys[:2], (4, 4, 1))
    expected = c1.alpha * MU + jnp.sqrt(var1 / var0) * (z - c0.alpha * MU)
    np.testing.assert_allclose(x, expected, atol=0.02)


def test_sde_with_gvp_noise_model_recovers_the_toy():
    def model(x, t, labels):
        return exact_prediction("gvp", "noise", x, t)

    keys, labels = toy_batch()
    x = sample_sde(model, keys[:SAMPLES_PER_GROUP], labels[:SAMPLES_PER_GROUP], SHAPE,
                   num_steps=100, interpolant="gvp", prediction="noise")
    assert recovers(x, SDE_DISC), (float(x.mean()), float(x.var()))


def test_bad_settings_are_refused():
    keys, labels = toy_batch()
    with pytest.raises(ValueError, match="one sample"):
        sample_ode(toy_velocity_model, keys, labels, (16,) + SHAPE, method="euler")
    with pytest.raises(ValueError, match="SBDM"):
        sample_sde(toy_velocity_model, keys, labels, SHAPE, diffusion_form="SBDM")
    with pytest.raises(ValueError, match="interpolant"):
        flow.coefficients("cosine", 0.5)
