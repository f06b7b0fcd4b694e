"""vqlc.gen.objectives.diffusion and vqlc.gen.samplers.ddpm: schedule numbers against DiT's and
LDM's formulas (written here independently), the forward process and posterior, the training
loss (value, and where its gradients go), and both samplers on a Gaussian whose optimal
denoiser is known in closed form.

The sampler checks. Data x0 ~ N(mu, s^2) per channel has the exact epsilon predictor
  eps*(x_t, t) = E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab),
with ab = alphas_cumprod[t]. With it every sampler step is linear in x plus independent
Gaussian noise, so the exact mean and variance of each sampler's output follow by propagating
(mean, variance) through its recursion (`_reference_*`, from the papers' formulas). That, not
(mu, s^2), is the reference: a few-step sampler is biased (DDIM-50 with eta 1 loses a fifth of
the variance), and the bias is part of the algorithm. Samples of N = 4096 per channel must
match it within 4 standard errors (mean: sqrt(v / N); variance: v sqrt(2 / (N - 1)), about 9%);
a denoiser that assumes a 1.3x larger data variance must fail the same check.
"""
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqlc.gen.objectives import diffusion
from vqlc.gen.samplers import ddpm, guidance

MU = np.array([1.5, -0.5])
STD = np.array([0.5, 0.8])
SHAPE = (1, 1, 2)
NUM_SAMPLES = 4096


# ------------------------------------------------------------------- reference formulas (numpy)

def _dit_linear_betas(n=1000):
    scale = 1000 / n
    return np.array([scale * 1e-4 + k * (scale * 0.02 - scale * 1e-4) / (n - 1)
                     for k in range(n)])


def _ldm_linear_betas(n=1000, start=0.0015, end=0.0195):
    lo, hi = math.sqrt(start), math.sqrt(end)
    return np.array([(lo + k * (hi - lo) / (n - 1)) ** 2 for k in range(n)])


def _alphas_cumprod(betas):
    out, running = [], 1.0
    for b in betas:
        running *= 1.0 - b
        out.append(running)
    return np.array(out)


def _dit_spacing(num_timesteps, count):
    """DiT's space_timesteps for one section, in exact arithmetic (round half to even)."""
    if count == 1:
        return [0]
    return sorted({round(Fraction(k * (num_timesteps - 1), count - 1)) for k in range(count)})


def _step(mean, var, gain, offset, noise_var):
    """(mean, var) of gain * x + offset + N(0, noise_var) for x ~ (mean, var)."""
    return gain * mean + offset, gain ** 2 * var + noise_var


def _eps_gain(ab, var):
    return np.sqrt(1 - ab) / (ab * var + 1 - ab)


def _x0_from_optimal(ab, mu, var):
    """x0_hat = A x + b for the optimal epsilon at noise level ab."""
    g = _eps_gain(ab, var)
    return (1 - np.sqrt(1 - ab) * g) / np.sqrt(ab), np.sqrt(1 - ab) * g * mu


def _reference_ddpm(num_steps, mu, var, learned_v=None):
    """Exact output moments of DiT's ancestral sampler with the optimal denoiser."""
    ac = _alphas_cumprod(_dit_linear_betas())
    a = ac[_dit_spacing(1000, num_steps)]
    a_prev = np.append(1.0, a[:-1])
    beta = 1 - a / a_prev
    post_var = beta * (1 - a_prev) / (1 - a)
    coef1 = beta * np.sqrt(a_prev) / (1 - a)
    coef2 = (1 - a_prev) * np.sqrt(1 - beta) / (1 - a)
    step_var = post_var
    if learned_v is not None:
        frac = (learned_v + 1) / 2
        clipped = np.log(np.append(post_var[1], post_var[1:]))
        step_var = np.exp(frac * np.log(beta) + (1 - frac) * clipped)
    mean, v = np.zeros_like(mu), np.ones_like(mu)
    for i in reversed(range(num_steps)):
        gain0, offset0 = _x0_from_optimal(a[i], mu, var)
        mean, v = _step(mean, v, coef1[i] * gain0 + coef2[i], coef1[i] * offset0,
                        step_var[i] if i > 0 else 0.0)
    return mean, v


