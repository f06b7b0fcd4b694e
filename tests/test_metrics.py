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
