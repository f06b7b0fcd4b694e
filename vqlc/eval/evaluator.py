"""Reconstruction evaluation of a tokenizer on the evaluation split.

Every example is counted once across devices and processes: padded examples carry mask=False
and are excluded from every sum, including the code-usage counts.
"""
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vqlc import parallel
from vqlc.eval import images as image_io
from vqlc.eval import metrics
from vqlc.models import lpips as lpips_lib

SUM_KEYS = ("psnr", "psnr_y", "ssim", "lpips")


def make_eval_step(model, num_codes: int):
    def eval_step(variables, lpips_params, batch):
        x, mask = batch["image"], batch["mask"]
        x_rec, q = model.apply(variables, x, train=False)
        x_rec = jnp.clip(x_rec, -1.0, 1.0)
        a, b = metrics.to_unit_range(x), metrics.to_unit_range(x_rec)
        per_image = {
            "psnr": metrics.psnr(a, b), "psnr_y": metrics.psnr_y(a, b), "ssim": metrics.ssim(a, b),
            "lpips": lpips_lib.lpips(x, x_rec, params=lpips_params),
        }
        m = mask.astype(jnp.float32)
        sums = {k: jnp.sum(v * m) for k, v in per_image.items()}
        token_mask = jnp.broadcast_to(mask.reshape((-1,) + (1,) * (q.indices.ndim - 1)),
                                      q.indices.shape)
        counts = jax.ops.segment_sum(token_mask.reshape(-1).astype(jnp.int32),
                                     q.indices.reshape(-1), num_segments=num_codes)
        return sums, jnp.sum(m), counts, x_rec
    return eval_step


def evaluate(config: ml_collections.ConfigDict, workdir: str, *, model, variables, mesh,
             step: int | None = None) -> dict:
    """Reconstructs the evaluation split; writes <workdir>/eval/{metrics.json,
    reconstructions.png}; returns the metrics."""
    from vqlc.data import make_eval_iterator

    start = time.time()
    num_codes = config.quantizer.codebook_size
    batch_size = config.eval.batch_size
    parallel.check_batch_size(batch_size, mesh, "eval.batch_size")
    step_fn = jax.jit(make_eval_step(model, num_codes))
    lpips_params = lpips_lib.load_vgg16_lpips_params()
    fid = None
    if config.eval.rfid:  # loads the Inception weights now: a missing file fails before compute
        from vqlc.eval.rfid import RFID
        fid = RFID(config)
    it = make_eval_iterator(config.data, batch_size=parallel.local_batch_size(batch_size),
                            shard_index=jax.process_index(), shard_count=jax.process_count())
    totals = {k: 0.0 for k in SUM_KEYS}
    count, counts = 0.0, np.zeros((num_codes,), np.int64)
    grid_orig, grid_rec = [], []
    for local in it:
        batch = parallel.global_batch(local, mesh)
        sums, n, c, x_rec = step_fn(variables, lpips_params, batch)
        for k in SUM_KEYS:
            totals[k] += float(sums[k])
        count += float(n)
        counts += np.asarray(c, np.int64)
        if fid is not None:
            fid.add(local["image"], parallel.local_rows(x_rec), local["mask"])
        if len(grid_orig) < config.eval.num_grid_images and jax.process_index() == 0:
            keep = np.asarray(local["mask"])
            grid_orig.extend(image_io.to_uint8(local["image"])[keep])
            grid_rec.extend(image_io.to_uint8(parallel.local_rows(x_rec))[keep])
    if count == 0:
        raise ValueError("The evaluation split is empty.")
    num_tokens = int(counts.sum())
    results = {k: totals[k] / count for k in SUM_KEYS}
    if fid is not None:
        results.update(fid.result())
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
        "eval_seconds": round(time.time() - start, 1),
        "protocol": ("PSNR on RGB and BT.601 Y in [0,1]; SSIM Gaussian 11x11 sigma 1.5, data "
                     "range 1; LPIPS-VGG16 v0.1 on [-1,1] inputs; utilisation = codes used at "
                     "least once over all evaluation tokens / K"),
    })
    if jax.process_index() == 0:
        out = os.path.join(workdir, "eval")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(results, f, indent=2)
        np.save(os.path.join(out, "code_counts.npy"), counts)
        n = config.eval.num_grid_images
        image_io.save_png(os.path.join(out, "reconstructions.png"),
                          image_io.comparison_grid(np.stack(grid_orig[:n]), np.stack(grid_rec[:n])))
    logging.info("Evaluation: %s", {k: v for k, v in results.items() if k != "protocol"})
    return results
