"""Human-readable evaluation outputs: the markdown table and the code-usage plot."""
import numpy as np

from vqlc import atomic_io, extras

# (key in metrics.json, label, format, how the number is computed); rows whose key is absent
# from the results (rFID off, LPIPS-AlexNet off) are left out.
_ROWS = (
    ("rfid", "rFID (centre-crop reference)", "{:.2f}", "see rfid_protocol"),
    ("rfid_raw", "rFID (raw-image reference, as the release)", "{:.2f}", "see rfid_raw_protocol"),
    ("lpips", "LPIPS (VGG16)", "{:.4f}", "v0.1 heads, inputs in [-1, 1]"),
    ("lpips_alex", "LPIPS (AlexNet)", "{:.4f}", "v0.1 heads, inputs in [-1, 1]"),
    ("lpips_alex_release", "LPIPS (AlexNet, release scaling)", "{:.4f}",
     "inputs mapped to [-3, 1] as the release does"),
    ("psnr", "PSNR (RGB)", "{:.2f}", "dB, images in [0, 1]"),
    ("psnr_y", "PSNR (Y)", "{:.2f}", "dB, BT.601 luma (the release's PSNR)"),
    ("ssim", "SSIM", "{:.4f}", "Gaussian 11x11, sigma 1.5, data range 1, RGB"),
    ("utilization", "Codebook utilisation", "{:.2%}", "codes used >= once / K"),
    ("perplexity", "Perplexity", "{:.1f}", "exp(entropy) of code usage"),
    ("dead_codes", "Dead codes", "{:d}", "codes never used"),
    ("codebook_size", "K", "{:d}", ""),
    ("num_images", "Images", "{:d}", "each counted once over all devices and hosts"),
    ("num_tokens", "Tokens", "{:d}", ""),
)


def markdown_table(results: dict, title: str = "") -> str:
    """The metrics as a markdown table with how each was computed."""
    lines = [f"# {title}", ""] if title else []
    lines += ["| metric | value | protocol |", "|---|---:|---|"]
    for key, label, fmt, how in _ROWS:
        if results.get(key) is not None:
            lines.append(f"| {label} | {fmt.format(results[key])} | {how} |")
    lines.append("")
    for key in ("rfid_protocol", "rfid_raw_protocol", "protocol"):
        if results.get(key):
            lines.append(f"- {key}: {results[key]}")
    return "\n".join(lines) + "\n"


def plot_code_usage(counts, path: str, title: str = "") -> None:
    """Two panels: codes ranked by how often they were used (log scale), and the histogram of
    per-code counts. Dead codes are counted in the title."""
    with extras.needed("train", "the code-usage plot"):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

    counts = np.asarray(counts, np.int64)
    k = counts.size
    dead = int(np.sum(counts == 0))
    fig, (ranked, hist) = plt.subplots(1, 2, figsize=(10, 3.5), dpi=120)
    ranked.plot(np.arange(1, k + 1), np.sort(counts)[::-1] + 1, lw=1.2)
    ranked.set_yscale("log")
    ranked.set_xlabel("code rank")
    ranked.set_ylabel("uses + 1")
    ranked.axhline(counts.sum() / k + 1, color="gray", ls="--", lw=0.8, label="uniform")
    ranked.legend(loc="upper right")
    ranked.grid(alpha=0.3)
    bins = np.unique(np.round(np.logspace(0, np.log10(max(counts.max(), 1) + 1), 40))) - 1
    hist.hist(counts, bins=np.append(bins, counts.max() + 1), color="tab:green")
    hist.set_xscale("symlog", linthresh=1)
    hist.set_xlabel("uses per code")
    hist.set_ylabel("codes")
    hist.grid(alpha=0.3)
    fig.suptitle(title or f"Code usage: {k - dead:,} of {k:,} codes used ({dead:,} dead)")
    fig.tight_layout()
    atomic_io.save_figure(path, fig)
    plt.close(fig)
