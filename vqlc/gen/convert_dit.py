"""Convert the authors' released DiT-LC and SiT-LC checkpoints into a vqlc `diffusion` workdir,
without torch.

    python -m vqlc.convert --config=dit_lc_imagenet --src=dit-lc-100K-f16.pth \\
        --dst=runs/dit_lc --tokenizer=runs/lc
    python -m vqlc.convert --config=sit_lc_imagenet --src=sit-lc-100K-f16.pth \\
        --dst=runs/sit_lc --tokenizer=runs/lc [--weights=model]

then `DiffusionGenerator.load` / the `sample` task (--config.generator.kind=diffusion
--config.generator.workdir=<dst> --config.tokenizer.workdir=<the --tokenizer workdir>).
--tokenizer is required: the checkpoint holds no tokenizer (convert the release's
vqgan-lc-100K-f16-dim8.pth first: python -m vqlc.convert --config=imagenet_lc ...).

Release format (zh460045050/VQGAN-LC, dit-lc/train.py and sit-lc/train.py, read from the
repository): `torch.save({"model": DiT.state_dict(), "ema": EMA copy's state_dict(), "opt":
AdamW.state_dict(), "args": argparse.Namespace})`, keys of DiT's models.py (facebookresearch/DiT;
SiT's models.py has the same modules). The `args` Namespace makes the file unloadable with torch's
weights_only; vqlc.torch_files reads it as an inert Opaque (its fields are recorded in
generator.json). The release samples with `ema` (download.find_model), so `ema` is converted
by default, `--weights=model` converts the raw weights instead; `opt` is never read (the
tensors are read lazily, one entry only). A bare state_dict (DiT's own released files) is
accepted too. Keys, all float32:
    x_embedder.proj.{weight [D, C, p, p], bias}     the patch conv
    pos_embed [1, T, D]                             frozen 2-D sin-cos buffer: checked, not kept
    t_embedder.mlp.{0,2}.{weight, bias}             y_embedder.embedding_table.weight [K+1, D]
    blocks.{i}.attn.{qkv,proj}.{weight, bias}       blocks.{i}.mlp.{fc1,fc2}.{weight, bias}
    blocks.{i}.adaLN_modulation.1.{weight, bias}
    final_layer.linear.{weight [p*p*C_out, D], bias}, final_layer.adaLN_modulation.1.*
C_out is 2C for both releases (learn_sigma, DiT's default): SiT-LC's model keeps DiT's learned-
sigma head and its forward returns the first C channels (the velocity), as our flow objective
reads `out[..., :C]`; SiT's t is in [0, 1] with t = 1 the data (transport/path.py ICPlan,
vqlc.gen.objectives.flow's convention), DiT's t is the DDPM step 0..999.

The workdir written (vqlc.gen.release_workdir, shared with vqlc.gen.convert_ldm) is the one
the diffusion task writes: config.json (tokenizer.workdir set to --tokenizer), generator.json
(diffusion_train.generator_record: latent_shape from the tokenizer, latent_stats mean 0 /
std 1 since the release trains on raw latents, plus a `release` entry: source file, weights
converted, the args Namespace's plain fields) and checkpoints/<step>/
(orbax) holding a TrainState (vqlc.gen.trainer) whose `params` and `ema_params` both hold the
converted weights (as trainer.fresh_state starts a run), so the sampler reads them with either
`use_ema`; the optimiser state is fresh, step = config.train.num_steps.

Checked against the checkpoint's shapes: depth, width, patch, in_channels, input_size (from
pos_embed), num_classes (the table has the null row), learn_sigma. Not in the weights:
num_heads, which config.network.size sets; when the args name the model ("DiT-XL/2") that name
must be the config's size. SiT's args (path_type, prediction) must match the objective, and the
args' num_classes network.num_classes.

Memory: the tensors of the chosen entry are read one at a time and moved leaf by leaf, so a
full-size DiT-XL/2 (675M parameters, 2.7 GB per weight set) converts in about 12 GB of peak
RSS (its weights once, AdamW's two fresh moments, orbax's write buffers) and 1.5 minutes on
2 CPU cores from a 10.8 GB release-layout file (benchmarks/convert_dit.py).
"""
from __future__ import annotations

