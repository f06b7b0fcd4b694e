"""CLIP patch-feature throughput: images/s of the Flax vision tower, per geometry and dtype.

    python benchmarks/clip_features.py                          # ViT-B/16 and ViT-L/14, float32
    python benchmarks/clip_features.py --geometries ViT-L/14 --batch 64 --dtypes float32,bfloat16

Random weights of the real geometry (the speed does not depend on the values), uint8 input at
the geometry's resolution, the release's feature (post-layernorm on every token, projection, CLS dropped), batch
sharded over all local devices. Prints a table with images/s and the achieved TFLOP/s
(2 x multiply-adds of the matmuls), and the time that implies for ImageNet-1K train
(1,281,167 images) on this machine.
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vqlc.models import clip

IMAGENET_TRAIN = 1_281_167


def forward_flop(c: clip.ClipVisionConfig) -> float:
    """Matmul FLOPs of one image: patch embedding, attention, MLP, projection."""
    t = c.num_patches + 1
    w, f = c.hidden_size, c.intermediate_size
    per_layer = 2 * t * (4 * w * w + 2 * w * f) + 2 * 2 * t * t * w
    patch = 2 * c.num_patches * (3 * c.patch_size ** 2) * w
    return patch + c.num_layers * per_layer + 2 * t * w * c.projection_dim


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--geometries", default="ViT-B/16,ViT-L/14")
    p.add_argument("--dtypes", default="float32")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()

    mesh = Mesh(np.asarray(jax.local_devices()), ("data",))
    batch = -(-args.batch // mesh.size) * mesh.size
    print(f"devices: {mesh.size} x {jax.devices()[0].device_kind}, batch {batch}")
    print(f"{'geometry':<10} {'dtype':<9} {'img/s':>8} {'TFLOP/s':>8} {'ImageNet train':>15}")
    for name in args.geometries.split(","):
        config = clip.KNOWN_GEOMETRIES[name]
        size = config.image_size
        images = jax.device_put(
            np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), np.uint8),
            NamedSharding(mesh, P("data")))
        for dtype in args.dtypes.split(","):
            model = clip.random_init(config, dtype=jnp.dtype(dtype))
            fn = jax.jit(model.features_fn)
            fn(model.params, images).block_until_ready()  # compile
            start = time.perf_counter()
            for _ in range(args.steps):
                out = fn(model.params, images)
            out.block_until_ready()
            rate = batch * args.steps / (time.perf_counter() - start)
            hours = IMAGENET_TRAIN / rate / 3600
            print(f"{name:<10} {dtype:<9} {rate:8.2f} {rate * forward_flop(config) / 1e12:8.3f} "
                  f"{hours:13.1f} h")
    print(f"output per image: {out.shape[1:]} (tokens x feature_dim)")


if __name__ == "__main__":
    main()
