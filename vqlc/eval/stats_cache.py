"""On-disk cache of reference statistics (Inception feature sums, optionally features), shared by
rFID (vqlc.eval.rfid) and the generation metrics (vqlc.eval.generation).

An entry is ``<cache_dir>/<key>.npz``, the key a hash of a dict of everything that defines the
statistics (data, protocol, weights file, ...). Entries are written atomically (temporary file,
then rename), so a killed run never leaves a half-written entry behind.
"""
import hashlib
import json
import os
from typing import Dict, Optional

import numpy as np

from vqlc import atomic_io
from vqlc.eval import metrics

DEFAULT_DIR = "~/.cache/vqlc/fid_stats"


def cache_dir(path: str = "") -> str:
    """The cache folder: ``path``, or ~/.cache/vqlc/fid_stats when empty."""
    return os.path.expanduser(path or DEFAULT_DIR)


def cache_key(what: dict) -> str:
    """16 hex digits identifying ``what`` (JSON-serialisable; key order does not matter)."""
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def entry_path(directory: str, what: dict) -> str:
    return os.path.join(cache_dir(directory), f"{cache_key(what)}.npz")


def save_arrays(path: str, **arrays) -> None:
    """An .npz of ``arrays`` at ``path``, through the one atomic writer."""
    atomic_io.atomic_save_npz(path, arrays)


def stats_arrays(stats: metrics.FeatureStatistics, prefix: str = "") -> Dict[str, np.ndarray]:
    return {f"{prefix}count": np.asarray(stats.count), f"{prefix}sum": stats.sum,
            f"{prefix}outer": stats.outer}


def stats_from_arrays(arrays, prefix: str = "") -> Optional[metrics.FeatureStatistics]:
    """The FeatureStatistics stored under ``prefix`` in a loaded npz, or None when absent."""
    if f"{prefix}sum" not in arrays:
        return None
    s = np.asarray(arrays[f"{prefix}sum"], np.float64)
    stats = metrics.FeatureStatistics(s.shape[0])
    stats.count = int(arrays[f"{prefix}count"])
    stats.sum, stats.outer = s, np.asarray(arrays[f"{prefix}outer"], np.float64)
    return stats


def save_stats(path: str, stats: metrics.FeatureStatistics) -> None:
    save_arrays(path, **stats_arrays(stats))


def load_stats(path: str) -> metrics.FeatureStatistics:
    with np.load(path) as f:
        return stats_from_arrays(f)