import logging
import math
import os
import re
from typing import Dict, Mapping, Optional, Tuple

import numpy as np

from vqlc import convert, rundir, torch_files
from vqlc.gen import release_workdir

WEIGHTS = ("ema", "model")
ENTRIES = ("model", "ema", "opt", "args")  # what the release's train.py saves
POS_EMBED = "pos_embed"
POS_EMBED_ATOL = 1e-5  # float32 storage of the float64 table
# The release's (and SiT's) transport args -> our objective settings.
_PATH_TYPES = {"Linear": "linear", "GVP": "gvp"}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")
_MODULES = {"attn.qkv": ("attn", "qkv"), "attn.proj": ("attn", "proj"),
            "mlp.fc1": ("mlp", "fc1"), "mlp.fc2": ("mlp", "fc2"),
            "adaLN_modulation.1": ("adaLN_modulation_1",)}
_FIXED = {  # non-block keys -> (vqlc path, how to lay the array out)
    "x_embedder.proj.weight": (("x_embedder", "proj", "kernel"), "conv"),
    "x_embedder.proj.bias": (("x_embedder", "proj", "bias"), None),
    "t_embedder.mlp.0.weight": (("t_embedder", "mlp_0", "kernel"), "linear"),
    "t_embedder.mlp.0.bias": (("t_embedder", "mlp_0", "bias"), None),
    "t_embedder.mlp.2.weight": (("t_embedder", "mlp_2", "kernel"), "linear"),
    "t_embedder.mlp.2.bias": (("t_embedder", "mlp_2", "bias"), None),
    "y_embedder.embedding_table.weight": (("y_embedder", "embedding_table", "embedding"), None),
    "final_layer.linear.weight": (("final_layer", "linear", "kernel"), "linear"),
    "final_layer.linear.bias": (("final_layer", "linear", "bias"), None),
    "final_layer.adaLN_modulation.1.weight": (("final_layer", "adaLN_modulation_1", "kernel"),
                                              "linear"),
    "final_layer.adaLN_modulation.1.bias": (("final_layer", "adaLN_modulation_1", "bias"), None),
}
Mapped = Tuple[Tuple[str, ...], Optional[str]]


# ------------------------------------------------------------------------------------ reading

def read_dit_release(path: str, weights: str = "ema") -> Tuple[Dict[str, object], dict]:
    """(state_dict of `weights`, the args Namespace's fields or {}): the tensors are
    torch_files.LazyTensor, read when converted. A bare state_dict is taken as it is."""
    if weights not in WEIGHTS:
        raise ValueError(f"--weights={weights!r}; valid: {', '.join(WEIGHTS)} (the release "
                         "samples with ema).")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Checkpoint not found: {path!r}. The release's files are dit-lc-100K-f16.pth and "
            "sit-lc-100K-f16.pth (the VQGAN-LC README links them), or a train.py checkpoint "
            "(checkpoints/<step>.pt, last.pt).")
    obj = torch_files.load_torch_object(path, lazy=True)
    args = _namespace_fields(obj.get("args")) if isinstance(obj, dict) else {}
    if isinstance(obj, dict) and any(isinstance(obj.get(k), dict) for k in WEIGHTS):
        sets = {k: _strip_ddp(torch_files.flatten_arrays(obj[k])) for k in WEIGHTS
                if isinstance(obj.get(k), dict)}
        if not any(_is_dit(sd) for sd in sets.values()):
            raise _not_dit(path, obj)
        if weights not in sets:
            raise ValueError(f"{path}: no {weights!r} weights in the checkpoint (entries: "
                             f"{sorted(map(str, obj))}); choose --weights from those present.")
        state_dict = sets[weights]
    else:
        state_dict = _strip_ddp(torch_files.flatten_arrays(obj))
        if _is_dit(state_dict):
            logging.info("%s is a bare state_dict: converting it as it is (--weights=%s "
                         "does not apply).", path, weights)
    if not _is_dit(state_dict):
        raise _not_dit(path, obj)
    return state_dict, args


