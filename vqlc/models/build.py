"""Modules built from a config: the only place that reads ConfigDicts for models."""
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


def tokenizer_from_config(config: ml_collections.ConfigDict) -> vqgan.VQModel:
    m = config.model
    return vqgan.VQModel(
        ch=m.ch, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
        attn_resolutions=tuple(m.attn_resolutions), resolution=config.data.image_size,
        z_channels=m.z_channels, dropout=m.dropout, embed_dim=config.quantizer.dim,
        quantizer=quantizer_from_config(config))


def discriminator_from_config(config: ml_collections.ConfigDict):
    return discriminator.NLayerDiscriminator(ndf=config.disc.ndf, n_layers=config.disc.n_layers)
