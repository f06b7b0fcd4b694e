"""Modules built from a config: the only place that reads ConfigDicts for models."""
import jax.numpy as jnp
import ml_collections

from vqlc.models import discriminator, quantizers, vqgan


def quantizer_from_config(config: ml_collections.ConfigDict):
    q = config.quantizer
    kwargs = {"commitment_weight": q.commitment_weight, "codebook_weight": q.codebook_weight}
    if q.kind == "ema":
        kwargs = {"commitment_weight": q.commitment_weight, "decay": q.ema_decay, "eps": q.ema_eps}
    elif q.kind == "lc":
        kwargs["feature_dim"] = config.codebook.feature_dim
    return quantizers.make_quantizer(q.kind, q.codebook_size, q.dim, **kwargs)


# config.model.dtype -> the compute dtype (parameters are float32 whatever it is).
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# config.model.remat: "none" keeps every activation for the backward pass; "blocks" recomputes
# each residual / attention block's activations there (less memory, more compute).
REMAT_POLICIES = ("none", "blocks")


def precision(model_config: ml_collections.ConfigDict) -> tuple:
    """(compute dtype, remat: bool) from config.model.dtype / config.model.remat; a value other
    than the valid ones is a ValueError naming them. A config.json written before these
    fields existed reads as float32, no remat."""
    dtype = model_config.get("dtype", "float32")
    remat = model_config.get("remat", "none")
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"config.model.dtype={dtype!r} is not a compute dtype vqlc supports; "
                         f"use one of: {', '.join(COMPUTE_DTYPES)} (parameters stay float32).")
    if remat not in REMAT_POLICIES:
        raise ValueError(f"config.model.remat={remat!r}; use one of: "
                         f"{', '.join(REMAT_POLICIES)}.")
    return COMPUTE_DTYPES[dtype], remat == "blocks"


def tokenizer_from_config(config: ml_collections.ConfigDict) -> vqgan.VQModel:
    m = config.model
    dtype, remat = precision(m)
    return vqgan.VQModel(
        ch=m.ch, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
        attn_resolutions=tuple(m.attn_resolutions), resolution=config.data.image_size,
        z_channels=m.z_channels, dropout=m.dropout, embed_dim=config.quantizer.dim,
        quantizer=quantizer_from_config(config), dtype=dtype, remat=remat)


def discriminator_from_config(config: ml_collections.ConfigDict):
    return discriminator.NLayerDiscriminator(ndf=config.disc.ndf, n_layers=config.disc.n_layers)
