"""rFID of reconstructions against the evaluation images, inside the `evaluate` task.

Both sides go through InceptionV3 (TF 2015-12-05 weights, pool3) as uint8 images, the way a
user would save and score them. The reference side is the evaluation pipeline's own images
(centre crops at data.image_size: the usual protocol); its statistics are cached on disk under
a key of everything that defines them, and reused. Each process scores its own rows (padding
masked out); the float64 sums are added across processes, so every image counts once.
"""
import hashlib
import json
import logging
import os

import jax
import numpy as np

from vqlc.eval import images as image_io
from vqlc.eval import metrics

REFERENCE = "centre-cropped evaluation images"


def _weights_path(config) -> str:
    from vqlc.models import inception
    if config.eval.inception_path:
        return os.path.expanduser(config.eval.inception_path)
    found = [p for p in inception.default_weight_paths() if os.path.exists(p)]
    return found[0] if found else inception.default_weight_paths()[-1]  # load() explains


def _cache_key(config, weights: str) -> str:
    d = config.data
    what = {"kind": d.kind, "name": d.name, "path": d.eval_path or d.path,
            "split": d.eval_split, "image_size": d.image_size,
            "resize_shorter": d.resize_shorter, "max_images": d.eval_max_images,
            "demo_photo_size": d.demo_photo_size, "protocol": config.eval.fid_protocol,
            "weights": os.path.basename(weights), "reference": REFERENCE}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


class RFID:
    """Accumulates Inception statistics of originals (unless cached) and reconstructions."""

    def __init__(self, config):
        from vqlc.models import inception
        weights = _weights_path(config)
        self.net = inception.load(weights, protocol=config.eval.fid_protocol)  # fails early
        cache_dir = os.path.expanduser(config.eval.fid_cache or "~/.cache/vqlc/fid_stats")
        self.cache_path = os.path.join(cache_dir, f"{_cache_key(config, weights)}.npz")
        self.protocol = config.eval.fid_protocol
        self.reference = None
        if os.path.exists(self.cache_path):
            self.reference = _load_stats(self.cache_path)
            logging.info("rFID: reference statistics from %s", self.cache_path)
        self.real = metrics.FeatureStatistics(inception.FEATURE_DIM)
        self.fake = metrics.FeatureStatistics(inception.FEATURE_DIM)

    def add(self, originals, reconstructions, mask) -> None:
        """This process's rows: [-1, 1] float images and a bool mask of real (unpadded) rows."""
        keep = np.asarray(mask, bool)
        if not keep.any():
            return
        fake = image_io.to_uint8(np.asarray(reconstructions)[keep])
        self.fake.add(np.asarray(self.net.features(fake)))
        if self.reference is None:
            real = image_io.to_uint8(np.asarray(originals)[keep])
            self.real.add(np.asarray(self.net.features(real)))

    def result(self) -> dict:
        fake = _sum_over_processes(self.fake)
        if self.reference is None:
            self.reference = _sum_over_processes(self.real)
            if jax.process_index() == 0:
                _save_stats(self.cache_path, self.reference)
        if fake.count != self.reference.count:
            raise ValueError(f"rFID: {fake.count} reconstructions vs {self.reference.count} "
                             f"reference images in {self.cache_path}; delete that cache file.")
        value = metrics.frechet_distance(*self.reference.mean_and_covariance(),
                                         *fake.mean_and_covariance())
        return {"rfid": value,
                "rfid_protocol": (f"InceptionV3 TF-2015-12-05 pool3 ({self.net.source}), "
                                  f"'{self.protocol}' resize to 299 of uint8 images; reference: "
                                  f"{REFERENCE} ({fake.count}), statistics cached at "
                                  f"{self.cache_path}")}


def _sum_over_processes(stats: metrics.FeatureStatistics) -> metrics.FeatureStatistics:
    if jax.process_count() == 1:
        return stats
    from jax.experimental import multihost_utils
    total = metrics.FeatureStatistics(stats.sum.shape[0])
    count, s, outer = multihost_utils.process_allgather(
        (np.asarray([stats.count], np.float64), stats.sum, stats.outer))
    total.count, total.sum, total.outer = int(count.sum()), s.sum(axis=0), outer.sum(axis=0)
    return total


def _save_stats(path: str, stats: metrics.FeatureStatistics) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, count=stats.count, sum=stats.sum, outer=stats.outer)
    os.replace(tmp, path)


def _load_stats(path: str) -> metrics.FeatureStatistics:
    with np.load(path) as f:
        stats = metrics.FeatureStatistics(f["sum"].shape[0])
        stats.count, stats.sum, stats.outer = int(f["count"]), f["sum"], f["outer"]
    return stats
