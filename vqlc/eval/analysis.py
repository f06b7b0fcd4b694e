"""The paper's analysis figures as computations: utilisation over training, token replacement,
and t-SNE of active vs inactive codes. `python -m vqlc.figures` is the command line on top.

    from vqlc import Tokenizer
    from vqlc.eval import analysis
    tok = Tokenizer.load("runs/demo")
    images = analysis.eval_images(tok.config, max_images=256)            # uint8 [N, H, W, 3]
    result = analysis.token_replacement(tok, images, ns=(1, 2, 5, 10))   # {'psnr': [...], ...}

Token replacement (paper, "Token Replacement"): every token is replaced by its n-th nearest code
(n = 1 is ordinary quantisation) and the image decoded; a codebook whose codes are dense around
the latents loses little PSNR as n grows.
"""
from typing import Iterable, Optional, Sequence

import numpy as np

from vqlc import atomic_io, extras, rundir, storage
from vqlc.eval import metrics
from vqlc.eval.images import to_uint8
# The n-th nearest search lives in vqlc.neighbors; re-exported here for existing callers.
from vqlc.neighbors import MAX_RANK, nth_nearest_codes  # noqa: F401

ACTIVE_COLOR = "#2ca02c"    # green, as the paper's figure
INACTIVE_COLOR = "#1f77b4"  # blue


# ----------------------------------------------------------------------------------------------
# Run metadata

def run_label(workdir: str, config=None) -> str:
    """'LC, K=100000': the run's quantizer kind and codebook size, from its config.json."""
    if config is None:
        from vqlc import config_io
        config = config_io.load(workdir)
    return f"{config.quantizer.kind.upper()}, K={config.quantizer.codebook_size}"


def check_workdir(workdir: str) -> str:
    """The workdir, or FileNotFoundError saying it is missing or not a training workdir."""
    if not storage.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir!r} does not exist.")
    if not storage.exists(rundir.config(workdir)):
        raise FileNotFoundError(f"{workdir!r} has no config.json: is it a vqlc training workdir?")
    return workdir


# ----------------------------------------------------------------------------------------------
# 1. Codebook utilisation over training