def _strip_ddp(state_dict: Dict[str, object]) -> Dict[str, object]:
    if state_dict and all(k.startswith("module.") for k in state_dict):  # DDP-wrapped
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def _is_dit(state_dict: Mapping[str, object]) -> bool:
    return "x_embedder.proj.weight" in state_dict


def _not_dit(path: str, obj) -> ValueError:
    top = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
    return ValueError(f"{path}: not a DiT/SiT checkpoint: no x_embedder.proj.weight (top "
                      f"level: {top}; the release saves {{{', '.join(ENTRIES)}}} with DiT's "
                      "models.py keys).")


def _namespace_fields(args) -> dict:
    """The plain (JSON-able) fields of the pickled argparse.Namespace, read as an Opaque."""
    state = getattr(args, "state", None)
    if isinstance(args, dict):
        state = args
    if not isinstance(state, dict):
        return {}
    plain = (str, int, float, bool, type(None))
    return {str(k): v for k, v in state.items()
            if isinstance(v, plain) or (isinstance(v, (list, tuple))
                                        and all(isinstance(x, plain) for x in v))}


# ------------------------------------------------------------------------------------ mapping

def flax_path(key: str) -> Optional[Mapped]:
    """A DiT state_dict key -> (vqlc path, layout: 'linear' transposes, 'conv' goes
    [D, C, p, p] -> [p, p, C, D]); None for pos_embed (checked separately); raises KeyError
    for a key DiT does not have."""
    if key == POS_EMBED:
        return None
    if key in _FIXED:
        return _FIXED[key]
    match = _BLOCK_KEY.match(key)
    if match and match.group(2) in _MODULES:
        index, module, leaf = match.groups()
        path = (f"blocks_{index}", *_MODULES[module], "kernel" if leaf == "weight" else "bias")
        return path, "linear" if leaf == "weight" else None
    raise KeyError(key)


def checkpoint_geometry(state_dict: Mapping[str, object]) -> dict:
    """What the checkpoint's own shapes say (None where a key is absent)."""
    g = {"depth": len({int(m.group(1)) for k in state_dict for m in [_BLOCK_KEY.match(k)] if m})}
    proj = state_dict.get("x_embedder.proj.weight")
    if proj is not None and len(proj.shape) == 4:
        g.update(hidden_size=proj.shape[0], in_channels=proj.shape[1], patch_size=proj.shape[2])
    table = state_dict.get("y_embedder.embedding_table.weight")
    if table is not None:
        g["table_rows"] = table.shape[0]
    pos = state_dict.get(POS_EMBED)
    if pos is not None and "patch_size" in g:
        side = math.isqrt(pos.shape[-2])
        g["input_size"] = side * g["patch_size"] if side * side == pos.shape[-2] else None
    out = state_dict.get("final_layer.linear.weight")
    if out is not None and "patch_size" in g:
        g["out_channels"] = out.shape[0] // g["patch_size"] ** 2
    return g


def _describe(g: dict) -> str:
    facts = [f"{g['depth']} blocks"]
    for name in ("hidden_size", "patch_size", "in_channels", "input_size", "out_channels"):
        if g.get(name) is not None:
            facts.append(f"{name} {g[name]}")
    if g.get("table_rows") is not None:
        facts.append(f"label table {g['table_rows']} rows (num_classes + null)")
    return "The checkpoint has " + ", ".join(facts) + "."


