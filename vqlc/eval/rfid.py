"""rFID of reconstructions, inside the `evaluate` task, against one or two reference sets.

Both sides go through InceptionV3 (TF 2015-12-05 weights, pool3) as uint8 images, the way a
user would save and score them. Reference sets (both reported, each named next to its number):

- ``centre_crop``: the evaluation pipeline's own images (centre crops at data.image_size), the
  usual protocol -> metrics ``rfid``;
- ``raw``: the same examples as the source stores them, uncropped and resized whole to 299x299
  (the authors' release scores against the raw ImageNet-val JPEGs) -> metrics ``rfid_raw``.

Reference statistics are cached on disk under a key of everything that defines them, and
reused. Inception runs on every device of the mesh (batches stay sharded as the evaluator
made them); each process keeps its own unpadded rows and the float64 sums are added across
processes, so every image counts once.
"""
import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from vqlc import extras, parallel
from vqlc.eval import metrics, stats_cache

REFERENCES = {
    "centre_crop": ("rfid", "centre-cropped evaluation images"),
    "raw": ("rfid_raw", "raw (uncropped) evaluation images, resized whole to 299x299"),
}


def _weights_path(config) -> str:
    from vqlc.models import inception
    if config.eval.inception_path:
        return os.path.expanduser(config.eval.inception_path)
    found = [p for p in inception.default_weight_paths() if os.path.exists(p)]
    return found[0] if found else inception.default_weight_paths()[-1]  # load() explains


def _cache_key(config, weights: str, reference: str) -> str:
    d = config.data
    what = {"kind": d.kind, "name": d.name, "path": d.eval_path or d.path,
            "split": d.eval_split, "image_size": d.image_size,
            "resize_shorter": d.resize_shorter, "max_images": d.eval_max_images,
            "demo_photo_size": d.demo_photo_size, "protocol": config.eval.fid_protocol,
            "weights": os.path.basename(weights), "reference": REFERENCES[reference][1]}
    return stats_cache.cache_key(what)


def _uint8_levels(x: jax.Array) -> jax.Array:
    """[-1, 1] floats -> the uint8 values a saved PNG would hold (as float32), on device."""
    return jnp.clip(jnp.round((x + 1.0) * 127.5), 0.0, 255.0)


class RFID:
    """Accumulates Inception statistics of reconstructions and of uncached references."""

    def __init__(self, config, mesh):
        from vqlc.models import inception
        weights = _weights_path(config)
        self.net = inception.load(weights, protocol=config.eval.fid_protocol)  # fails early
        self.config = config
        self.mesh = mesh
        self.protocol = config.eval.fid_protocol
        self.params = jax.device_put(self.net.params, parallel.replicated(mesh))
        features = functools.partial(inception.features_fn, protocol=self.protocol,
                                     precision=self.net.precision)
        self._from_pm1 = jax.jit(lambda p, x: features(p, _uint8_levels(x)))
        self._from_0_255 = jax.jit(features)
        cache_dir = stats_cache.cache_dir(config.eval.fid_cache)
        names = ["centre_crop"] + (["raw"] if config.eval.rfid_raw_reference else [])
        self.cache_paths = {r: os.path.join(cache_dir, f"{_cache_key(config, weights, r)}.npz")
                            for r in names}
        self.references = {}
        for name, path in self.cache_paths.items():
            if os.path.exists(path):
                self.references[name] = _load_stats(path)
                logging.info("rFID: %s reference statistics from %s", name, path)
        self.crops = metrics.FeatureStatistics(inception.FEATURE_DIM)
        self.fake = metrics.FeatureStatistics(inception.FEATURE_DIM)

    def add(self, originals: jax.Array, reconstructions: jax.Array, local_mask) -> None:
        """One evaluation batch: batch-sharded global [-1, 1] arrays, this process's mask."""
        keep = np.asarray(local_mask, bool)
        self.fake.add(parallel.local_rows(self._from_pm1(self.params, reconstructions))[keep])
        if "centre_crop" not in self.references:
            self.crops.add(parallel.local_rows(self._from_pm1(self.params, originals))[keep])

    def _raw_reference(self) -> metrics.FeatureStatistics:
        """One pass over the raw evaluation images (same examples, same sharding)."""
        from vqlc.data import make_eval_source_iterator, num_eval_batches
        from vqlc.models import inception
        with extras.needed("train", "the progress bar"):
            from tqdm import tqdm
        stats = metrics.FeatureStatistics(inception.FEATURE_DIM)
        size = inception.INPUT_SIZE
        batch_size = parallel.local_batch_size(self.config.eval.batch_size)
        it = make_eval_source_iterator(
            self.config.data, inception.HostResize(self.protocol), (size, size, 3), np.float32,
            batch_size=batch_size, shard_index=jax.process_index(),
            shard_count=jax.process_count())
        total = num_eval_batches(self.config.data, batch_size, jax.process_count())
        for local in tqdm(it, total=total, desc="rFID raw reference", unit="batch",
                          disable=jax.process_index() != 0):
            batch = parallel.global_batch(local, self.mesh)
            f = parallel.local_rows(self._from_0_255(self.params, batch["image"]))
            stats.add(f[np.asarray(local["mask"], bool)])
        return stats

    def result(self) -> dict:
        fake = _sum_over_processes(self.fake)
        out = {}
        for name, path in self.cache_paths.items():
            if name not in self.references:
                local = self.crops if name == "centre_crop" else self._raw_reference()
                self.references[name] = _sum_over_processes(local)
                if jax.process_index() == 0:
                    _save_stats(path, self.references[name])
            reference = self.references[name]
            if fake.count != reference.count:
                raise ValueError(f"rFID: {fake.count} reconstructions vs {reference.count} "
                                 f"reference images in {path}; delete that cache file.")
            key, description = REFERENCES[name]
            out[key] = metrics.frechet_distance(*reference.mean_and_covariance(),
                                                *fake.mean_and_covariance())
            out[f"{key}_protocol"] = (
                f"InceptionV3 TF-2015-12-05 pool3 ({self.net.source}), '{self.protocol}' resize "
                f"to 299 of uint8 images; reference: {description} ({fake.count}), statistics "
                f"cached at {path}")
        return out


def _sum_over_processes(stats: metrics.FeatureStatistics) -> metrics.FeatureStatistics:
    if jax.process_count() == 1:
        return stats
    from jax.experimental import multihost_utils
    total = metrics.FeatureStatistics(stats.sum.shape[0])
    count, s, outer = multihost_utils.process_allgather(
        (np.asarray([stats.count], np.float64), stats.sum, stats.outer))
    total.count, total.sum, total.outer = int(count.sum()), s.sum(axis=0), outer.sum(axis=0)
    return total


_save_stats = stats_cache.save_stats
_load_stats = stats_cache.load_stats
