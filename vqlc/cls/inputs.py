"""From a token map to a classifier's logits: what each stem (vqlc.cls.vit.STEMS) reads of the
tokenizer, mixup / cutmix on the map, and the forward pass, as pure jittable functions.

    clf = TokenClassifier(vit_model, tokenizer.model)
    tables = clf.tables(tokenizer)             # frozen arrays on the tokenizer's mesh
    logits = clf.logits(params, tables, codes)  # int32 codes [B, h, w] -> [B, classes]

Per stem, the token map becomes per-token vectors [B, h, w, d] first (`vectors`):
  projected  the code's vector in latent space, proj(C)[id] for LC (the tokenizer's
             code_vectors(): what its decoder sees), d = the latent dim;
  codebook   the frozen codebook row C[id] (LC only), d = feature_dim;
  embed      the ViT's own learned table (vit.embed_ids), d = width;
  pixels     proj(C)[id] as for `projected`; after mixing, the tokenizer's decoder turns them
             into an image (frozen: no gradient reaches the tokenizer), which enters MAE's patch
             embedding normalised as MAE's data pipeline does (ImageNet mean / std on [0, 1]).
Mixup and cutmix act on these vectors (vqlc.cls.recipe.mix_batch): on token maps, not pixels.
For `pixels` that means the decoder sees blended latents (mixup) or a latent map with a pasted
box of whole tokens (cutmix), then draws its image; for `embed` the learned embeddings mix.

The tables are arguments of the compiled step (the codebook stem's C is K x 768 floats), so they
are never baked into a program as constants and never checkpointed.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from vqlc.cls import recipe, vit as vit_lib

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # MAE's transforms.Normalize (timm's IMAGENET_DEFAULT_*)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalise_images(images: jax.Array) -> jax.Array:
    """Images in [-1, 1] (a decoder's output, clipped here) -> MAE's normalised input."""
    x = jnp.clip((images.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)
    return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


@dataclasses.dataclass(frozen=True)
class TokenClassifier:
    """A ViT over one tokenizer's token maps (the ViT's `stem` says how the map enters)."""
    vit: vit_lib.ViT
    tokenizer_model: Any  # the tokenizer's Flax module (the pixels stem decodes with it)

    @property
    def stem(self) -> str:
        return self.vit.stem

    def tables(self, tokenizer) -> dict:
        """The frozen arrays the stem reads, from a loaded Tokenizer (already on its mesh)."""
        if self.stem in ("projected", "pixels"):
            tables = {"vectors": tokenizer.code_vectors()}
            if self.stem == "pixels":
                tables["tokenizer"] = tokenizer.variables
            return tables
        if self.stem == "codebook":
            return {"codebook": tokenizer.frozen_codebook()}
        return {}

    def vectors(self, params, tables: dict, codes: jax.Array) -> jax.Array:
        """int codes [B, h, w] -> float32 per-token vectors [B, h, w, d] (see the module
        docstring)."""
        if self.stem == "embed":
            return vit_lib.embed_ids(params, codes)
        table = tables["codebook" if self.stem == "codebook" else "vectors"]
        return jnp.take(table, codes, axis=0).astype(jnp.float32)

    def model_input(self, tables: dict, vectors: jax.Array) -> jax.Array:
        """Per-token vectors -> what the ViT takes (decoded, normalised images for `pixels`)."""
        if self.stem != "pixels":
            return vectors
        from vqlc.tokenizer import decode_vectors_fn
        images = decode_vectors_fn(self.tokenizer_model)(tables["tokenizer"], vectors)
        return normalise_images(jax.lax.stop_gradient(images))

    def forward(self, params, tables: dict, vectors: jax.Array, *, train: bool = False,
                key: jax.Array | None = None) -> jax.Array:
        """Per-token vectors -> float32 logits [B, classes]; train=True needs `key` (drop
        path)."""
        rngs = {"dropout": key} if train and key is not None else {}
        return self.vit.apply({"params": params}, self.model_input(tables, vectors),
                              train=train, rngs=rngs)

    def logits(self, params, tables: dict, codes: jax.Array) -> jax.Array:
        """Evaluation: int codes [B, h, w] -> float32 logits [B, classes]."""
        return self.forward(params, tables, self.vectors(params, tables, codes))

    def loss(self, params, tables: dict, codes: jax.Array, labels: jax.Array, key: jax.Array,
             mixing: recipe.MixupConfig) -> jax.Array:
        """Training: one mixup / cutmix draw on the batch's vectors, soft targets (label
        smoothing), drop path; the soft cross-entropy."""
        mix_key, drop_key = jax.random.split(key)
        vectors, targets, _ = recipe.mix_batch(mix_key, self.vectors(params, tables, codes),
                                               labels, mixing)
        logits = self.forward(params, tables, vectors, train=True, key=drop_key)
        return recipe.soft_cross_entropy(logits, targets)
