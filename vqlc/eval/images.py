"""Image value conversions ([-1, 1] floats <-> uint8) and PNG outputs: reconstruction grids
and the utilisation-over-training plot."""

import numpy as np

from vqlc import atomic_io


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1] (x / 127.5 - 1, as the reference's ToTensor+Normalize)."""
    out = np.multiply(images, np.float32(1.0 / 127.5), dtype=np.float32)
    out -= np.float32(1.0)
    return out


def to_uint8(x) -> np.ndarray:
    """[-1, 1] float images -> uint8."""
    return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def comparison_grid(originals, reconstructions, pad: int = 2, min_size: int = 128) -> np.ndarray:
    """Two rows: originals above their reconstructions. Inputs uint8 [N, H, W, 3].

    Images smaller than `min_size` are enlarged by an integer factor (nearest neighbour), so
    the demo's 32 px crops stay visible.
    """
    originals, reconstructions = np.asarray(originals), np.asarray(reconstructions)
    factor = max(1, min_size // originals.shape[1])
    if factor > 1:
        originals, reconstructions = (
            np.repeat(np.repeat(a, factor, axis=1), factor, axis=2)
            for a in (originals, reconstructions))
    n, h, w, c = originals.shape
    grid = np.full((2 * h + 3 * pad, n * (w + pad) + pad, c), 255, np.uint8)
    for row, images in enumerate((originals, reconstructions)):
        y = pad + row * (h + pad)
        for i in range(n):
            x = pad + i * (w + pad)
            grid[y:y + h, x:x + w] = images[i]
    return grid


def save_png(path: str, image: np.ndarray) -> None:
    atomic_io.save_png(path, image)


def plot_utilization(records: list[dict], path: str, title: str = "") -> bool:
    """Line plot of codebook utilisation over training steps. False when nothing to plot."""
    from vqlc.eval import analysis  # the multi-run plot; imported here to keep this module light
    return analysis.plot_utilization_runs([(None, records)], path, title=title)


def image_grid(rows, pad: int = 2, min_size: int = 64) -> np.ndarray:
    """One row per entry of `rows` (each uint8 [n_i, H, W, 3], n_i may differ; short rows are
    left white), e.g. a few samples per class. Small images are enlarged as in
    `comparison_grid`."""
    rows = [np.asarray(r) for r in rows]
    shape = next((r.shape[1:] for r in rows if len(r)), None)
    if shape is None:
        raise ValueError("image_grid: no images.")
    factor = max(1, min_size // shape[0])
    h, w, c = shape[0] * factor, shape[1] * factor, shape[2]
    cols = max(len(r) for r in rows)
    grid = np.full((len(rows) * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i, images in enumerate(rows):
        for j, image in enumerate(images):
            if factor > 1:
                image = np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y:y + h, x:x + w] = image
    return grid
