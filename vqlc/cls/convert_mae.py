"""MAE's pretrained ViT encoder (facebookresearch/mae's mae_pretrain_vit_base.pth) -> parameters
of vqlc.cls.vit.ViT, without torch, strictly mapped, as MAE's main_finetune.py initialises its
fine-tuning model.

Release format (MAE's README, "pre-trained checkpoints"; models_mae.py): `torch.save({"model":
state_dict})` of the pretraining encoder only, float32:
    cls_token [1, 1, D]                      pos_embed [1, 1 + 14*14, D]  (the fixed sin-cos
                                                                          table, stored)
    patch_embed.proj.{weight [D, 3, 16, 16], bias [D]}
    blocks.{i}.norm1.{weight, bias}          blocks.{i}.attn.qkv.{weight [3D, D], bias [3D]}
    blocks.{i}.attn.proj.{weight, bias}      blocks.{i}.norm2.{weight, bias}
    blocks.{i}.mlp.fc1.{weight [4D, D], bias} blocks.{i}.mlp.fc2.{weight [D, 4D], bias}
    norm.{weight, bias}                      the pretraining encoder's final LayerNorm
No head, no fc_norm. (A full pretraining checkpoint of main_pretrain.py also has the decoder:
mask_token, decoder_*; those are skipped and listed. A fine-tuned checkpoint,
mae_finetuned_vit_base.pth, has fc_norm.* and head.* instead of norm.*: used when they fit, as
main_finetune.py --eval --resume does; a head for another number of classes is skipped, listed,
and re-initialised, as --finetune does.)

What main_finetune.py does, and so this converter (`mae_to_params`):
  - pos_embed is resized to the model's grid by interpolate_pos_embed (class row kept, the
    14x14 grid bicubically resized, PyTorch's kernel: vqlc.cls.pos_embed);
  - load_state_dict(strict=False) with the missing keys exactly head.*, fc_norm.* (global_pool):
    those are freshly initialised: head weight trunc_normal std 2e-5, bias 0; fc_norm 1 / 0
    (ViT's init is exactly that);
  - the pretraining `norm.*` is not used with global_pool (MAE deletes the module) -> skipped,
    and listed in the report; with global_pool=False it is the model's `norm`.
For the token stems (projected / codebook / embed) MAE's patch_embed has no place: it is
skipped (listed) and the stem is freshly initialised.

Strict: a checkpoint key that maps nowhere, a model parameter with no source that is not one
of the fresh ones, or a shape that disagrees is an error naming them, with the checkpoint's and
the model's geometry. num_heads is not in the weights (ViT-B: 12, from the size name).
"""
from __future__ import annotations

import os
import re
from typing import Dict, Mapping, Optional, Tuple

import numpy as np

from vqlc import torch_files
from vqlc.cls import pos_embed as pe

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
                        r"\.(weight|bias)$")
_MODULES = {"norm1": ("norm1",), "norm2": ("norm2",), "attn.qkv": ("attn", "qkv"),
            "attn.proj": ("attn", "proj"), "mlp.fc1": ("mlp", "fc1"), "mlp.fc2": ("mlp", "fc2")}
_DECODER = re.compile(r"^(decoder_|mask_token$)")
Mapped = Tuple[Tuple[str, ...], Optional[str]]


# ------------------------------------------------------------------------------------ reading

