"""PSNR/SSIM against scikit-image's reference implementations on the same images."""
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from vqlc.eval import metrics


def _pairs(seed=0, n=3, size=32):
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 1, (n, size, size, 3)).astype(np.float32)
    smooth = np.cumsum(base, axis=1) / np.arange(1, size + 1)[None, :, None, None]
    noisy = np.clip(smooth + rng.normal(0, 0.05, smooth.shape), 0, 1).astype(np.float32)
    return smooth.astype(np.float32), noisy


def test_psnr_matches_skimage():
    x, y = _pairs()
    ours = np.asarray(metrics.psnr(x, y))
    ref = [peak_signal_noise_ratio(a, b, data_range=1.0) for a, b in zip(x, y)]
    np.testing.assert_allclose(ours, ref, rtol=1e-5)


def test_ssim_matches_skimage():
    x, y = _pairs(1)
    ours = np.asarray(metrics.ssim(x, y))
    ref = [structural_similarity(a, b, data_range=1.0, channel_axis=-1, gaussian_weights=True,
                                 sigma=1.5, use_sample_covariance=False) for a, b in zip(x, y)]
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    np.testing.assert_allclose(np.asarray(metrics.ssim(x, x)), 1.0, atol=1e-6)


def test_psnr_y_uses_bt601_luma():
    x, y = _pairs(2)
    wy = np.array([65.481, 128.553, 24.966]) / 255.0
    yx, yy = x @ wy + 16 / 255, y @ wy + 16 / 255
    ref = [10 * np.log10(1 / np.mean((a - b) ** 2)) for a, b in zip(yx, yy)]
    np.testing.assert_allclose(np.asarray(metrics.psnr_y(x, y)), ref, rtol=1e-4)


def test_utilization_and_perplexity():
    counts = np.array([5, 0, 5, 0])
    assert metrics.utilization(counts) == 0.5
    assert float(metrics.perplexity(counts)) == pytest.approx(2.0, rel=1e-5)
    assert float(metrics.perplexity(np.ones(7))) == pytest.approx(7.0, rel=1e-5)


def test_frechet_distance_matches_scipy_sqrtm():
    import scipy.linalg
    from vqlc.eval.metrics import frechet_distance
    rng = np.random.default_rng(0)
    d = 64
    a, b = rng.normal(size=(d, 3 * d)), rng.normal(size=(d, 3 * d)) * 0.7
    s1, s2 = a @ a.T / (3 * d), b @ b.T / (3 * d) + 0.1 * np.eye(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    want = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    np.testing.assert_allclose(frechet_distance(mu1, s1, mu2, s2), want, rtol=1e-6)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-8 * np.trace(s1)  # a distance: 0 to itself
    with pytest.raises(ValueError, match="Mismatched"):
        frechet_distance(mu1, s1, mu2[:3], s2)


def test_feature_statistics_merge_equals_numpy():
    from vqlc.eval.metrics import FeatureStatistics
    x = np.random.default_rng(1).normal(2.0, 1.5, (301, 7))
    whole, parts = FeatureStatistics(7), FeatureStatistics(7)
    whole.add(x)
    for chunk in np.array_split(x, 4):  # e.g. four hosts
        part = FeatureStatistics(7)
        part.add(chunk)
        parts.merge(part)
    for stats in (whole, parts):
        mu, sigma = stats.mean_and_covariance()
        np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
        np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-9)
    with pytest.raises(ValueError, match=r"\[N, 7\]"):
        whole.add(np.zeros((3, 5)))