def _wants(model) -> str:
    return (f"The config and tokenizer ask for depth {model.depth}, hidden_size "
            f"{model.hidden_size}, patch_size {model.patch_size} (network.size), in_channels "
            f"{model.in_channels} and input_size {model.input_size} (the tokenizer's latents), "
            f"{model.num_classes} classes + null (network.num_classes), out_channels "
            f"{model.out_channels} (network.learn_sigma={model.learn_sigma}).")


def check_pos_embed(state_dict: Mapping[str, object], model) -> None:
    """DiT's frozen pos_embed buffer must be our sin-cos constant (it is not a parameter
    here): a checkpoint with a trained or different table cannot be represented."""
    from vqlc.gen.networks import dit
    value = state_dict.get(POS_EMBED)
    if value is None:
        raise ValueError(f"The checkpoint has no {POS_EMBED!r} (DiT's frozen sin-cos buffer); "
                         "is it a DiT/SiT state_dict?")
    array = np.asarray(_load(value), np.float32)
    want = dit.sincos_pos_embed_2d(model.hidden_size, model.grid_size)[None]
    if array.shape != want.shape:
        raise ValueError(f"{POS_EMBED} {tuple(array.shape)} but the model's token grid gives "
                         f"{want.shape} ({model.grid_size}x{model.grid_size} tokens of width "
                         f"{model.hidden_size}). {_wants(model)}")
    diff = float(np.max(np.abs(array - want)))
    if not diff <= POS_EMBED_ATOL:
        raise ValueError(f"{POS_EMBED} differs from DiT's 2-D sin-cos table by up to {diff:.3g} "
                         f"(tolerance {POS_EMBED_ATOL}): vqlc's DiT computes that table and has "
                         "no learned position embedding, so this checkpoint cannot be converted.")


def _load(value) -> np.ndarray:
    return value.load() if isinstance(value, torch_files.LazyTensor) else np.asarray(value)


def release_to_params(state_dict: Mapping[str, object], model) -> dict:
    """DiT state_dict -> vqlc DiT params (float32 numpy), strictly checked against `model`'s
    parameter shapes; pos_embed checked against the sin-cos table. Tensors are read one at a
    time (LazyTensor or numpy)."""
    import jax
    from flax import traverse_util

    from vqlc.gen.networks import dit
    expected = traverse_util.flatten_dict(jax.tree.map(lambda s: s.shape,
                                                       dit.param_shapes(model)))
    mapped, unexpected, misshaped = {}, [], []
    for key, value in state_dict.items():
        try:
            target = flax_path(key)
        except KeyError:
            unexpected.append(key)
            continue
        if target is None:
            continue
        path, layout = target
        if path not in expected:
            unexpected.append(key)
            continue
        shape = tuple(value.shape)
        shape = (shape[::-1] if layout == "linear" else
                 tuple(shape[i] for i in (2, 3, 1, 0)) if layout == "conv" and len(shape) == 4
                 else shape)
        if shape != expected[path]:
            misshaped.append(f"{key} {tuple(value.shape)} (vqlc {'/'.join(path)} wants "
                             f"{expected[path]})")
        mapped[path] = (key, layout)
    missing = ["/".join(p) for p in expected if p not in mapped]
    if unexpected or missing or misshaped:
        raise ValueError("The DiT checkpoint does not match the config: "
                         + torch_files.key_mismatch(missing, unexpected, misshaped)
                         + "\n" + _describe(checkpoint_geometry(state_dict)) + " "
                         + _wants(model))
    check_pos_embed(state_dict, model)
    params = {}
    for path, (key, layout) in mapped.items():
        array = _load(state_dict[key])
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"{key} has dtype {array.dtype}; DiT's weights are floats.")
        params[path] = np.ascontiguousarray(torch_files.to_flax_layout(array, layout),
                                            dtype=np.float32)
        del array
    return traverse_util.unflatten_dict(params)


# ------------------------------------------------------------------------------- the config