def read_mae_checkpoint(path: str) -> Dict[str, object]:
    """The state_dict of an MAE checkpoint (`{"model": ...}`, or a bare state_dict), its tensors
    torch_files.LazyTensor (read when converted)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Checkpoint not found: {path!r}. MAE's ViT-B encoder is mae_pretrain_vit_base.pth "
            "(https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth).")
    obj = torch_files.load_torch_object(path, lazy=True)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    state_dict = torch_files.flatten_arrays(obj)
    if state_dict and all(k.startswith("module.") for k in state_dict):  # DDP-wrapped
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    if "cls_token" not in state_dict or not any(_BLOCK_KEY.match(k) for k in state_dict):
        top = sorted(map(str, obj))[:12] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path}: not an MAE / timm ViT checkpoint: no cls_token and blocks.* "
                         f"(found {top}; MAE saves {{'model': encoder state_dict}}).")
    return state_dict


def _load(value) -> np.ndarray:
    return value.load() if isinstance(value, torch_files.LazyTensor) else np.asarray(value)


# ------------------------------------------------------------------------------------ geometry

def checkpoint_geometry(state_dict: Mapping[str, object]) -> dict:
    """What the checkpoint's shapes say (absent entries left out)."""
    g = {"depth": len({int(m.group(1)) for k in state_dict for m in [_BLOCK_KEY.match(k)] if m})}
    cls = state_dict.get("cls_token")
    if cls is not None:
        g["width"] = cls.shape[-1]
    proj = state_dict.get("patch_embed.proj.weight")
    if proj is not None and len(proj.shape) == 4:
        g.update(patch_size=proj.shape[2], in_channels=proj.shape[1])
    pos = state_dict.get("pos_embed")
    if pos is not None:
        try:
            g["grid_size"] = pe.grid_side(pos.shape[-2])
        except ValueError:
            g["pos_embed_rows"] = pos.shape[-2]
    fc1 = state_dict.get("blocks.0.mlp.fc1.weight")
    if fc1 is not None:
        g["mlp_hidden"] = fc1.shape[0]
    head = state_dict.get("head.weight")
    if head is not None:
        g["num_classes"] = head.shape[0]
    return g


def _describe(state_dict, model) -> str:
    g = checkpoint_geometry(state_dict)
    have = ", ".join(f"{k} {v}" for k, v in g.items())
    return (f"The checkpoint has {have}. The model asks for depth {model.depth}, width "
            f"{model.width}, MLP {int(model.width * model.mlp_ratio)}, patch_size "
            f"{model.patch_size}, stem {model.stem!r}, grid_size {model.grid_size}, "
            f"{model.num_classes} classes.")


# ------------------------------------------------------------------------------------ mapping

def classify_key(key: str, model) -> Tuple[Optional[Mapped], Optional[str]]:
    """A checkpoint key -> ((vqlc path, layout), None) when it is converted, or (None, reason)
    when it is skipped on purpose; raises KeyError for a key with no place."""
    if key in ("cls_token", "pos_embed"):
        return ((key,), None), None
    if key.startswith("patch_embed."):
        if model.stem != "pixels":
            return None, f"stem={model.stem!r} replaces MAE's patch embedding"
        leaf = key[len("patch_embed."):]
        if leaf == "proj.weight":
            return (("patch_embed", "proj", "kernel"), "conv"), None
        if leaf == "proj.bias":
            return (("patch_embed", "proj", "bias"), None), None
        raise KeyError(key)
    match = _BLOCK_KEY.match(key)
    if match:
        index, module, leaf = match.groups()
        is_norm = module.startswith("norm")
        name = ("scale" if is_norm else "kernel") if leaf == "weight" else "bias"
        layout = "linear" if leaf == "weight" and not is_norm else None
        return ((f"blocks_{index}", *_MODULES[module], name), layout), None
    if key in ("norm.weight", "norm.bias"):
        if model.global_pool:
            return None, ("the pretraining encoder's final norm: global_pool uses fc_norm "
                          "instead (MAE deletes it)")
        return (("norm", "scale" if key.endswith("weight") else "bias"), None), None
    if key in ("fc_norm.weight", "fc_norm.bias"):
        if not model.global_pool:
            return None, "fc_norm belongs to global_pool=True; the model pools the class token"
        return (("fc_norm", "scale" if key.endswith("weight") else "bias"), None), None
    if key in ("head.weight", "head.bias"):
        return (("head", "kernel" if key.endswith("weight") else "bias"),
                "linear" if key.endswith("weight") else None), None
    if _DECODER.match(key):
        return None, "MAE's pretraining decoder"
    raise KeyError(key)


