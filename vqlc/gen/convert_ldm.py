"""The release's LDM-LC weights (a latent-diffusion LatentDiffusion state dict) -> the parameters
of vqlc.gen.networks.unet.UNet.

The release (zh460045050/VQGAN-LC, ldm-lc/) trains with PyTorch Lightning; its checkpoint's
"state_dict" holds, besides the tokenizer (`first_stage_model.*`) and the schedule's buffers
(`betas`, `alphas_cumprod`, ...), the UNet under `model.diffusion_model.*`, its EMA under
`model_ema.*` (LitEma: the same names with the dots removed, `model_ema.diffusion_model` +
`input_blocks00weight`...) and the class table `cond_stage_model.embedding.weight` (not in the
EMA: LitEma tracks `model` only). Only those are read here; everything else is ignored.

The key rule (the UNet module docstring lists the names): drop the `model.diffusion_model.`
prefix, split on ".", join each numeric part to the name before it with "_"
(`input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.weight` ->
`input_blocks_1_1/transformer_blocks_0/attn2/to_out_0/kernel`). Leaves: 4-D `weight` (a conv,
[O, I, kh, kw]) -> `kernel` [kh, kw, I, O]; 2-D `weight` (a linear, [O, I]) -> `kernel` [I, O],
except the class table's, which is `embedding` as is; 1-D `weight` (a GroupNorm / LayerNorm)
-> `scale`; `bias` as is.

The release's table has 1,001 rows; a UNet with num_classes=1000 has the same (row 1000 is the
null class, which the release never trained: guided samples of a converted checkpoint
reproduce the release's, untrained context and all).
"""
from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

UNET_PREFIX = "model.diffusion_model."
COND_PREFIX = "cond_stage_model."
EMA_PREFIX = "model_ema."


def flax_path(key: str) -> tuple:
    """A torch key without its prefix (`input_blocks.1.0.in_layers.0.weight`) -> the path of
    module names and the torch leaf name: (("input_blocks_1_0", "in_layers_0"), "weight")."""
    parts = key.split(".")
    names = []
    for part in parts[:-1]:
        if part.isdigit():
            if not names:
                raise ValueError(f"state-dict key {key!r} starts with an index.")
            names[-1] = f"{names[-1]}_{part}"
        else:
            names.append(part)
    return tuple(names), parts[-1]


def _leaf(path: tuple, name: str, value: np.ndarray, key: str):
    if name == "bias":
        return "bias", value
    if name != "weight":
        raise ValueError(f"state-dict key {key!r}: unexpected leaf {name!r}.")
    if path[-1] == "embedding" and path[0] == "cond_stage_model":
        return "embedding", value
    if value.ndim == 4:
        return "kernel", value.transpose(2, 3, 1, 0)
    if value.ndim == 2:
        return "kernel", value.T
    if value.ndim == 1:
        return "scale", value
    raise ValueError(f"state-dict key {key!r}: a {value.ndim}-D weight.")


def ema_key(key: str) -> str:
    """LitEma's buffer name of `model.diffusion_model.<...>`: `model_ema.` + the key after
    `model.`, dots removed."""
    return EMA_PREFIX + key[len("model."):].replace(".", "")


def torch_to_params(state_dict: Mapping, *, ema: bool = False,
                    template: Optional[Mapping] = None) -> dict:
    """A LatentDiffusion state dict (name -> array or CPU tensor) -> the UNet's parameter tree
    (nested dicts of float32 numpy arrays). ema: read the UNet's weights from LitEma's copies
    (the class table has none: it comes from the trained weights either way). template: a
    parameter tree (arrays or ShapeDtypeStructs, e.g. unet.param_shapes(model)) the result
    must match in names and shapes."""
    params: dict = {}
    keys = [k for k in state_dict if k.startswith(UNET_PREFIX) or k.startswith(COND_PREFIX)]
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise ValueError(f"No {UNET_PREFIX}* keys: not a latent-diffusion checkpoint's state "
                         f"dict (keys start {sorted(state_dict)[:3]}).")
    for key in keys:
        source = key
        if key.startswith(UNET_PREFIX):
            path, name = flax_path(key[len(UNET_PREFIX):])
            if ema:
                source = ema_key(key)
                if source not in state_dict:
                    raise KeyError(f"ema=True but {source!r} (the EMA of {key!r}) is missing.")
        else:
            path, name = flax_path(key)
        value = np.asarray(state_dict[source], dtype=np.float32)
        leaf, value = _leaf(path, name, value, key)
        node = params
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = np.ascontiguousarray(value)
    if template is not None:
        check_against(params, template)
    return params


def _flatten(tree, prefix=()):
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _flatten(v, prefix + (k,))
    else:
        yield "/".join(prefix), tuple(tree.shape)


def check_against(params, template) -> None:
    """Raises ValueError naming every missing, unexpected or mis-shaped parameter."""
    got, want = dict(_flatten(params)), dict(_flatten(template))
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    shapes = sorted(f"{k}: {got[k]} vs {want[k]}" for k in set(got) & set(want)
                    if got[k] != want[k])
    if missing or extra or shapes:
        raise ValueError("The checkpoint does not fit the UNet: "
                         + "; ".join(f"{label} {items[:5]}{' ...' if len(items) > 5 else ''}"
                                     for label, items in (("missing", missing),
                                                          ("unexpected", extra),
                                                          ("shapes differ", shapes))
                                     if items))

