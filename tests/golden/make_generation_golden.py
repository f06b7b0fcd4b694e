"""Regenerate tests/golden/generation_golden.npz: generation metrics by an independent numpy/scipy
implementation of the ADM evaluator's formulas, on Inception outputs of small real-photo sets.

    python tests/golden/make_generation_golden.py

The images are random 48x48 crops of scikit-image photographs (set A: astronaut, coffee, rocket,
immunohistochemistry; set B: astronaut, chelsea, hubble_deep_field, stereo_motorcycle), stored
in the golden file so the tests need not recrop them. The network is the InceptionV3 of
vqlc.models.inception with random He-normal weights (inception.random_params(seed=0)): the real
TF weights are an 87 MB download the tests cannot rely on, and what is checked here is the
metric code on top of the network (resizes and weights are checked by tests/test_inception.py).
The network's outputs are computed here once per protocol and stored; the reference numbers
then come from those outputs by the formulas written out below, in float64, on full matrices:

* FID / sFID: |mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr(sqrtm(s1 s2)) with scipy.linalg.sqrtm
  (the ADM evaluator's / TTUR's formula, real part kept), covariance np.cov (N - 1);
* IS: softmax of pool3 @ W (no bias), splits of split_size consecutive rows, exp(mean KL);
* precision / recall: k = 3, radius = 4th smallest squared distance of a point to its own set
  (itself included, as ADM's manifold_radii), a point is covered if within some ball.
"""
import functools
import os
import sys

import numpy as np
import scipy.linalg

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

PHOTOS_A = ("astronaut", "coffee", "rocket", "immunohistochemistry")
PHOTOS_B = ("astronaut", "chelsea", "hubble_deep_field", "stereo_motorcycle")
N_PER_SET = 10
CROP = 48
IS_SPLITS = (5000, 4)  # ADM's split size, and a small one so that several splits are checked


def crops(names, n, seed):
    import skimage.data
    rng = np.random.default_rng(seed)
    photos = []
    for name in names:
        p = getattr(skimage.data, name)()
        photos.append((p[0] if isinstance(p, tuple) else p)[..., :3])  # stereo: left image
    out = []
    for i in range(n):
        p = photos[i % len(photos)]
        y = rng.integers(0, p.shape[0] - CROP + 1)
        x = rng.integers(0, p.shape[1] - CROP + 1)
        out.append(p[y:y + CROP, x:x + CROP])
    return np.stack(out).astype(np.uint8)


def network_outputs(images, inception_protocol):
    import jax
    from vqlc.models import inception
    params, fc = inception.random_params(seed=0)
    fn = jax.jit(functools.partial(inception.outputs_fn, protocol=inception_protocol,
                                   spatial=True))
    out = {k: np.asarray(v, np.float64) for k, v in fn(params, images).items()}
    out["logits"] = out["pool"] @ fc["kernel"].astype(np.float64)
    return out


def fid(x, y):
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = np.real(scipy.linalg.sqrtm(s1 @ s2))
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def inception_score(logits, split_size):
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(p), split_size):
        part = p[i:i + split_size]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


def precision_recall(real, fake, k=3):
    sq = lambda a, b: ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    r_real = np.sort(sq(real, real), 1)[:, k]
    r_fake = np.sort(sq(fake, fake), 1)[:, k]
    d = sq(real, fake)
    return (float(np.mean((d <= r_real[:, None]).any(0))),
            float(np.mean((d <= r_fake[None, :]).any(1))))


def build():
    a, b = crops(PHOTOS_A, N_PER_SET, 0), crops(PHOTOS_B, N_PER_SET, 1)
    g = {"images_a": a, "images_b": b}
    oa, ob = network_outputs(a, "tf"), network_outputs(b, "tf")
    g["adm_fid"] = fid(oa["pool"], ob["pool"])
    g["adm_sfid"] = fid(oa["spatial"], ob["spatial"])
    for s in IS_SPLITS:
        g[f"adm_is_split{s}"] = inception_score(ob["logits"], s)
    g["adm_precision"], g["adm_recall"] = precision_recall(oa["pool"], ob["pool"])
    g["adm_logits_b"] = ob["logits"].astype(np.float32)
    ca, cb = network_outputs(a, "clean"), network_outputs(b, "clean")
    g["clean_fid"] = fid(ca["pool"], cb["pool"])
    return g


if __name__ == "__main__":
    g = build()
    path = os.path.join(HERE, "generation_golden.npz")
    np.savez(path, **g)
    for k, v in g.items():
        if np.ndim(v) == 0:
            print(f"{k:24s} {float(v):.6f}")
    print(f"wrote {path}")
