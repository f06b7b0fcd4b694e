"""Convert the authors' released GPT-LC checkpoint into a vqlc `gpt` workdir, without torch.

    python -m vqlc.convert --config=gpt_lc_imagenet --src=transformer_99.pt --dst=runs/gpt_lc
    # the tokenizer converted already (or another tokenizer config for the embedded one):
    python -m vqlc.convert --config=gpt_lc_imagenet --src=<pt> --dst=<dir> --tokenizer=runs/lc
    python -m vqlc.convert --config=gpt_lc_imagenet --src=<pt> --dst=<dir> \\
        --tokenizer_config=imagenet_lc:f8

then `GPTGenerator.load` / the `sample` task (--config.generator.workdir=<dst>
--config.tokenizer.workdir=<dst>/tokenizer).

Release format (zh460045050/VQGAN-LC, vqgan-gpt-lc): `transformer_{epoch}.pt` is the flat
state_dict of the whole Net2Net-style model: `transformer.*` (taming's minGPT, float16, with a
causal-mask buffer `attn.mask` per block, skipped) and the tokenizer under `vqgan.*` (the
tokenizer release's keys, vqlc.convert.RELEASE_KEY_MAP). DeepSpeed's
`mp_rank_00_model_states.pt` holds the same dict under "module".

The workdir written is the one the gpt task writes: config.json (tokenizer.workdir set to the
tokenizer used), generator.json (gpt_train.generator_record; no token dataset) and
checkpoints/<step>/ (orbax) holding a TrainState (vqlc.gen.trainer): the release's weights in float32, fresh
optimiser state, step = config.train.num_steps. The tokenizer is written from `vqgan.*` to
<dst>/tokenizer with --tokenizer_config's geometry, unless --tokenizer=<workdir> is given (then
`vqgan.*` may be absent and is ignored).

Not checkable from the weights: num_heads (the config's is trusted).
"""
from __future__ import annotations

import logging
import os
import re
from typing import Dict, Mapping, Optional, Tuple

import numpy as np

from vqlc import atomic_io, convert, rundir, torch_files

GPT_PREFIX = "transformer."
TOKENIZER_PREFIX = "vqgan."
DEEPSPEED_ENTRY = "module"
TOKENIZER_SUBDIR = "tokenizer"

# minGPT module names -> vqlc MinGPT module names (vqlc.gen.networks.gpt).
_MODULE_NAMES = {"mlp.0": "mlp/fc", "mlp.2": "mlp/proj"}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")
_NORMS = ("ln1", "ln2", "ln_f")
_BUFFER = re.compile(r"^blocks\.\d+\.attn\.mask$")  # the causal mask: recomputed, not loaded

# What a Flax path of vqlc's MinGPT is, by (torch key, transpose to [in, out]).
Mapped = Tuple[Tuple[str, ...], bool]


# ------------------------------------------------------------------------------------ reading

