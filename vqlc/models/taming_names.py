"""Convert taming-transformers PyTorch state_dicts (as numpy arrays) into Flax variables.

Key rule (see `vqlc.models.vqgan`): after a prefix of `prefix_map` is replaced by its Flax path,
the rest of the key is split at dots; its last part is the parameter, numeric parts are glued to the
part before them with "_", the last remaining part is the layer and the parts before it, joined with
"_", the block. `encoder.down.1.block.0.norm1.weight` -> params/encoder/down_1_block_0/norm1/scale;
`main.3.running_var` -> batch_stats/main_3/var.

Arrays: 4-D `weight` (conv, OIHW) -> `kernel` HWIO; 2-D `weight` (linear, [out, in]) -> `kernel`
[in, out]; 1-D `weight` (GroupNorm/BatchNorm) -> `scale`; `bias` -> `bias`; BatchNorm `running_mean` /
`running_var` -> batch_stats `mean` / `var`; `num_batches_tracked` has no Flax counterpart and is
skipped. Anything else is an error, never silently dropped.

Typical use, with the target built from shapes only:
    target = jax.eval_shape(model.init, rng, x)
    variables = torch_to_flax(state_dict, VQMODEL_PREFIX_MAP, target=target)
"""
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

# Whole keys map from the root: the state_dict of a bare taming Encoder, Decoder or discriminator.
IDENTITY_PREFIX_MAP: Mapping[str, Optional[str]] = {"": ""}

# A taming VQModel state_dict restricted to the autoencoder (no quantizer, no loss): the prefixes
# name the Flax submodules of `vqlc.models.vqgan.VQModel`.
VQMODEL_PREFIX_MAP: Mapping[str, Optional[str]] = {
    "encoder.": "encoder",
    "decoder.": "decoder",
    "quant_conv.": "quant_conv",
    "post_quant_conv.": "post_quant_conv",
}

# The discriminator inside a taming/VQGAN-LC training checkpoint (`loss.discriminator.main.N...`).
CHECKPOINT_DISCRIMINATOR_PREFIX_MAP: Mapping[str, Optional[str]] = {"loss.discriminator.": ""}

_NUMERIC = re.compile(r"^\d+$")


def _flax_module_path(parts) -> Tuple[str, ...]:
    """Module parts of a taming key -> Flax module path (block, layer), per the module rule."""
    glued = []
    for part in parts:
        if _NUMERIC.match(part):
            if not glued:
                raise ValueError(f"a key's module path cannot start with an index: {parts}")
            glued[-1] = f"{glued[-1]}_{part}"
        else:
            glued.append(part)
    if len(glued) <= 1:
        return tuple(glued)
    return ("_".join(glued[:-1]), glued[-1])


def _convert_array(name: str, value: np.ndarray) -> Tuple[str, str, np.ndarray]:
    """(collection, flax name, array) for one torch parameter or buffer, or raise."""
    value = np.asarray(value)
    if name == "weight":
        if value.ndim == 4:
            return "params", "kernel", np.transpose(value, (2, 3, 1, 0))
        if value.ndim == 2:
            return "params", "kernel", np.transpose(value, (1, 0))
        if value.ndim == 1:
            return "params", "scale", value
        raise ValueError(f"weight with {value.ndim} dims has no Flax counterpart")
    if name == "bias":
        return "params", "bias", value
    if name == "running_mean":
        return "batch_stats", "mean", value
    if name == "running_var":
        return "batch_stats", "var", value
    raise ValueError(f"unknown parameter name {name!r}")


def _flatten(tree: Mapping[str, Any], prefix: Tuple[str, ...] = ()) -> Dict[Tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _fmt(path: Tuple[str, ...]) -> str:
    return "/".join(path)


def torch_to_flax(state_dict: Mapping[str, np.ndarray],
                  prefix_map: Mapping[str, Optional[str]] = IDENTITY_PREFIX_MAP,
                  *,
                  target: Optional[Mapping[str, Any]] = None) -> Dict[str, Dict[str, Any]]:
    """Convert a taming state_dict into Flax variables {"params": ..., "batch_stats": ...}.

    Args:
      state_dict: torch key -> numpy array (e.g. `{k: v.numpy() for k, v in sd.items()}`).
      prefix_map: torch key prefix -> Flax path ("a/b", "" for the root), or None to skip keys with
        that prefix on purpose (e.g. `"loss.perceptual_loss.": None`). The longest matching prefix
        wins; a key that matches no prefix is an error.
      target: the expected variables (arrays or jax.ShapeDtypeStruct, e.g. from `jax.eval_shape` of
        the model's init). When given, every params/batch_stats leaf of the target must be produced
        with the same shape and nothing else may be: missing or unexpected paths and shape
        mismatches raise. Without it, missing keys cannot be detected.

    Returns:
      {"params": nested dict} plus {"batch_stats": nested dict} when the state_dict has BatchNorm
      buffers; arrays are numpy, in the state_dict's dtype.

    Raises:
      ValueError naming every offending key.
    """
    prefixes = sorted(prefix_map, key=len, reverse=True)
    flat: Dict[Tuple[str, ...], np.ndarray] = {}
    source: Dict[Tuple[str, ...], str] = {}
    problems = []
    for key, value in state_dict.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            problems.append(f"{key}: matches no prefix in prefix_map {sorted(prefix_map)}")
            continue
        dest = prefix_map[prefix]
        if dest is None:
            continue
        parts = key[len(prefix):].split(".")
        if parts[-1] == "num_batches_tracked":
            continue
        try:
            module = _flax_module_path(parts[:-1])
            collection, name, array = _convert_array(parts[-1], value)
        except ValueError as e:
            problems.append(f"{key}: {e}")
            continue
        base = tuple(p for p in dest.split("/") if p)
        path = (collection,) + base + module + (name,)
        if path in flat:
            problems.append(f"{key}: maps to {_fmt(path)}, already produced by {source[path]}")
            continue
        flat[path] = array
        source[path] = key
    if problems:
        raise ValueError("cannot convert these state_dict keys:\n  " + "\n  ".join(problems))

    if target is not None:
        want = {p: v for p, v in _flatten(target).items() if p[0] in ("params", "batch_stats")}
        missing = sorted(_fmt(p) for p in want if p not in flat)
        unexpected = sorted(f"{_fmt(p)} (from {source[p]})" for p in flat if p not in want)
        shapes = sorted(
            f"{_fmt(p)} (from {source[p]}): converted {tuple(flat[p].shape)}, expected "
            f"{tuple(want[p].shape)}" for p in flat if p in want and tuple(flat[p].shape) != tuple(want[p].shape))
        if missing or unexpected or shapes:
            lines = ([f"missing (no state_dict key gives them): {m}" for m in missing]
                     + [f"unexpected (not in the model): {u}" for u in unexpected]
                     + [f"shape mismatch: {s}" for s in shapes])
            raise ValueError("state_dict does not match the model:\n  " + "\n  ".join(lines))

    out: Dict[str, Dict[str, Any]] = {}
    for path, array in flat.items():
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = array
    out.setdefault("params", {})
    return out