def check_dit_config(config, args: Mapping[str, object]) -> None:
    """The config must describe the release's model: DiT with DDPM, SiT with the flow objective
    (and the interpolant / prediction its args name), raw latents; and the args' model name
    (num_heads is not in the weights) must be the config's size."""
    n, o = config.network, config.objective
    if n.kind not in ("dit", "sit"):
        raise ValueError(f"network.kind={n.kind!r}: vqlc.gen.convert_dit converts DiT/SiT "
                         "checkpoints (network.kind dit or sit).")
    want = "ddpm" if n.kind == "dit" else "flow"
    if o.kind != want:
        raise ValueError(f"network.kind={n.kind!r} converts with objective.kind={want!r} (the "
                         f"release's {n.kind.upper()}), not {o.kind!r}.")
    if o.latent_norm != "none":
        raise ValueError("The release trains on raw latents: set "
                         "--config.objective.latent_norm=none.")
    name = args.get("model")
    if isinstance(name, str) and "-" in name:
        family, size = name.split("-", 1)
        if size != n.size:
            raise ValueError(f"The checkpoint's args name the model {name!r} but the config has "
                             f"network.size={n.size!r}: set --config.network.size={size}.")
        if family.lower() != n.kind:
            logging.warning("The checkpoint's args name a %s model; converting it as "
                            "network.kind=%s.", family, n.kind)
    if n.kind == "sit":
        path_type, prediction = args.get("path_type"), args.get("prediction")
        if path_type is not None and _PATH_TYPES.get(path_type) != o.interpolant:
            raise ValueError(f"The checkpoint was trained with SiT's path_type={path_type!r}; "
                             f"the config has objective.interpolant={o.interpolant!r} "
                             f"(supported: {_PATH_TYPES}).")
        if prediction is not None and prediction != o.prediction:
            raise ValueError(f"The checkpoint predicts {prediction!r}; set "
                             f"--config.objective.prediction={prediction}.")
    num_classes = args.get("num_classes")
    if isinstance(num_classes, int) and num_classes != n.num_classes:
        raise ValueError(f"The checkpoint's args say num_classes={num_classes}; set "
                         f"--config.network.num_classes={num_classes}.")


# ---------------------------------------------------------------------------------- the workdir
# (written by vqlc.gen.release_workdir, shared with convert_ldm)

def convert_dit(config, src: str, dst: str, *, tokenizer: Optional[str],
                weights: str = "ema") -> int:
    """Writes the diffusion workdir `dst` from the release's DiT-LC / SiT-LC checkpoint `src`
    over the latents of the tokenizer workdir `tokenizer`; returns the step saved."""
    import copy

    from flax import traverse_util

    from vqlc.gen import diffusion_train
    from vqlc.tokenizer import Tokenizer
    if not tokenizer:
        raise ValueError("--tokenizer=<tokenizer workdir> is required: the DiT/SiT checkpoint "
                         "holds no tokenizer (convert vqgan-lc-100K-f16-dim8.pth first with "
                         "python -m vqlc.convert --config=imagenet_lc ...).")
    config = copy.deepcopy(config)
    dst = os.path.abspath(dst)
    convert.refuse_existing_checkpoints(dst)
    state_dict, args = read_dit_release(src, weights)
    with config.unlocked():
        config.tokenizer.workdir = rundir.absolute(tokenizer)
    check_dit_config(config, args)
    diffusion_train.check_config(config)
    tok = Tokenizer.load(tokenizer)
    side = tok.image_size // tok.downsample_factor
    latent_shape = (side, side, tok.latent_dim)
    model = diffusion_train.make_model(config.network, config.model, latent_shape)
    # every check passes before dst is written; the only reference to the arrays: flat
    flat = traverse_util.flatten_dict(release_to_params(state_dict, model))
    del state_dict

    release = {"source": os.path.abspath(src), "weights": weights, "args": args}
    step = release_workdir.write_diffusion_workdir(config, dst, tok, latent_shape, model, flat,
                                                   release)
    logging.info("Converted %s (%s weights) -> %s (step %d, tokenizer %s).", src, weights, dst,
                 step, tokenizer)
    return step