def read_gpt_release(path: str) -> Dict[str, np.ndarray]:
    """The checkpoint's flat state_dict (DeepSpeed's "module" entry when present)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Checkpoint not found: {path!r}. The release's GPT files are transformer_<epoch>.pt "
            "(or DeepSpeed's mp_rank_00_model_states.pt).")
    obj = torch_files.load_torch_object(path)
    if isinstance(obj, dict):
        for entry in (DEEPSPEED_ENTRY, "state_dict", "model"):
            if isinstance(obj.get(entry), dict):
                obj = obj[entry]
                break
    state_dict = torch_files.flatten_arrays(obj)
    if not any(k.startswith(GPT_PREFIX) for k in state_dict):
        raise ValueError(f"{path}: no {GPT_PREFIX}* keys; is it a GPT-LC checkpoint "
                         f"(keys start with {sorted({k.split('.')[0] for k in state_dict})})?")
    return state_dict


def split_gpt_release(state_dict: Mapping[str, np.ndarray]
                      ) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """(GPT keys, tokenizer keys), each without its prefix; any other key is an error."""
    gpt, tokenizer, unknown = {}, {}, []
    for key, value in state_dict.items():
        if key.startswith(GPT_PREFIX):
            gpt[key[len(GPT_PREFIX):]] = value
        elif key.startswith(TOKENIZER_PREFIX):
            tokenizer[key[len(TOKENIZER_PREFIX):]] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"Keys that are neither {GPT_PREFIX}* nor {TOKENIZER_PREFIX}*: "
                         f"{sorted(unknown)}")
    return gpt, tokenizer


# ------------------------------------------------------------------------------------ mapping

def flax_path(key: str) -> Optional[Mapped]:
    """A minGPT state_dict key (no prefix) -> (vqlc path, transpose?); None for skipped
    buffers; raises for a key minGPT does not have."""
    if _BUFFER.match(key):
        return None
    if key == "tok_emb.weight":
        return ("tok_emb", "embedding"), False
    if key == "pos_emb":
        return ("pos_emb",), False
    if key == "head.weight":
        return ("head", "kernel"), True
    if key in ("ln_f.weight", "ln_f.bias"):
        return ("ln_f", _leaf_name("ln_f", key.rsplit(".", 1)[1])), False
    match = _BLOCK_KEY.match(key)
    if match:
        index, module, leaf = match.groups()
        module = _MODULE_NAMES.get(module, module.replace(".", "/"))
        path = (f"blocks_{index}", *module.split("/"), _leaf_name(module, leaf))
        return path, leaf == "weight" and module.split("/")[-1] not in _NORMS
    raise KeyError(key)


def _leaf_name(module: str, leaf: str) -> str:
    """torch weight/bias -> Flax kernel/bias (Linear) or scale/bias (LayerNorm)."""
    if leaf == "bias":
        return "bias"
    return "scale" if module.split("/")[-1] in _NORMS else "kernel"


def checkpoint_geometry(gpt: Mapping[str, np.ndarray]) -> str:
    """What the checkpoint's own shapes say, for error messages."""
    layers = {int(m.group(1)) for k in gpt for m in [_BLOCK_KEY.match(k)] if m}
    facts = [f"{len(layers)} layers"]
    if "tok_emb.weight" in gpt:
        vocab, width = gpt["tok_emb.weight"].shape
        facts += [f"vocab {vocab}", f"width {width}"]
    if "pos_emb" in gpt:
        facts.append(f"block_size {gpt['pos_emb'].shape[1]}")
    return "The checkpoint has " + ", ".join(facts) + "."


def release_to_params(gpt: Mapping[str, np.ndarray], model) -> dict:
    """minGPT state_dict (no prefix) -> vqlc MinGPT params (float32 numpy), strictly checked
    against `model`'s parameter shapes."""
    import jax
    from flax import traverse_util

    from vqlc.gen.networks import gpt as gpt_lib
    expected = traverse_util.flatten_dict(jax.tree.map(lambda s: s.shape,
                                                       gpt_lib.param_shapes(model)))
    params, unexpected, misshaped = {}, [], []
    for key, value in gpt.items():
        try:
            mapped = flax_path(key)
        except KeyError:
            unexpected.append(key)
            continue
        if mapped is None:
            continue
        path, transpose = mapped
        if path not in expected:
            unexpected.append(key)
            continue
        array = np.asarray(value.T if transpose else value, np.float32)
        if array.shape != expected[path]:
            misshaped.append(f"{GPT_PREFIX}{key} {tuple(value.shape)} (vqlc "
                             f"{'/'.join(path)} wants {expected[path]})")
        params[path] = array
    missing = ["/".join(p) for p in expected if p not in params]
    if unexpected or missing or misshaped:
        raise ValueError(_mismatch_message(model, gpt, unexpected, missing, misshaped))
    return traverse_util.unflatten_dict(params)


def _mismatch_message(model, gpt, unexpected, missing, misshaped) -> str:
    problems = torch_files.key_mismatch(missing, [GPT_PREFIX + k for k in unexpected], misshaped)
    wants = (f"The config asks for network.num_layers={model.num_layers}, "
             f"network.width={model.width}, vocab {model.vocab_size} (codebook_size "
             f"{model.codebook_size} + {model.num_condition_ids} class ids), block_size "
             f"{model.block_size} (1 + the tokenizer's {model.num_codes} codes).")
    return ("The GPT checkpoint does not match the config: " + problems + "\n"
            + checkpoint_geometry(gpt) + " " + wants)


# --------------------------------------------------------------------------------- the tokenizer