def _reference_ddim(num_steps, eta, mu, var):
    """Exact output moments of LDM's DDIM sampler with the optimal denoiser."""
    ac = _alphas_cumprod(_ldm_linear_betas())
    indices = list(range(0, 1000, 1000 // num_steps))
    indices = [i + 1 for i in indices]  # LDM's make_ddim_timesteps offset
    mean, v = np.zeros_like(mu), np.ones_like(mu)
    for k in reversed(range(len(indices))):
        a = ac[indices[k]]
        a_prev = ac[indices[k - 1]] if k > 0 else ac[0]
        sigma = eta * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        direction = np.sqrt(1 - a_prev - sigma ** 2)
        gain0, offset0 = _x0_from_optimal(a, mu, var)
        g = _eps_gain(a, var)
        gain = np.sqrt(a_prev) * gain0 + direction * g
        offset = np.sqrt(a_prev) * offset0 - direction * g * np.sqrt(a) * mu
        mean, v = _step(mean, v, gain, offset, sigma ** 2)
    return mean, v


# ------------------------------------------------------------------------------ toy denoisers

def _optimal_eps(schedule, mu=MU, var=STD ** 2, learned_v=None):
    """model_fn returning E[eps | x_t] for x0 ~ N(mu, var) (and a constant v if asked)."""
    ac = jnp.asarray(schedule.alphas_cumprod, jnp.float32)
    mu, var = jnp.asarray(mu, jnp.float32), jnp.asarray(var, jnp.float32)

    def model_fn(x, t, labels):
        ab = ac[t][:, None, None, None]
        eps = (x - jnp.sqrt(ab) * mu) * jnp.sqrt(1 - ab) / (ab * var + 1 - ab)
        if learned_v is None:
            return eps
        return jnp.concatenate([eps, jnp.full_like(eps, learned_v)], axis=-1)
    return model_fn


def _moments_match(samples, mean, var, num_se=4.0):
    samples = np.asarray(samples, np.float64).reshape(-1, samples.shape[-1])
    n = samples.shape[0]
    mean_ok = np.abs(samples.mean(0) - mean) <= num_se * np.sqrt(var / n)
    var_ok = np.abs(samples.var(0, ddof=1) - var) <= num_se * var * np.sqrt(2 / (n - 1))
    return bool(np.all(mean_ok) and np.all(var_ok))


def _keys(n, seed=0):
    return jax.random.split(jax.random.key(seed), n)


def _labels(n):
    return jnp.zeros((n,), jnp.int32)


@pytest.fixture(scope="module")
def dit_schedule():
    return diffusion.make_schedule("linear")


@pytest.fixture(scope="module")
def ldm_schedule():
    return diffusion.make_schedule("linear_sqrt")


# ----------------------------------------------------------------------------------- schedules

def test_linear_schedule_matches_dit_formulas(dit_schedule):
    s = dit_schedule
    betas = _dit_linear_betas()
    ac = _alphas_cumprod(betas)
    assert s.betas[0] == pytest.approx(1e-4, rel=1e-14) and s.betas[-1] == pytest.approx(0.02)
    for t in (0, 499, 999):
        assert s.alphas_cumprod[t] == pytest.approx(ac[t], rel=1e-12)
        assert s.sqrt_recipm1_alphas_cumprod[t] == pytest.approx(math.sqrt(1 / ac[t] - 1),
                                                                 rel=1e-10)
    post_var_1 = betas[1] * (1 - ac[0]) / (1 - ac[1])
    assert s.posterior_variance[1] == pytest.approx(post_var_1, rel=1e-10)
    assert s.posterior_variance[0] == 0.0
    # The clipped log variance repeats index 1's value at index 0.
    assert s.posterior_log_variance_clipped[0] == pytest.approx(math.log(post_var_1), rel=1e-10)
    t = 500
    assert s.posterior_mean_coef1[t] == pytest.approx(
        betas[t] * math.sqrt(ac[t - 1]) / (1 - ac[t]), rel=1e-10)
    assert s.posterior_mean_coef2[t] == pytest.approx(
        (1 - ac[t - 1]) * math.sqrt(1 - betas[t]) / (1 - ac[t]), rel=1e-10)
    np.testing.assert_array_equal(s.timesteps, np.arange(1000))
    # DiT scales the linear betas with the step count.
    short = diffusion.make_schedule("linear", num_steps=250)
    assert short.betas[0] == pytest.approx(4e-4) and short.betas[-1] == pytest.approx(0.08)


def test_linear_sqrt_is_ldm_linear(ldm_schedule):
    np.testing.assert_allclose(ldm_schedule.betas, _ldm_linear_betas(), rtol=1e-12)
    assert ldm_schedule.betas[0] == pytest.approx(0.0015)
    assert ldm_schedule.betas[-1] == pytest.approx(0.0195)
    with pytest.raises(ValueError, match="unknown schedule"):
        diffusion.make_schedule("cosine")


def test_spacing_matches_dit():
    for count in (25, 50, 100, 250, 1000):
        np.testing.assert_array_equal(diffusion.spaced_timesteps(1000, count),
                                      _dit_spacing(1000, count))
    steps_250 = diffusion.spaced_timesteps(1000, 250)
    assert list(steps_250[:5]) == [0, 4, 8, 12, 16] and list(steps_250[-2:]) == [995, 999]
    # 999/24 = 41.625 is exact in binary: k = 4, 12, 20 land on .5 and round half to even.
    assert list(diffusion.spaced_timesteps(1000, 25)[:6]) == [0, 42, 83, 125, 166, 208]
    assert {500, 832} <= set(diffusion.spaced_timesteps(1000, "25").tolist())
    np.testing.assert_array_equal(diffusion.spaced_timesteps(1000, "ddim25"),
                                  np.arange(0, 1000, 40))


def test_respace_keeps_noise_levels(dit_schedule):
    spaced = diffusion.respace(dit_schedule, 25)
    kept = _dit_spacing(1000, 25)
    np.testing.assert_array_equal(spaced.timesteps, kept)
    np.testing.assert_allclose(spaced.alphas_cumprod, dit_schedule.alphas_cumprod[kept],
                               rtol=1e-12)
    full = diffusion.respace(dit_schedule, 1000)
    np.testing.assert_allclose(full.betas, dit_schedule.betas, rtol=1e-9)


# -------------------------------------------------------------------- forward process, posterior

def test_q_sample_and_posterior_on_fixed_numbers(dit_schedule):
    s = dit_schedule
    ac = _alphas_cumprod(_dit_linear_betas())
    betas = _dit_linear_betas()
    t = np.array([0, 10, 999])
    x0 = np.array([0.5, -1.0, 2.0]).reshape(3, 1, 1, 1)
    noise = np.array([1.0, 0.25, -0.5]).reshape(3, 1, 1, 1)
    ab = ac[t].reshape(3, 1, 1, 1)
    xt = diffusion.q_sample(s, jnp.asarray(x0, jnp.float32), jnp.asarray(t),
                            jnp.asarray(noise, jnp.float32))
    want_xt = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise
    np.testing.assert_allclose(xt, want_xt, rtol=1e-5)

    mean, var, log_var = diffusion.q_posterior_mean_variance(
        s, jnp.asarray(x0, jnp.float32), jnp.asarray(want_xt, jnp.float32), jnp.asarray(t))
    ab_prev = np.append(1.0, ac)[t].reshape(3, 1, 1, 1)
    beta = betas[t].reshape(3, 1, 1, 1)
    want_mean = (np.sqrt(ab_prev) * beta * x0 + np.sqrt(1 - beta) * (1 - ab_prev) * want_xt) / (
        1 - ab)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, beta * (1 - ab_prev) / (1 - ab), rtol=1e-5)
    assert np.all(np.isfinite(log_var))

    x0_back = diffusion.predict_x0_from_eps(s, xt, jnp.asarray(t), jnp.asarray(noise, jnp.float32))
    np.testing.assert_allclose(x0_back, x0, rtol=1e-3, atol=1e-3)


def test_learned_variance_interpolates_between_beta_and_posterior(dit_schedule):
    s = dit_schedule
    t = jnp.array([1, 500])
    xt = jnp.ones((2, 1, 1, 1))
    for v, want in ((1.0, np.log(s.betas[[1, 500]])),
                    (-1.0, s.posterior_log_variance_clipped[[1, 500]])):
        out = jnp.concatenate([jnp.zeros_like(xt), jnp.full_like(xt, v)], axis=-1)
        step = diffusion.p_mean_variance(s, out, xt, t, learned_sigma=True)
        np.testing.assert_allclose(step.log_variance.reshape(-1), want, rtol=1e-5)
    with pytest.raises(ValueError, match="channels"):
        diffusion.p_mean_variance(s, xt, xt, t, learned_sigma=True)


# -------------------------------------------------------------------------------- training loss

def test_training_loss_of_a_zero_model_is_mean_squared_noise(dit_schedule):
    s = dit_schedule
    x0 = jax.random.normal(jax.random.key(1), (64, 2, 2, 3))
    seen = {}

    def zero_model(x, t, labels):
        seen.update(xt=np.asarray(x, np.float64), t=np.asarray(t))
        return jnp.zeros_like(x)

    loss, aux = diffusion.training_loss(zero_model, s, jax.random.key(2), x0, _labels(64),
                                        learned_sigma=False)
    t = seen["t"]
    assert t.min() >= 0 and t.max() < 1000 and len(set(t.tolist())) > 32
    ab = s.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    noise = (seen["xt"] - np.sqrt(ab) * np.asarray(x0, np.float64)) / np.sqrt(1 - ab)
    assert float(loss) == pytest.approx(float(np.mean(noise ** 2)), rel=1e-4)
    assert float(aux["mse"]) == float(loss) and float(aux["vb"]) == 0.0


def test_vlb_is_zero_for_the_true_posterior_and_the_decoder_nll_at_t0(dit_schedule):
    s = dit_schedule
    x0 = jax.random.uniform(jax.random.key(3), (4, 2, 2, 3), minval=-0.9, maxval=0.9)
    noise = jax.random.normal(jax.random.key(4), x0.shape)
    t = jnp.array([0, 1, 500, 999])
    xt = diffusion.q_sample(s, x0, t, noise)
    # The true noise and v = -1 (the posterior variance) give the true posterior for t > 0.
    out = jnp.concatenate([noise, -jnp.ones_like(noise)], axis=-1)
    bits = np.asarray(diffusion.variational_bound_bits(s, out, x0, xt, t, learned_sigma=True))
    np.testing.assert_allclose(bits[1:], 0.0, atol=1e-3)
    # At t = 0 the decoder puts N(x0, var) on a bin of half-width 1/255 around x0.
    std = math.exp(0.5 * s.posterior_log_variance_clipped[0])
    z = (1 / 255) / std
    mass = 0.5 * (math.erf(z / math.sqrt(2)) - math.erf(-z / math.sqrt(2)))
    assert bits[0] == pytest.approx(-math.log2(mass), rel=5e-3)


def test_vlb_trains_only_the_variance_half(dit_schedule):
    channels = 3
    params = {"eps": jnp.eye(channels) * 0.5, "var": jnp.eye(channels) * 0.3}
    x0 = jax.random.uniform(jax.random.key(5), (8, 2, 2, channels), minval=-1, maxval=1)

    def make_model(p):
        return lambda x, t, labels: jnp.concatenate([x @ p["eps"], jnp.tanh(x @ p["var"])], -1)

    def term(p, name):
        loss, aux = diffusion.training_loss(make_model(p), dit_schedule, jax.random.key(6), x0,
                                            _labels(8), learned_sigma=True)
        return loss if name == "loss" else aux[name]

    value_and_grad = jax.jit(jax.value_and_grad(term), static_argnums=1)
    loss, _ = value_and_grad(params, "loss")
    vb, vb_grads = value_and_grad(params, "vb")
    assert np.isfinite(float(loss)) and np.isfinite(float(vb)) and float(vb) > 0
    assert np.all(np.asarray(vb_grads["eps"]) == 0.0)
    assert np.any(np.asarray(vb_grads["var"]) != 0.0)
    _, mse_grads = value_and_grad(params, "mse")
    assert np.all(np.asarray(mse_grads["var"]) == 0.0)
    assert np.any(np.asarray(mse_grads["eps"]) != 0.0)


# ------------------------------------------------------------------------------------- samplers

def test_ddpm_recovers_the_gaussian(dit_schedule):
    keys, labels = _keys(NUM_SAMPLES), _labels(NUM_SAMPLES)
    mean, var = _reference_ddpm(250, MU, STD ** 2)
    # The reference itself sits near the data: the 250-step sampler's bias is small.
    np.testing.assert_allclose(mean, MU, atol=1e-3)
    np.testing.assert_allclose(var, STD ** 2, rtol=0.07)
    samples = ddpm.sample_ddpm(_optimal_eps(dit_schedule), dit_schedule, keys, labels, SHAPE,
                               learned_sigma=False, num_steps=250)
    assert samples.shape == (NUM_SAMPLES,) + SHAPE and samples.dtype == jnp.float32
    assert _moments_match(samples, mean, var)
    wrong = ddpm.sample_ddpm(_optimal_eps(dit_schedule, var=1.3 * STD ** 2), dit_schedule, keys,
                             labels, SHAPE, learned_sigma=False, num_steps=250)
    assert not _moments_match(wrong, mean, var)


def test_ddpm_with_learned_sigma(dit_schedule):
    keys, labels = _keys(NUM_SAMPLES, seed=1), _labels(NUM_SAMPLES)
    model_fn = _optimal_eps(dit_schedule, learned_v=0.3)
    samples = ddpm.sample_ddpm(model_fn, dit_schedule, keys, labels, SHAPE, learned_sigma=True,
                               num_steps=250)
    assert np.all(np.isfinite(np.asarray(samples)))
    assert _moments_match(samples, *_reference_ddpm(250, MU, STD ** 2, learned_v=0.3))


@pytest.mark.parametrize("num_steps,eta", [(50, 0.0), (50, 1.0), (200, 0.0), (200, 1.0)])
def test_ddim_recovers_the_gaussian(ldm_schedule, num_steps, eta):
    keys, labels = _keys(NUM_SAMPLES, seed=2), _labels(NUM_SAMPLES)
    mean, var = _reference_ddim(num_steps, eta, MU, STD ** 2)
    samples = ddpm.sample_ddim(_optimal_eps(ldm_schedule), ldm_schedule, keys, labels, SHAPE,
                               num_steps=num_steps, eta=eta)
    assert samples.shape == (NUM_SAMPLES,) + SHAPE and samples.dtype == jnp.float32
    assert _moments_match(samples, mean, var)
    if (num_steps, eta) == (50, 1.0):
        wrong = ddpm.sample_ddim(_optimal_eps(ldm_schedule, var=1.3 * STD ** 2), ldm_schedule,
                                 keys, labels, SHAPE, num_steps=num_steps, eta=eta)
        assert not _moments_match(wrong, mean, var)
        # With learned_sigma DDIM reads the epsilon half and ignores the rest.
        learned = ddpm.sample_ddim(_optimal_eps(ldm_schedule, learned_v=0.7), ldm_schedule,
                                   keys, labels, SHAPE, num_steps=num_steps, eta=eta,
                                   learned_sigma=True)
        np.testing.assert_array_equal(learned, samples)


def test_ddim_timesteps_are_ldms():
    np.testing.assert_array_equal(ddpm.ddim_indices(1000, 200), np.arange(1, 1000, 5))
    assert len(ddpm.ddim_indices(1000, 300)) == 334  # LDM's stride 3
    with pytest.raises(ValueError, match="num_steps"):
        ddpm.ddim_indices(1000, 1000)


def _label_dependent_model(schedule):
    """The optimal denoiser for class mean mu = 0.5 * label."""
    ac = jnp.asarray(schedule.alphas_cumprod, jnp.float32)

    def model_fn(x, t, labels):
        ab = ac[t][:, None, None, None]
        mu = 0.5 * labels.astype(jnp.float32)[:, None, None, None]
        return (x - jnp.sqrt(ab) * mu) * jnp.sqrt(1 - ab) / (ab * 0.25 + 1 - ab)
    return model_fn


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_a_sample_depends_only_on_its_key_and_label(dit_schedule, sampler):
    model_fn = _label_dependent_model(dit_schedule)
    run = {"ddpm": lambda k, y: ddpm.sample_ddpm(model_fn, dit_schedule, k, y, SHAPE,
                                                 learned_sigma=False, num_steps=20),
           "ddim": lambda k, y: ddpm.sample_ddim(model_fn, dit_schedule, k, y, SHAPE,
                                                 num_steps=10, eta=1.0)}[sampler]
    keys, labels = _keys(3, seed=7), jnp.array([0, 3, 5], jnp.int32)
    together = np.asarray(run(keys, labels))
    alone = np.concatenate([np.asarray(run(keys[i:i + 1], labels[i:i + 1])) for i in range(3)])
    np.testing.assert_allclose(together, alone, rtol=1e-6, atol=1e-6)
    assert len({tuple(row.ravel()) for row in together}) == 3


def test_guidance_at_scale_one_is_conditional_sampling(dit_schedule):
    model_fn = _label_dependent_model(dit_schedule)
    keys, labels = _keys(4, seed=8), jnp.array([0, 1, 2, 3], jnp.int32)
    plain = ddpm.sample_ddpm(model_fn, dit_schedule, keys, labels, SHAPE, learned_sigma=False,
                             num_steps=20)
    at_one = guidance.guided(model_fn, scale=1.0, null_label=10, guided_channels=2)
    np.testing.assert_array_equal(
        ddpm.sample_ddpm(at_one, dit_schedule, keys, labels, SHAPE, learned_sigma=False,
                         num_steps=20), plain)
    # A label-blind model guides to itself at any scale, through the doubled batch.
    blind = _optimal_eps(dit_schedule)
    strong = guidance.guided(blind, scale=4.0, null_label=10, guided_channels=2)
    np.testing.assert_allclose(
        ddpm.sample_ddim(strong, dit_schedule, keys, labels, SHAPE, num_steps=10),
        ddpm.sample_ddim(blind, dit_schedule, keys, labels, SHAPE, num_steps=10),
        rtol=1e-6, atol=1e-6)
