"""Reconstruction evaluation of a tokenizer on the evaluation split.

Every example is counted once across devices and processes: padded examples carry mask=False
and are excluded from every sum, including the code-usage counts.
"""
import logging
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vqlc import atomic_io, extras, parallel, rundir
from vqlc.eval import images as image_io
from vqlc.eval import metrics
from vqlc.eval import report
from vqlc.models import lpips as lpips_lib

BASE_KEYS = ("psnr", "psnr_y", "ssim", "lpips")
ALEX_KEYS = ("lpips_alex", "lpips_alex_release")


def make_eval_step(model, num_codes: int, lpips_alex: bool = False):
    """(variables, {'vgg': params[, 'alex': params]}, batch) -> (sums, count, code counts, x_rec);
    the per-image metrics are summed over unpadded rows only."""
    def eval_step(variables, lpips_params, batch):
        x, mask = batch["image"], batch["mask"]
        x_rec, q = model.apply(variables, x, train=False)
        x_rec = jnp.clip(x_rec, -1.0, 1.0)
        a, b = metrics.to_unit_range(x), metrics.to_unit_range(x_rec)
        per_image = {
            "psnr": metrics.psnr(a, b), "psnr_y": metrics.psnr_y(a, b), "ssim": metrics.ssim(a, b),
            "lpips": lpips_lib.lpips(x, x_rec, params=lpips_params["vgg"]),
        }
        if lpips_alex:
            alex = lpips_params["alex"]
            per_image["lpips_alex"] = lpips_lib.lpips(x, x_rec, params=alex, net="alex")
            # The release calls lpips with normalize=True on images already in [-1, 1].
            per_image["lpips_alex_release"] = lpips_lib.lpips(
                2.0 * x - 1.0, 2.0 * x_rec - 1.0, params=alex, net="alex")
        m = mask.astype(jnp.float32)
        sums = {k: jnp.sum(v * m) for k, v in per_image.items()}
        token_mask = jnp.broadcast_to(mask.reshape((-1,) + (1,) * (q.indices.ndim - 1)),
                                      q.indices.shape)
        counts = jax.ops.segment_sum(token_mask.reshape(-1).astype(jnp.int32),
                                     q.indices.reshape(-1), num_segments=num_codes)
        return sums, jnp.sum(m), counts, x_rec
    return eval_step


PROTOCOL = ("PSNR on RGB and BT.601 Y in [0,1]; SSIM Gaussian 11x11 sigma 1.5, data range 1; "
            "LPIPS v0.1 (VGG16; AlexNet) on [-1,1] inputs, lpips_alex_release on 2x-1 as the "
            "release computes it; utilisation = codes used at least once over all evaluation "
            "tokens / K")


def evaluate(config: ml_collections.ConfigDict, workdir: str, *, model, variables, mesh,
             step: int | None = None) -> dict:
    """Reconstructs the evaluation split on every device of `mesh` and every process; writes
    <workdir>/eval/{metrics.json, metrics.md, reconstructions.png, code_usage.png,
    code_counts.npy}; returns the metrics."""
    with extras.needed("train", "evaluation"):
        from tqdm import tqdm
    from vqlc.data import make_eval_iterator, num_eval_batches

    start = time.time()
    num_codes = config.quantizer.codebook_size
    batch_size = config.eval.batch_size
    parallel.check_batch_size(batch_size, mesh, "eval.batch_size")
    use_alex = bool(config.eval.get("lpips_alex", False))
    if use_alex and config.data.image_size < lpips_lib.ALEXNET_MIN_SIZE:
        raise ValueError(f"eval.lpips_alex needs images of at least {lpips_lib.ALEXNET_MIN_SIZE} "
                         f"px (AlexNet's pooling); data.image_size is {config.data.image_size}. "
                         "Set --config.eval.lpips_alex=False.")
    step_fn = jax.jit(make_eval_step(model, num_codes, lpips_alex=use_alex))
    lpips_params = {"vgg": lpips_lib.load_vgg16_lpips_params()}
    if use_alex:
        lpips_params["alex"] = lpips_lib.load_alexnet_lpips_params()
    lpips_params = jax.device_put(lpips_params, parallel.replicated(mesh))
    fid = None
    if config.eval.rfid:  # loads the Inception weights now: a missing file fails before compute
        from vqlc.eval.rfid import RFID
        fid = RFID(config, mesh)
    local_batch = parallel.local_batch_size(batch_size)
    it = make_eval_iterator(config.data, batch_size=local_batch,
                            shard_index=jax.process_index(), shard_count=jax.process_count())
    total = num_eval_batches(config.data, local_batch, jax.process_count())
    bar = config.eval.get("progress_bar", True) and jax.process_index() == 0
    keys = BASE_KEYS + (ALEX_KEYS if use_alex else ())
    totals = {k: 0.0 for k in keys}
    count, counts = 0.0, np.zeros((num_codes,), np.int64)
    grid_orig, grid_rec = [], []
    for local in tqdm(it, total=total, desc="evaluate", unit="batch", disable=not bar):
        batch = parallel.global_batch(local, mesh)
        sums, n, c, x_rec = step_fn(variables, lpips_params, batch)
        if fid is not None:
            fid.add(batch["image"], x_rec, local["mask"])
        for k in keys:
            totals[k] += float(sums[k])
        count += float(n)
        counts += np.asarray(c, np.int64)
        if len(grid_orig) < config.eval.num_grid_images and jax.process_index() == 0:
            keep = np.asarray(local["mask"])
            grid_orig.extend(image_io.to_uint8(local["image"])[keep])
            grid_rec.extend(image_io.to_uint8(parallel.local_rows(x_rec))[keep])
    if count == 0:
        raise ValueError("The evaluation split is empty.")
    num_tokens = int(counts.sum())
    results = {k: totals[k] / count for k in keys}
    if fid is not None:
        results.update(fid.result())
    seconds = time.time() - start
    results.update({
        "utilization": metrics.utilization(counts),
        "perplexity": float(metrics.perplexity(counts)),
        "dead_codes": int(np.sum(counts == 0)),
        "codebook_size": num_codes,
        "num_images": int(count),
        "num_tokens": num_tokens,
        "tokens_per_code": num_tokens / num_codes,
        "quantizer": config.quantizer.kind,
        "step": step,
        "eval_seconds": round(seconds, 1),
        "images_per_second": round(count / seconds, 2),
        "num_devices": int(mesh.devices.size),
        "num_processes": jax.process_count(),
        "protocol": PROTOCOL,
    })
    if jax.process_index() == 0:
        _write_outputs(config, rundir.eval_dir(workdir), results, counts, grid_orig, grid_rec)
    logging.info("Evaluation: %s",
                 {k: v for k, v in results.items() if not k.endswith("protocol")})
    return results


def _write_outputs(config, out: str, results: dict, counts, grid_orig, grid_rec) -> None:
    title = (f"{config.quantizer.kind.upper()} tokenizer, K={config.quantizer.codebook_size}, "
             f"step {results['step']}")
    atomic_io.atomic_write_json(rundir.join(out, "metrics.json"), results)
    atomic_io.write_text(rundir.join(out, "metrics.md"), report.markdown_table(results, title))
    atomic_io.atomic_save_npy(rundir.join(out, "code_counts.npy"), counts)
    report.plot_code_usage(counts, rundir.join(out, "code_usage.png"))
    n = config.eval.num_grid_images
    image_io.save_png(rundir.join(out, "reconstructions.png"),
                      image_io.comparison_grid(np.stack(grid_orig[:n]), np.stack(grid_rec[:n])))
