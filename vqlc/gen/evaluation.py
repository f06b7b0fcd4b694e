"""The end of a generator run (`gpt`, `diffusion`): class-balanced samples through the `sample`
task, scored against held-out crops of the training images.

Writes <workdir>/eval/: samples/ (the sample task's workdir: samples.npz, samples.json,
samples_grid.png), samples.png (that grid), reference.npz (the held-out crops, ADM layout) and
metrics.json: gfid (clean-fid's FID of the samples against the held-out crops; null with a note
when the Inception weights are not installed), sample_utilization (codes used by the samples /
K), num_samples and the sampler's settings.

Held-out crops: the training data's crops at positions drawn from another seed than training
used (the training images, not the training crops), the same number per class as samples.
"""
from __future__ import annotations

import logging

import jax
import ml_collections
import numpy as np

from vqlc import atomic_io, rundir, storage
from vqlc.data import pipeline, transforms
from vqlc.gen import sample as sample_lib

EVAL_DIR = "eval"
REFERENCE_SEED_OFFSET = 1_000_003  # held-out crop positions: a seed training never uses


# The sample task's generator.kind for each training task.
GENERATOR_KIND = {"gpt": "gpt", "diffusion": "diffusion"}


def sample_config(config, workdir: str) -> ml_collections.ConfigDict:
    e = config.eval
    kind = GENERATOR_KIND[config.task]
    c = sample_lib.base_config()
    c.generator.kind = kind
    c.generator.workdir = workdir
    c.generator[kind].update(e.sampler.to_dict())
    c.tokenizer.workdir = config.tokenizer.workdir
    c.sample.num_classes = max(config.network.num_classes, 1)
    c.sample.labels = "balanced"
    c.sample.per_class = e.per_class
    c.sample.batch_size = e.batch_size
    c.sample.seed = config.seed
    c.sample.grid_classes = min(c.sample.num_classes, 8)
    c.sample.grid_per_class = 8
    c.sample.progress_bar = config.train.progress_bar
    c.mesh.data = config.mesh.data
    return c


def reference_crops(data, per_class: int, num_classes: int, seed: int) -> tuple:
    """uint8 [N, S, S, 3] held-out crops of the training images and their labels, per_class
    of each class (the first images of each class in the source's order)."""
    source = pipeline.make_source(data, "train")
    resize = pipeline.resize_shorter(data)
    known = getattr(source, "labels", None)  # folders know their labels without decoding
    images, labels, taken = [], [], np.zeros(num_classes, np.int64)
    for i in range(len(source)):
        if known is not None and (int(known[i]) >= num_classes or
                                  taken[int(known[i])] >= per_class):
            continue
        record = source[i]
        label = int(record["label"]) if num_classes > 1 else 0
        if label >= num_classes or taken[label] >= per_class:
            continue
        images.append(transforms.seeded_train_crop(record["image"], data.image_size, resize,
                                                   seed + REFERENCE_SEED_OFFSET, i))
        labels.append(label)
        taken[label] += 1
        if taken.min() >= per_class:
            break
    if taken.min() < per_class:
        raise ValueError(f"The training data has fewer than eval.per_class={per_class} images "
                         f"of classes {np.flatnonzero(taken < per_class).tolist()} (of "
                         f"network.num_classes={num_classes}); lower eval.per_class or fix "
                         "network.num_classes.")
    return np.stack(images), np.asarray(labels, np.int32)


def _gfid(reference: str, samples: str) -> tuple:
    """(FID or None, note) of the samples against the reference (clean-fid's protocol)."""
    from vqlc.eval import generation
    try:
        result = generation.compute(reference, samples, "clean", use_cache=False)
    except FileNotFoundError as e:  # no Inception weights installed
        return None, f"gFID not computed: {e}"
    return float(result["fid"]), result.get("fid_protocol", "clean")


def prepare_reference(config, workdir: str, tokenizer) -> str:
    """<workdir>/eval/reference.npz, made once per workdir (a function of the config); run
    before training so that data too small for eval.per_class fails before any work."""
    reference = rundir.join(workdir, EVAL_DIR, "reference.npz")
    if not storage.exists(reference):
        images, labels = reference_crops(tokenizer.config.data, config.eval.per_class,
                                         max(config.network.num_classes, 1), config.seed)
        if jax.process_index() == 0:
            atomic_io.atomic_save_npz(reference, {"arr_0": images, "arr_1": labels})
    return reference


def evaluate(config, workdir: str, tokenizer) -> dict:
    """Samples, the reference crops and metrics.json; returns the metrics."""
    eval_dir = rundir.join(workdir, EVAL_DIR)
    samples_dir = rundir.join(eval_dir, "samples")
    sample_lib.run(sample_config(config, workdir), samples_dir)
    record = storage.read_json(rundir.join(samples_dir, "samples.json"))
    num_classes = max(config.network.num_classes, 1)
    reference = prepare_reference(config, workdir, tokenizer)
    gfid, protocol = _gfid(reference, rundir.join(samples_dir, "samples.npz"))
    atomic_io.atomic_copy(rundir.join(samples_dir, "samples_grid.png"),
                          rundir.join(eval_dir, "samples.png"))
    metrics = {"gfid": gfid, "gfid_protocol": protocol,
               "sample_utilization": record["utilization"], "codes_used": record["codes_used"],
               "codebook_size": record["codebook_size"], "num_samples": record["num_samples"],
               "num_reference": int(num_classes * config.eval.per_class),
               "sampler": config.eval.sampler.to_dict(), "step": record["generator"]["step"]}
    atomic_io.atomic_write_json(rundir.join(eval_dir, "metrics.json"), metrics)
    logging.info("%s eval: gFID %s, sample utilisation %.3f over %d samples", config.task, gfid,
                 metrics["sample_utilization"], metrics["num_samples"])
    return metrics