def utilization_curve(records: Iterable[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(steps, utilisation in [0, 1]) from metrics.jsonl records, sorted by step."""
    points = sorted((r["step"], r["utilization"]) for r in records
                    if "step" in r and "utilization" in r)
    if not points:
        return np.zeros((0,), np.int64), np.zeros((0,), np.float64)
    steps, util = zip(*points)
    return np.asarray(steps, np.int64), np.asarray(util, np.float64)


def load_utilization(workdir: str) -> tuple[np.ndarray, np.ndarray]:
    """A workdir's utilisation curve; FileNotFoundError / ValueError when there is none."""
    from vqlc.train import reporting
    path = rundir.metrics(workdir)
    if not storage.exists(path):
        raise FileNotFoundError(f"{path!r} not found: has {workdir!r} been trained?")
    steps, util = utilization_curve(reporting.read_metrics(workdir))
    if not steps.size:
        raise ValueError(f"{path!r} has no records with 'step' and 'utilization'.")
    return steps, util


def plot_utilization_runs(curves: Sequence[tuple[Optional[str], Iterable[dict]]], path: str,
                          title: str = "") -> bool:
    """One utilisation-over-training line per run: curves = [(label or None, records), ...].

    Writes a PNG; False when no run has anything to plot. A legend appears when any run is
    labelled.
    """
    lines = [(label, *utilization_curve(records)) for label, records in curves]
    lines = [line for line in lines if line[1].size]
    if not lines:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    for label, steps, util in lines:
        ax.plot(steps, util * 100.0, lw=1.8, label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel("codes used in window (%)")
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    ax.set_title(title or "Codebook utilisation during training")
    if any(label for label, _, _ in lines):
        ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)
    return True


# ----------------------------------------------------------------------------------------------
# 2. Token replacement

def search_space(tokenizer):
    """(codebook [K, D], to_search) where the tokenizer's quantizer searches: the projected
    codebook for LC, the l2-normalised one for FC; to_search maps latents into that space."""
    from vqlc.models.quantizers import FactorizedQuantizer
    codes = np.asarray(tokenizer.model.apply(tokenizer.variables,
                                             method=lambda m: m.quantizer.codebook()), np.float32)
    if isinstance(tokenizer.model.quantizer, FactorizedQuantizer):
        def to_search(z):
            z = np.asarray(z, np.float32)
            return z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
    else:
        def to_search(z):
            return np.asarray(z, np.float32)
    return codes, to_search


def eval_image_batches(config, max_images: int = 0, batch_size: Optional[int] = None):
    """Yields uint8 [B, S, S, 3] batches of the evaluation split (padding rows dropped), up to
    max_images images in all (0: the whole split)."""
    from vqlc.data import make_eval_iterator
    batch_size = batch_size or config.eval.batch_size
    count = 0
    for batch in make_eval_iterator(config.data, batch_size=batch_size, shard_index=0,
                                    shard_count=1):
        images = to_uint8(np.asarray(batch["image"])[np.asarray(batch["mask"], bool)])
        if max_images:
            images = images[:max_images - count]
        count += len(images)
        if len(images):
            yield images
        if max_images and count >= max_images:
            return


def eval_images(config, max_images: int = 0, batch_size: Optional[int] = None) -> np.ndarray:
    """uint8 [N, S, S, 3]: the first max_images (0: all, held in memory) evaluation images."""
    batches = list(eval_image_batches(config, max_images, batch_size))
    if not batches:
        raise ValueError("The evaluation split is empty.")
    return np.concatenate(batches)


def _psnr_uint8(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[B] PSNR (dB) of uint8 images, as metrics.psnr on [0, 1] float32 images."""
    unit = lambda x: np.asarray(x).astype(np.float32) / np.float32(255)
    return np.asarray(metrics.psnr(unit(a), unit(b)), np.float64)


def token_replacement(tokenizer, images, ns: Sequence[int] = (1, 2, 5, 10, 50), *,
                      batch_size: Optional[int] = None, tile_n: Optional[int] = None) -> dict:
    """PSNR (dB, mean over images) when every token is replaced by its n-th nearest code.

    images: uint8 [N, H, W, 3]. n = 1 uses the tokenizer's own codes (ordinary quantisation), so
    its PSNR is exactly that of tokenizer.decode(tokenizer.encode(images)); 'rank1_agreement' is
    the fraction of tokens where this module's search agrees with them (1 up to float ties).
    Returns {'n': [...], 'psnr': [...], 'psnr_per_image': [len(ns), N], 'num_images',
    'num_tokens', 'rank1_agreement'}.
    """
    ns = sorted({int(n) for n in ns})
    images = np.asarray(images)
    if not len(images):
        raise ValueError("token_replacement needs at least one image.")
    batch_size = batch_size or tokenizer.config.eval.batch_size
    codes, to_search = search_space(tokenizer)
    per_image = [[] for _ in ns]
    agree = total = 0
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        own = tokenizer.encode(x)
        z = to_search(tokenizer.encode_latents(x))
        ranked = nth_nearest_codes(z.reshape(-1, z.shape[-1]), codes, ns,
                                   tile_n=tile_n).reshape(*own.shape, len(ns))
        if ns[0] == 1:
            agree += int(np.sum(ranked[..., 0] == own))
            total += own.size
        for j, n in enumerate(ns):
            ids = own if n == 1 else ranked[..., j]
            per_image[j].append(_psnr_uint8(x, tokenizer.decode(ids)))
    per_image = np.stack([np.concatenate(p) for p in per_image])
    return {
        "n": ns,
        "psnr": [float(v) for v in per_image.mean(axis=1)],
        "psnr_per_image": per_image,
        "num_images": int(len(images)),
        "num_tokens": int(len(images) * np.prod(own.shape[1:])) if len(images) else 0,
        "rank1_agreement": agree / total if total else None,
    }


def plot_token_replacement(results: Sequence[tuple[str, dict]], path: str,
                           title: str = "") -> None:
    """PSNR vs n (log x), one line per run: results = [(label, token_replacement(...)), ...]."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=120)
    for label, r in results:
        ax.plot(r["n"], r["psnr"], marker="o", lw=1.8, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("n (each token replaced by its n-th nearest code)")
    ax.set_ylabel("PSNR (dB)")
    ax.grid(alpha=0.3, which="both")
    ax.set_title(title or "Token replacement")
    ax.legend(fontsize=8)
    _save(fig, path)


# ----------------------------------------------------------------------------------------------
# 3. t-SNE of active and inactive codes

def code_counts_path(workdir: str) -> str:
    return rundir.eval_file(workdir, "code_counts.npy")


def load_code_counts(workdir: str) -> np.ndarray:
    """int64 [K] code usage over the evaluation, as written by the evaluation task."""
    path = code_counts_path(workdir)
    if not storage.exists(path):
        raise FileNotFoundError(
            f"{path!r} not found: evaluate the run first (python -m vqlc.main "
            f"--config=<config>:eval --workdir={workdir}), or pass --compute-usage.")
    return np.asarray(storage.load_npy(path), np.int64)


def compute_code_counts(tokenizer, images, batch_size: Optional[int] = None) -> np.ndarray:
    """int64 [K]: how often each code is the token of some image patch.

    images: uint8 [N, H, W, 3], or an iterable of such batches (eval_image_batches streams a
    whole split without holding it in memory).
    """
    batches = images
    if isinstance(images, np.ndarray):
        step = batch_size or tokenizer.config.eval.batch_size
        batches = (images[i:i + step] for i in range(0, len(images), step))
    counts = np.zeros((tokenizer.codebook_size,), np.int64)
    for batch in batches:
        ids = tokenizer.encode(batch)
        counts += np.bincount(ids.reshape(-1), minlength=tokenizer.codebook_size)
    return counts


def subsample_codes(active: np.ndarray, max_codes: int) -> np.ndarray:
    """Sorted code ids to show: all when K <= max_codes, else max_codes ids spread evenly over
    the active and over the inactive codes, in the same active/inactive ratio as the codebook."""
    active = np.asarray(active, bool)
    k = active.size
    if k <= max_codes:
        return np.arange(k)
    on, off = np.flatnonzero(active), np.flatnonzero(~active)
    n_on = int(round(max_codes * on.size / k))
    if on.size and off.size:  # a non-empty group keeps at least one point
        n_on = min(max(n_on, 1), max_codes - 1)
    n_off = max_codes - n_on

    def even(ids, m):  # m ids spread evenly over ids, first and last included
        if not m:
            return ids[:0]
        return ids[np.unique(np.linspace(0, ids.size - 1, m).round().astype(np.int64))]

    return np.sort(np.concatenate([even(on, n_on), even(off, n_off)]))


def tsne_embedding(vectors: np.ndarray, seed: int = 0) -> np.ndarray:
    """[M, 2] t-SNE (scikit-learn, PCA init, fixed seed) of vectors [M, D]."""
    with extras.needed("figures", "the t-SNE figure"):
        from sklearn.manifold import TSNE
    vectors = np.asarray(vectors, np.float32)
    m = len(vectors)
    if m < 3:
        raise ValueError(f"t-SNE needs at least 3 codes; got {m}.")
    # perplexity must stay below the number of points; 30 is sklearn's default.
    perplexity = float(min(30.0, max(1.0, (m - 1) / 3.0)))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                learning_rate="auto")
    if m > 1000:
        return tsne.fit_transform(vectors)
    # Small sets in one thread: OpenMP threads gain nothing there, and their spin-waiting
    # barriers took 30+ s for 32 points on a busy 2-core machine (0.1 s single-threaded).
    from threadpoolctl import threadpool_limits
    with threadpool_limits(1):
        return tsne.fit_transform(vectors)


def codebook_tsne(tokenizer, counts: np.ndarray, max_codes: int = 5000, seed: int = 0) -> dict:
    """t-SNE of the codebook in the quantizer's search space, split by usage counts [K].

    Returns {'xy': [M, 2], 'ids': [M], 'active': bool [M], 'num_active', 'num_inactive',
    'utilization'} where the counts and utilisation are over the whole codebook.
    """
    codes, _ = search_space(tokenizer)
    counts = np.asarray(counts)
    if counts.shape != (codes.shape[0],):
        raise ValueError(f"Usage counts have shape {counts.shape}; the codebook has "
                         f"{codes.shape[0]} codes.")
    active = counts > 0
    ids = subsample_codes(active, max_codes)
    return {
        "xy": tsne_embedding(codes[ids], seed),
        "ids": ids,
        "active": active[ids],
        "num_active": int(active.sum()),
        "num_inactive": int((~active).sum()),
        "utilization": float(active.mean()),
    }


def plot_tsne(panels: Sequence[tuple[str, dict]], path: str, title: str = "") -> None:
    """One scatter panel per run: panels = [(label, codebook_tsne(...)), ...]."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.6), dpi=120,
                             squeeze=False)
    for ax, (label, r) in zip(axes[0], panels):
        xy, act = r["xy"], r["active"]
        size = 4.0 if len(xy) > 1000 else 12.0
        ax.scatter(xy[~act, 0], xy[~act, 1], s=size, c=INACTIVE_COLOR, alpha=0.7, lw=0,
                   label=f"inactive ({r['num_inactive']})")
        ax.scatter(xy[act, 0], xy[act, 1], s=size, c=ACTIVE_COLOR, alpha=0.7, lw=0,
                   label=f"active ({r['num_active']})")
        shown = "" if len(xy) == r["num_active"] + r["num_inactive"] else f", {len(xy)} shown"
        ax.set_title(f"{label}: utilisation {100.0 * r['utilization']:.1f}%{shown}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=7, markerscale=2, loc="best")
    if title:
        fig.suptitle(title)
    _save(fig, path)


# ----------------------------------------------------------------------------------------------

def _pyplot():
    with extras.needed("figures"):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str) -> None:
    fig.tight_layout()
    atomic_io.save_figure(path, fig)
    import matplotlib.pyplot as plt
    plt.close(fig)