def write_tokenizer_workdir(tokenizer_config, release: Mapping[str, np.ndarray], dst: str, *,
                            prefix: str = TOKENIZER_PREFIX,
                            require_discriminator: bool = True) -> str:
    """An embedded tokenizer (the tokenizer release's keys, found under `prefix`: `vqgan.*`
    here, `first_stage_model.*` in LDM-LC's checkpoints) -> a tokenizer workdir at `dst`,
    written as vqlc.convert writes one (config.json, codebook.npy, a checkpoint at
    train.num_steps). require_discriminator: see convert.release_to_variables."""
    if not release:
        raise ValueError(f"The checkpoint has no {prefix}* keys: pass "
                         "--tokenizer=<tokenizer workdir> (e.g. one vqlc.convert wrote).")
    variables = convert.release_to_variables(release, tokenizer_config,
                                             require_discriminator=require_discriminator)
    convert.write_workdir(tokenizer_config, variables, dst, int(tokenizer_config.train.num_steps))
    return dst


# ---------------------------------------------------------------------------------- the workdir

def _save(dst: str, state, step: int, keep: int) -> None:
    from vqlc import checkpoint
    manager = checkpoint.make_manager(dst, keep=keep)
    checkpoint.save(manager, step, state, None, force=True)
    manager.close()


def gpt_state(config, model, params):
    """A TrainState holding `params`, checked against the gpt task's own (init_state) structure,
    shapes and dtypes, so resuming and GPTGenerator.load restore into it."""
    import jax
    import jax.numpy as jnp

    from vqlc import parallel
    from vqlc.gen import gpt_train, trainer
    params = jax.tree.map(jnp.asarray, params)
    tx = trainer.make_optimizer(config.optim, config.train.num_steps, params)
    ema = bool(config.optim.ema_decay)
    mesh = parallel.make_mesh(1)
    expected = jax.eval_shape(lambda: gpt_train.init_state(model, tx, seed=config.seed,
                                                           ema=ema, mesh=mesh))
    state = trainer.fresh_state(params, tx, seed=config.seed, ema=ema,
                                step=config.train.num_steps)
    convert._check_like(state, expected)
    return jax.device_put(state, parallel.replicated(mesh))


def check_gpt_config(config) -> None:
    n = config.network
    if n.kind != "mingpt":
        raise ValueError(f"The release's GPT is taming's minGPT: set --config.network.kind=mingpt "
                         f"(got {n.kind!r}).")
    if n.class_dropout > 0:
        raise ValueError("The release's GPT has no null class: set "
                         "--config.network.class_dropout=0.")


def convert_gpt(config, src: str, dst: str, *, tokenizer: Optional[str] = None,
                tokenizer_config=None) -> int:
    """Writes the gpt workdir `dst` (and <dst>/tokenizer unless `tokenizer` names a tokenizer
    workdir) from the release checkpoint `src`; returns the step saved.

    tokenizer_config: the geometry of the embedded `vqgan.*` tokenizer (a tokenizer config,
    default imagenet_lc); unused with `tokenizer`.
    """
    import copy

    from vqlc import cli, config_io
    from vqlc.gen import gpt_train
    from vqlc.tokenizer import Tokenizer
    config = copy.deepcopy(config)  # the tokenizer workdir is filled in below
    check_gpt_config(config)
    dst = os.path.abspath(dst)
    convert.refuse_existing_checkpoints(dst)
    gpt, vqgan = split_gpt_release(read_gpt_release(src))
    if tokenizer is None:
        tok_config = tokenizer_config or cli.shipped_config("imagenet_lc")
        tokenizer = write_tokenizer_workdir(tok_config, vqgan, os.path.join(dst, TOKENIZER_SUBDIR))
    del vqgan  # the 100K x 768 codebook need not stay in memory
    tok = Tokenizer.load(tokenizer)
    grid = (tok.image_size // tok.downsample_factor,) * 2
    num_codes = grid[0] * grid[1]
    model = gpt_train.make_model(config, tok.codebook_size, num_codes)
    params = release_to_params(gpt, model)
    del gpt

    with config.unlocked():
        config.tokenizer.workdir = rundir.absolute(tokenizer)
    os.makedirs(dst, exist_ok=True)
    config_io.write_or_check(config, dst)
    # No token dataset (""): the weights come from the release.
    record = gpt_train.generator_record(config, tok, num_codes, grid, 0, "")
    atomic_io.atomic_write_json(rundir.join(dst, gpt_train.GENERATOR_FILE), record)
    step = int(config.train.num_steps)
    _save(dst, gpt_state(config, model, params), step, config.train.keep_checkpoints)
    logging.info("Converted %s -> %s (step %d, tokenizer %s).", src, dst, step, tokenizer)
    return step
