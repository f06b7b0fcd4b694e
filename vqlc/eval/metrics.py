"""Per-image reconstruction metrics, jit-friendly, for NHWC images in [0, 1].

PSNR on RGB and on the BT.601 luma (the release reports the latter); SSIM with an 11x11
Gaussian window, sigma 1.5, data range 1, averaged over channels (scikit-image's
`structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=1)` computes the same thing).
"""
import jax
import jax.numpy as jnp
import numpy as np


def to_unit_range(x: jax.Array) -> jax.Array:
    """[-1, 1] model space -> [0, 1], clipped."""
    return jnp.clip((x + 1.0) / 2.0, 0.0, 1.0)


def psnr(x: jax.Array, y: jax.Array, data_range: float = 1.0) -> jax.Array:
    """[B] PSNR in dB between images in [0, data_range]."""
    mse = jnp.mean((x.astype(jnp.float32) - y.astype(jnp.float32)) ** 2, axis=(1, 2, 3))
    return 10.0 * jnp.log10(data_range**2 / jnp.maximum(mse, 1e-12))


def rgb_to_y(x: jax.Array) -> jax.Array:
    """BT.601 luma of [0, 1] RGB, in [16/255, 235/255] as MATLAB's rgb2ycbcr."""
    w = jnp.asarray([65.481, 128.553, 24.966], jnp.float32) / 255.0
    return (16.0 / 255.0 + x @ w)[..., None]


def psnr_y(x: jax.Array, y: jax.Array) -> jax.Array:
    return psnr(rgb_to_y(x), rgb_to_y(y))


def _gaussian_window(size: int, sigma: float) -> np.ndarray:
    r = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(r**2) / (2 * sigma**2))
    return (g / g.sum()).astype(np.float32)


def _filter(x: jax.Array, w: jax.Array) -> jax.Array:
    """Separable 'valid' Gaussian filtering of [B, H, W, C], channel by channel."""
    c = x.shape[-1]
    kh = jnp.tile(w[:, None, None, None], (1, 1, 1, c))
    kw = jnp.tile(w[None, :, None, None], (1, 1, 1, c))
    dn = ("NHWC", "HWIO", "NHWC")
    x = jax.lax.conv_general_dilated(x, kh, (1, 1), "VALID", dimension_numbers=dn,
                                     feature_group_count=c)
    return jax.lax.conv_general_dilated(x, kw, (1, 1), "VALID", dimension_numbers=dn,
                                        feature_group_count=c)


def ssim(x: jax.Array, y: jax.Array, data_range: float = 1.0, win_size: int = 11,
         sigma: float = 1.5) -> jax.Array:
    """[B] mean SSIM over the valid region and channels."""
    if min(x.shape[1:3]) < win_size:
        raise ValueError(f"SSIM needs images of at least {win_size} px; got {x.shape}.")
    x = x.astype(jnp.float32)
    y = y.astype(jnp.float32)
    w = jnp.asarray(_gaussian_window(win_size, sigma))
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = _filter(x, w), _filter(y, w)
    sxx = _filter(x * x, w) - mx * mx
    syy = _filter(y * y, w) - my * my
    sxy = _filter(x * y, w) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return jnp.mean(s, axis=(1, 2, 3))


def utilization(counts) -> float:
    """Fraction of codes used at least once."""
    counts = np.asarray(counts)
    return float(np.count_nonzero(counts) / counts.size)


def perplexity(counts) -> jax.Array:
    """exp(entropy) of the code-usage distribution (K when all codes are used equally)."""
    counts = jnp.asarray(counts, jnp.float32)
    p = counts / jnp.maximum(jnp.sum(counts), 1.0)
    return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)))


class FeatureStatistics:
    """Running mean and covariance of feature vectors (e.g. Inception pool3), in float64.

    Add batches as they come (any number, any size); `merge` combines the statistics of other
    shards or hosts exactly (sums, not averages of averages).
    """

    def __init__(self, dim: int):
        self.count = 0
        self.sum = np.zeros((dim,), np.float64)
        self.outer = np.zeros((dim, dim), np.float64)

    def add(self, features) -> None:
        f = np.asarray(features, np.float64)
        if f.ndim != 2 or f.shape[1] != self.sum.shape[0]:
            raise ValueError(f"Expected features [N, {self.sum.shape[0]}]; got {f.shape}.")
        self.count += f.shape[0]
        self.sum += f.sum(axis=0)
        self.outer += f.T @ f

    def merge(self, other: "FeatureStatistics") -> None:
        self.count += other.count
        self.sum += other.sum
        self.outer += other.outer

    def mean_and_covariance(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu [D], sigma [D, D]): the unbiased covariance (N - 1), as numpy.cov computes it."""
        if self.count < 2:
            raise ValueError(f"Need at least 2 feature vectors for a covariance; have {self.count}.")
        mu = self.sum / self.count
        sigma = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2) (FID on Inception
    statistics): |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).

    tr((s1 s2)^(1/2)) is computed as the sum of the square roots of the eigenvalues of the
    symmetric matrix s1^(1/2) s2 s1^(1/2), which has the same spectrum as s1 s2, in float64:
    no complex parts to drop and no iterative matrix square root, unlike scipy.linalg.sqrtm.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(f"Mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma "
                         f"{s1.shape} vs {s2.shape}.")
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = np.sum(np.sqrt(np.clip(eig, 0, None)))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
