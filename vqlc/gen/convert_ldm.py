"""Convert the authors' released LDM-LC checkpoints (latent-diffusion's LatentDiffusion, saved
by PyTorch Lightning) into a vqlc `diffusion` workdir, without torch.

    python -m vqlc.convert --config=ldm_lc_imagenet --src=<ldm-lc f16 .ckpt> --dst=runs/ldm_lc
    python -m vqlc.convert --config=ldm_lc_imagenet:f8 --src=<ldm-lc f8 .ckpt> \\
        --dst=runs/ldm_lc_f8                  # the tokenizer config defaults to imagenet_lc:f8
    # over a tokenizer converted already (first_stage_model.* is then skipped):
    python -m vqlc.convert --config=ldm_lc_imagenet --src=<ckpt> --dst=<dir> --tokenizer=runs/lc
    # the raw weights instead of the EMA the release samples with:
    python -m vqlc.convert --config=ldm_lc_imagenet --src=<ckpt> --dst=<dir> --weights=model

then `vqlc.Generator.load(<dst>)` or the `sample` task (--config.generator.kind=diffusion
--config.generator.workdir=<dst> --config.tokenizer.workdir=<dst>/tokenizer or --tokenizer).

Release format (zh460045050/VQGAN-LC ldm-lc/, read from its code: ldm/models/diffusion/ddpm.py,
ldm/modules/ema.py, ldm/models/models_vq.py, configs/imagenet-f{16,8}-vqgan-lc-100K.yaml):
Lightning's {"epoch", "global_step", "state_dict", "optimizer_states", "lr_schedulers",
"callbacks", ...}; only `state_dict` is read, lazily (vqlc.torch_files: the optimizer states are
never materialised). Its keys:
  model.diffusion_model.*        the UNet (openaimodel's UNetModel; vqlc.gen.networks.unet)
  model_ema.<name without dots>  LitEma's copy of each `model.<name>` (model_ema.diffusion_model
                                 input_blocks00weight ...): converted by default (--weights=ema,
                                 what the release samples with); every copy must be there, with
                                 its weight's shape, and no other
  model_ema.decay, .num_updates  LitEma's own buffers: skipped
  cond_stage_model.embedding.weight
                                 ClassEmbedder's table [1001, 512]: not in the EMA (LitEma
                                 tracks `model` only), taken from here for both weight sets
  betas, alphas_cumprod, alphas_cumprod_prev, sqrt_alphas_cumprod,
  sqrt_one_minus_alphas_cumprod, log_one_minus_alphas_cumprod, sqrt_recip_alphas_cumprod,
  sqrt_recipm1_alphas_cumprod, posterior_variance, posterior_log_variance_clipped,
  posterior_mean_coef1, posterior_mean_coef2
                                 DDPM.register_schedule's buffers: checked against
                                 objective.schedule (linear_sqrt: 0.0015 .. 0.0195, 1,000 steps),
                                 within float32 rounding, then skipped (recorded in
                                 generator.json); scale_factor, a buffer only with scale_by_std,
                                 must be 1
  first_stage_model.*            the tokenizer: ldm-lc's VQModelInterface (models_vq.py), whose
                                 keys are the tokenizer release's (vqlc.convert.RELEASE_KEY_MAP:
                                 encoder, decoder, quant_conv, post_quant_conv, tok_embeddings,
                                 codebook_projection) without `discriminator.*` and
                                 `perceptual_loss.*` (that class builds neither). Converted by
                                 vqlc.convert's own mapping into <dst>/tokenizer with
                                 --tokenizer_config's geometry (the discriminator, absent,
                                 initialised as training starts one), and recorded as the
                                 generator's tokenizer; with --tokenizer it is skipped.
Any other key is an error. The UNet's geometry is checked against the checkpoint's shapes
before anything is written (missing, unexpected and mis-shaped keys named, with what the
checkpoint's shapes say and what the config asks for). Not in the weights: num_head_channels
(the config's network.size is trusted).

The workdir is vqlc.gen.release_workdir's (the one DiT/SiT conversions write too).

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

from vqlc import torch_files

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
    if value.ndim in (2, 4):
        return "kernel", torch_files.to_flax_layout(value, "linear" if value.ndim == 2 else "conv")
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



# ===================================================================== the release's checkpoint
# python -m vqlc.convert --config=ldm_lc_imagenet[:f8] --src=<ldm-lc .ckpt> --dst=<dir>
#     [--tokenizer=<tokenizer workdir>] [--weights=ema|model] [--tokenizer_config=...]

FIRST_STAGE_PREFIX = "first_stage_model."
EMA_BUFFERS = ("model_ema.decay", "model_ema.num_updates")  # LitEma's own: skipped
# DDPM.register_schedule's persistent buffers, checked against objective.schedule, not kept.
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2")
SCALE_FACTOR = "scale_factor"  # a buffer only with scale_by_std (not the release's): must be 1
SCHEDULE_RTOL = 1e-5  # float32 storage of float64 values
WEIGHTS = ("ema", "model")
TOKENIZER_SUBDIR = "tokenizer"
LIGHTNING_ENTRIES = ("epoch", "global_step", "state_dict", "optimizer_states", "lr_schedulers",
                     "callbacks")


def read_ldm_release(path: str) -> tuple:
    """(the Lightning checkpoint's state_dict with LazyTensor values, {epoch, global_step}).
    Only `state_dict` is walked; optimizer_states and the rest are never materialised."""
    import os

    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Checkpoint not found: {path!r}. The release's LDM-LC files are the Lightning "
            "checkpoints of ldm-lc/ (the VQGAN-LC README links them).")
    obj = torch_files.load_torch_object(path, lazy=True)
    entry = obj.get("state_dict") if isinstance(obj, dict) else None
    if not isinstance(entry, dict):
        top = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path}: not a latent-diffusion Lightning checkpoint: no `state_dict` "
                         f"entry (top level: {top}; Lightning saves "
                         f"{{{', '.join(LIGHTNING_ENTRIES)}, ...}}).")
    state_dict = torch_files.flatten_arrays(entry)
    if not any(k.startswith(UNET_PREFIX) for k in state_dict):
        raise ValueError(f"{path}: not an LDM checkpoint: its state_dict has no {UNET_PREFIX}* "
                         f"keys (its keys start with "
                         f"{sorted({k.split('.')[0] for k in state_dict})}).")
    meta = {k: obj[k] for k in ("epoch", "global_step") if isinstance(obj.get(k), int)}
    return state_dict, meta


def split_ldm_release(state_dict: Mapping) -> dict:
    """Groups the keys: unet (`model.diffusion_model.*`, as is), ema (`model_ema.*` but LitEma's
    decay / num_updates), cond (`cond_stage_model.*`), first_stage (`first_stage_model.*`, the
    prefix removed), schedule (the buffers and scale_factor); any other key is an error."""
    parts = {"unet": {}, "ema": {}, "cond": {}, "first_stage": {}, "schedule": {}}
    unknown = []
    for key, value in state_dict.items():
        if key.startswith(UNET_PREFIX):
            parts["unet"][key] = value
        elif key in EMA_BUFFERS:
            continue
        elif key.startswith(EMA_PREFIX):
            parts["ema"][key] = value
        elif key.startswith(COND_PREFIX):
            parts["cond"][key] = value
        elif key.startswith(FIRST_STAGE_PREFIX):
            parts["first_stage"][key[len(FIRST_STAGE_PREFIX):]] = value
        elif key in SCHEDULE_BUFFERS or key == SCALE_FACTOR:
            parts["schedule"][key] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"state_dict keys that are not part of LDM-LC's LatentDiffusion: {sorted(unknown)} "
            f"(known: {UNET_PREFIX}*, {EMA_PREFIX}*, {COND_PREFIX}*, {FIRST_STAGE_PREFIX}*, the "
            f"schedule buffers {', '.join(SCHEDULE_BUFFERS)}).")
    return parts


def _load(value) -> np.ndarray:
    """A torch_files.LazyTensor (read now) or an array."""
    load = getattr(value, "load", None)
    return load() if callable(load) else np.asarray(value)


# ------------------------------------------------------------------------------- the schedule

def ldm_schedule_buffers(betas: np.ndarray) -> dict:
    """DDPM.register_schedule's buffers (v_posterior 0, the release's) from float64 betas."""
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
    return {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": np.sqrt(ac), "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)}


def _differs(got: np.ndarray, want: np.ndarray) -> Optional[str]:
    if got.shape != want.shape:
        return f"shape {got.shape} vs {want.shape}"
    if not np.allclose(got, want, rtol=SCHEDULE_RTOL, atol=1e-8):
        return f"max |diff| {float(np.max(np.abs(got - want))):.3g}"
    return None


def check_schedule(schedule: Mapping, kind: str) -> list:
    """The checkpoint's schedule buffers must be those objective.schedule=`kind` gives (1,000
    steps); returns the names checked (and skipped: the schedule is vqlc's own)."""
    from vqlc.gen.objectives import diffusion
    missing = [name for name in SCHEDULE_BUFFERS if name not in schedule]
    if missing:
        raise ValueError(f"The checkpoint lacks the schedule buffers {missing} that "
                         "latent-diffusion's DDPM.register_schedule saves: is it an LDM "
                         "checkpoint?")
    got = {name: np.asarray(_load(schedule[name]), np.float64) for name in SCHEDULE_BUFFERS}
    want = ldm_schedule_buffers(diffusion.make_schedule(kind).betas)
    bad = {name: d for name in SCHEDULE_BUFFERS for d in [_differs(got[name], want[name])] if d}
    if bad:
        betas = got["betas"]
        facts = (f"the checkpoint's betas run {betas[0]:.6g} .. {betas[-1]:.6g} over "
                 f"{betas.size} steps" if betas.ndim == 1 and betas.size else "")
        hint = ""
        for other in diffusion.KINDS:
            if other != kind and not _differs(got["betas"],
                                              diffusion.make_schedule(other).betas):
                hint = f" They match objective.schedule={other!r}: set --config.objective." \
                       f"schedule={other}."
        raise ValueError(
            f"The checkpoint's diffusion schedule is not objective.schedule={kind!r} (betas "
            f"{want['betas'][0]:.6g} .. {want['betas'][-1]:.6g} over {want['betas'].size} "
            f"steps): {', '.join(f'{k} ({v})' for k, v in bad.items())}; {facts}.{hint or ' '}"
            + ("" if hint else "vqlc's schedules (vqlc.gen.objectives.diffusion.make_schedule) "
               "cannot represent it."))
    if SCALE_FACTOR in schedule:
        scale = float(np.asarray(_load(schedule[SCALE_FACTOR])).reshape(()))
        if scale != 1.0:
            raise ValueError(f"The checkpoint scales its latents by scale_factor={scale:.6g} "
                             "(scale_by_std); vqlc's LDM trains on raw latents "
                             "(objective.latent_norm none) and cannot convert it.")
    return sorted(schedule)


# ---------------------------------------------------------------------------------- the UNet

def _layout(path: tuple, name: str, shape: tuple, key: str) -> tuple:
    """(vqlc leaf name, layout) of a torch leaf, from its shape only."""
    if name == "bias":
        return "bias", None
    if name != "weight":
        raise ValueError(f"state-dict key {key!r}: unexpected leaf {name!r}.")
    if path[-1] == "embedding" and path[0] == "cond_stage_model":
        return "embedding", None
    return {4: ("kernel", "conv"), 2: ("kernel", "linear"), 1: ("scale", None)}.get(
        len(shape), ("weight", None))


def _laid_out(shape: tuple, layout: Optional[str]) -> tuple:
    if layout == "conv" and len(shape) == 4:
        return tuple(shape[i] for i in (2, 3, 1, 0))
    if layout == "linear":
        return tuple(shape[::-1])
    return tuple(shape)


def checkpoint_geometry(unet: Mapping, cond: Mapping) -> str:
    """What the checkpoint's own shapes say, for error messages."""
    facts = []
    conv_in = unet.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and len(conv_in.shape) == 4:
        facts += [f"model_channels {conv_in.shape[0]}", f"in_channels {conv_in.shape[1]}"]
    blocks = {k[len(UNET_PREFIX):].split(".")[1] for k in unet
              if k.startswith(UNET_PREFIX + "input_blocks.")}
    facts.append(f"{len(blocks)} input blocks")
    out = unet.get(UNET_PREFIX + "out.2.weight")
    if out is not None:
        facts.append(f"out_channels {out.shape[0]}")
    table = cond.get(COND_PREFIX + "embedding.weight")
    if table is not None:
        facts.append(f"class table {tuple(table.shape)} (num_classes + null rows, context_dim)")
    return "The checkpoint has " + ", ".join(facts) + "."


def _wants(model) -> str:
    return (f"The config and tokenizer ask for in_channels {model.in_channels} and input_size "
            f"{model.input_size} (the tokenizer's latents), model_channels "
            f"{model.model_channels}, channel_mult {tuple(model.channel_mult)}, num_res_blocks "
            f"{model.num_res_blocks}, attention_resolutions "
            f"{tuple(model.attention_resolutions)}, context_dim {model.context_dim} "
            f"(network.size), {model.num_classes} classes + null (network.num_classes).")


def release_to_params(parts: Mapping, model, *, ema: bool = True) -> dict:
    """The UNet's and class table's keys (split_ldm_release's parts) -> vqlc UNet params
    ({path tuple: float32 numpy}, flat), strictly checked against `model`'s parameter shapes
    before any tensor is read. ema: the UNet from LitEma's `model_ema.*` copies (each must be
    there, with its model key's shape, and no other); the class table from cond_stage_model
    either way (LitEma tracks `model` only)."""
    import jax
    from flax import traverse_util
    from vqlc.gen.networks import unet as unet_lib
    expected = traverse_util.flatten_dict(jax.tree.map(lambda s: tuple(s.shape),
                                                       unet_lib.param_shapes(model)))
    unet, cond, ema_part = parts["unet"], parts["cond"], parts["ema"]
    sources, unexpected, misshaped, no_ema = {}, [], [], []
    if ema and not ema_part:
        raise ValueError(f"--weights=ema but the checkpoint has no {EMA_PREFIX}* weights "
                         "(trained with use_ema False?): convert --weights=model.")
    used_ema = set()
    for key, value in list(unet.items()) + list(cond.items()):
        prefix = UNET_PREFIX if key.startswith(UNET_PREFIX) else ""
        path, name = flax_path(key[len(prefix):])
        leaf, layout = _layout(path, name, tuple(value.shape), key)
        target = path + (leaf,)
        source = key
        if ema and prefix:
            source = ema_key(key)
            if source not in ema_part:
                no_ema.append(source)
                continue
            if source in used_ema:  # LitEma's dot-free names of two keys coincide
                raise ValueError(f"{source} is LitEma's name of two UNet keys (one is {key}); "
                                 "the EMA cannot be told apart: convert --weights=model.")
            used_ema.add(source)
            if tuple(ema_part[source].shape) != tuple(value.shape):
                misshaped.append(f"{source} {tuple(ema_part[source].shape)} (the EMA of "
                                 f"{key} {tuple(value.shape)})")
                continue
        if target not in expected:
            unexpected.append(key)
            continue
        shape = _laid_out(tuple(value.shape), layout)
        if shape != expected[target]:
            misshaped.append(f"{key} {tuple(value.shape)} (vqlc {'/'.join(target)} wants "
                             f"{expected[target]})")
        sources[target] = (source, layout)
    if ema:
        unexpected += sorted(set(ema_part) - used_ema)
    missing = ["/".join(p) for p in expected if p not in sources]
    if unexpected or missing or misshaped or no_ema:
        raise ValueError("The LDM checkpoint does not match the config: "
                         + torch_files.key_mismatch(missing, unexpected, misshaped, no_ema)
                         + "\n" + checkpoint_geometry(unet, cond) + " " + _wants(model))
    params = {}
    for target, (source, layout) in sources.items():
        value = ema_part[source] if source in ema_part else (
            unet[source] if source in unet else cond[source])
        array = _load(value)
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"{source} has dtype {array.dtype}; the UNet's weights are floats.")
        array = torch_files.to_flax_layout(array, layout)
        params[target] = np.ascontiguousarray(array, dtype=np.float32)
        del array
    return params