# Model parameters MAE's checkpoint need not hold: freshly initialised (MAE's fine-tune init).
def _may_be_fresh(path: Tuple[str, ...], model) -> bool:
    return path[0] in ("head", "fc_norm", "stem")


def mae_to_params(state_dict: Mapping[str, object], model, seed: int = 0):
    """MAE state_dict -> (params: nested dict of float32 numpy arrays for `model`, report).

    report: {"loaded": [checkpoint keys converted], "fresh": [vqlc paths initialised as MAE's
    fine-tuning does], "skipped": {checkpoint key: why}, "pos_embed": "14x14 -> 16x16" or
    "kept 16x16"}. Raises ValueError naming missing / unexpected / misshaped keys."""
    import jax
    from flax import traverse_util

    from vqlc.cls import vit
    # Shapes first (tracing only): every check passes before any parameter is initialised.
    fresh = {p: s for p, s in traverse_util.flatten_dict(vit.param_shapes(model)).items()}
    mapped, skipped, unexpected, misshaped = {}, {}, [], []
    for key, value in state_dict.items():
        try:
            target, reason = classify_key(key, model)
        except KeyError:
            unexpected.append(key)
            continue
        if target is None:
            skipped[key] = reason
            continue
        path, layout = target
        if path not in fresh:
            unexpected.append(key)
            continue
        shape = torch_files.flax_shape(tuple(value.shape), layout)
        want = fresh[path].shape
        if key == "pos_embed":  # any square grid: interpolated to the model's
            ok = len(shape) == 3 and shape[0] == 1 and shape[2] == want[2]
            try:
                pe.grid_side(shape[1] if len(shape) == 3 else 0)
            except ValueError:
                ok = False
        else:
            ok = shape == want
        if not ok and key.startswith("head."):  # another label set: MAE drops it
            skipped[key] = (f"the checkpoint's head {tuple(value.shape)} does not fit "
                            f"{model.num_classes} classes: re-initialised (main_finetune.py "
                            "removes it)")
            continue
        if not ok:
            misshaped.append(f"{key} {tuple(value.shape)} (vqlc {'/'.join(path)} wants {want})")
        mapped[path] = (key, layout)
    if any(k.startswith("head.") for k in skipped):  # the head is taken whole or not at all
        for key in ("head.weight", "head.bias"):
            if key in state_dict and key not in skipped:
                skipped[key] = "the rest of the checkpoint's head does not fit: re-initialised"
        mapped = {p: v for p, v in mapped.items() if p[0] != "head"}
    missing = ["/".join(p) for p in fresh if p not in mapped and not _may_be_fresh(p, model)]
    if missing or unexpected or misshaped:
        raise ValueError("The MAE checkpoint does not fit the ViT: "
                         + torch_files.key_mismatch(missing, unexpected, misshaped)
                         + "\n" + _describe(state_dict, model))

    fresh_tree = jax.device_get(vit.init_params(model, jax.random.key(seed)))
    params = {p: np.asarray(v) for p, v in traverse_util.flatten_dict(fresh_tree).items()
              if p not in mapped}
    del fresh_tree
    report = {"loaded": [], "fresh": [], "skipped": skipped}
    for path, (key, layout) in mapped.items():
        array = _load(state_dict[key])
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"{key} has dtype {array.dtype}; MAE's weights are floats.")
        if key == "pos_embed":
            side = pe.grid_side(array.shape[1])
            array = pe.interpolate_pos_embed(array, model.grid_size)
            report["pos_embed"] = (f"{side}x{side} -> {model.grid_size}x{model.grid_size}"
                                   if side != model.grid_size else f"kept {side}x{side}")
        params[path] = np.ascontiguousarray(torch_files.to_flax_layout(array, layout),
                                            dtype=np.float32)
        report["loaded"].append(key)
    report["fresh"] = ["/".join(p) for p in fresh if p not in mapped]
    return traverse_util.unflatten_dict(params), report


def convert_mae_file(path: str, model, seed: int = 0):
    """read_mae_checkpoint + mae_to_params: (params, report) for `model`."""
    return mae_to_params(read_mae_checkpoint(path), model, seed=seed)