# ------------------------------------------------------------------------------ the conversion

def check_ldm_config(config) -> None:
    n, o = config.network, config.objective
    if n.kind != "unet":
        raise ValueError(f"network.kind={n.kind!r}: vqlc.gen.convert_ldm converts LDM-LC's UNet "
                         "(network.kind unet, e.g. --config=ldm_lc_imagenet).")
    if o.kind != "ddpm":
        raise ValueError(f"LDM-LC is a DDPM (epsilon) model: objective.kind='ddpm', not "
                         f"{o.kind!r}.")
    if o.latent_norm != "none":
        raise ValueError("The release trains on raw latents (scale_factor 1): set "
                         "--config.objective.latent_norm=none.")


def convert_ldm(config, src: str, dst: str, *, tokenizer: Optional[str] = None,
                tokenizer_config=None, weights: str = "ema") -> int:
    """Writes the diffusion workdir `dst` from the release's LDM-LC Lightning checkpoint `src`;
    returns the step saved. tokenizer: an existing tokenizer workdir (the checkpoint's
    first_stage_model.* is then skipped); else first_stage_model.* is converted into
    <dst>/tokenizer with `tokenizer_config`'s geometry (a tokenizer config, e.g. imagenet_lc)."""
    import copy
    import logging
    import os

    from vqlc import convert, rundir
    from vqlc.gen import convert_gpt, diffusion_train, release_workdir
    from vqlc.tokenizer import Tokenizer
    if weights not in WEIGHTS:
        raise ValueError(f"--weights={weights!r}; valid: {', '.join(WEIGHTS)} (the release "
                         "samples with ema).")
    config = copy.deepcopy(config)
    check_ldm_config(config)
    dst = os.path.abspath(dst)
    convert.refuse_existing_checkpoints(dst)
    state_dict, meta = read_ldm_release(src)
    parts = split_ldm_release(state_dict)
    del state_dict
    skipped = check_schedule(parts["schedule"], config.objective.schedule)
    if tokenizer is None:
        if tokenizer_config is None:
            raise ValueError("Converting the checkpoint's first_stage_model.* needs its "
                             "tokenizer config (--tokenizer_config), or pass --tokenizer.")
        # Every check of the UNet that needs no tokenizer happens first (the latent shape comes
        # from the tokenizer config: image_size / 2^(levels - 1), quantizer.dim).
        levels = len(tokenizer_config.model.ch_mult)
        side = tokenizer_config.data.image_size // 2 ** (levels - 1)
        pre = diffusion_train.make_model(config.network, config.model,
                                         (side, side, tokenizer_config.quantizer.dim))
        release_to_params_shapes_only(parts, pre, ema=weights == "ema")
        first_stage = {k: _load(v) for k, v in parts["first_stage"].items()}  # the tokenizer's
        try:
            tokenizer = convert_gpt.write_tokenizer_workdir(
                tokenizer_config, first_stage, os.path.join(dst, TOKENIZER_SUBDIR),
                prefix=FIRST_STAGE_PREFIX, require_discriminator=False)
        except ValueError as e:
            raise ValueError(f"The checkpoint's {FIRST_STAGE_PREFIX}* (the tokenizer) does not "
                             f"convert with the tokenizer config given (--tokenizer_config): "
                             f"{e}") from None
        del first_stage
        tokenizer_source = FIRST_STAGE_PREFIX + "*"
    else:
        logging.info("--tokenizer=%s: skipping the checkpoint's %d %s* keys.", tokenizer,
                     len(parts["first_stage"]), FIRST_STAGE_PREFIX)
        tokenizer_source = rundir.absolute(tokenizer)
    first_stage_keys = len(parts["first_stage"])
    first_stage_shapes = {k: tuple(v.shape) for k, v in parts["first_stage"].items()}
    parts["first_stage"] = {}
    with config.unlocked():
        config.tokenizer.workdir = rundir.absolute(tokenizer)
    diffusion_train.check_config(config)
    tok = Tokenizer.load(tokenizer)
    side = tok.image_size // tok.downsample_factor
    latent_shape = (side, side, tok.latent_dim)
    quant_conv = first_stage_shapes.get("quant_conv.weight")
    if quant_conv and quant_conv[0] != tok.latent_dim:
        raise ValueError(f"--tokenizer={tokenizer} has {tok.latent_dim}-channel latents but the "
                         f"checkpoint's own tokenizer ({FIRST_STAGE_PREFIX}quant_conv.weight "
                         f"{quant_conv}) has embed_dim {quant_conv[0]}: the UNet models that "
                         "tokenizer's latents (f16: imagenet_lc, f8: imagenet_lc:f8).")
    model = diffusion_train.make_model(config.network, config.model, latent_shape)
    flat = release_to_params(parts, model, ema=weights == "ema")
    del parts
    release = {"source": os.path.abspath(src), "weights": weights, **meta,
               "tokenizer": tokenizer_source, "first_stage_keys": first_stage_keys,
               "skipped": skipped + list(EMA_BUFFERS)}
    step = release_workdir.write_diffusion_workdir(config, dst, tok, latent_shape, model, flat,
                                                   release)
    logging.info("Converted %s (%s weights) -> %s (step %d, tokenizer %s).", src, weights, dst,
                 step, tokenizer)
    return step


def release_to_params_shapes_only(parts: Mapping, model, *, ema: bool) -> None:
    """release_to_params' checks without reading a tensor (run before anything is written)."""
    shapes_only = {name: dict(part) for name, part in parts.items()}
    for name in ("unet", "cond", "ema"):
        shapes_only[name] = {k: _Shape(v.shape) for k, v in parts[name].items()}
    try:
        release_to_params(shapes_only, model, ema=ema)
    except _ShapesChecked:
        pass


class _ShapesChecked(Exception):
    pass


class _Shape:
    """A stand-in tensor: its shape is known, reading it ends the check."""

    def __init__(self, shape):
        self.shape = tuple(shape)

    def load(self):
        raise _ShapesChecked()
