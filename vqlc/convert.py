"""Convert the authors' released VQGAN-LC PyTorch checkpoints into a vqlc workdir, without torch.

    python -m vqlc.convert --config=imagenet_lc \\
        --src=vqgan-lc-100K-f16-dim8.pth --dst=runs/lc_release
    python -m vqlc.convert --config=imagenet_lc:f8 \\
        --src=vqgan-lc-100K-f8-dim4.pth --dst=runs/lc_release_f8
    # a checkpoint without the codebook inside, or a 16,384-code one:
    python -m vqlc.convert --config=imagenet_lc --src=<pth> --dst=<dir> \\
        --codebook=codebook-100K.pth [--config.quantizer.codebook_size=16384]

then `vqlc.Tokenizer.load(<dst>)` (or `python -m vqlc.main --config=...:eval --workdir=<dst>`).

The release's generators go through the same command, by the config's task:
    python -m vqlc.convert --config=gpt_lc_imagenet --src=transformer_99.pt --dst=runs/gpt_lc
    python -m vqlc.convert --config=dit_lc_imagenet --src=dit-lc-100K-f16.pth \\
        --dst=runs/dit_lc --tokenizer=runs/lc_release [--weights=ema|model]
    python -m vqlc.convert --config=sit_lc_imagenet --src=sit-lc-100K-f16.pth \\
        --dst=runs/sit_lc --tokenizer=runs/lc_release [--weights=ema|model]
    python -m vqlc.convert --config=ldm_lc_imagenet --src=<ldm-lc f16 .ckpt> --dst=runs/ldm_lc \
        [--tokenizer=runs/lc_release] [--weights=ema|model]
    python -m vqlc.convert --config=ldm_lc_imagenet:f8 --src=<ldm-lc f8 .ckpt> \
        --dst=runs/ldm_lc_f8 [--tokenizer=runs/lc_release_f8 | --tokenizer_config=imagenet_lc:f8]
(vqlc.gen.convert_gpt, vqlc.gen.convert_dit, vqlc.gen.convert_ldm). The GPT and LDM checkpoints
hold their tokenizer (vqgan.*, first_stage_model.*): without --tokenizer it is converted into
<dst>/tokenizer with --tokenizer_config's geometry (a shipped config name[:variant] or a config
file; default imagenet_lc, imagenet_lc:f8 for ldm_lc_imagenet:f8).

The workdir written is the one training writes: config.json, codebook.npy (the frozen codebook
[K, feature_dim]) and checkpoints/<step>/ (orbax) holding a TrainState whose generator and
discriminator parameters (and BatchNorm statistics) come from the release; the optimiser states
are fresh (Adam's zeros), the step is --step (default: config.train.num_steps, a finished run).
The release's LPIPS weights are skipped: vqlc loads its own.

Release format (zh460045050/VQGAN-LC, vqgan-gpt-lc/models/models_vq.py and eval_reconstruction.py,
read June 2024): `torch.save({'state_dict': VQModel.state_dict(), ...})` ('model' instead of
'state_dict' in its "last" checkpoints), loaded there with strict=False. Its VQModel attributes are
listed in RELEASE_KEY_MAP. The codebook can also come from `codebook-100K.pth`, a bare
torch.save'd float tensor [100000, 768] (the release builds `tok_embeddings` from it before loading
the checkpoint, whose own copy then wins); --codebook also takes a .npy file.
"""
import logging
import os
import sys
from typing import Dict, Mapping, Optional, Tuple

import numpy as np

from absl import flags

from vqlc import atomic_io, cli, rundir, torch_files
from vqlc.models import taming_names

# Release state_dict key prefix -> (part, Flax path inside that part). Parts: "generator" (the
# VQModel's params), "discriminator" (params + batch_stats), "codebook" (the frozen [K, D] array,
# whole key), None (skipped on purpose). Any key matching no prefix is an error.
# Read from the release's code, not from a downloaded checkpoint: if a real file differs, fix the
# names here. Uncertain: whether the released files hold `tok_embeddings.weight` at all (the
# authors' strict=False loading works either way; --codebook covers its absence), and whether keys
# carry DDP's "module." prefix (stripped below when every key has it).
RELEASE_KEY_MAP: Mapping[str, Tuple[Optional[str], Optional[str]]] = {
    "encoder.": ("generator", "encoder"),
    "decoder.": ("generator", "decoder"),
    "quant_conv.": ("generator", "quant_conv"),
    "post_quant_conv.": ("generator", "post_quant_conv"),
    "codebook_projection.": ("generator", "quantizer/projector"),  # nn.Linear(D, embed_dim)
    "tok_embeddings.weight": ("codebook", None),  # nn.Embedding(K, D), frozen
    "discriminator.": ("discriminator", ""),  # taming NLayerDiscriminator: main.N...
    "perceptual_loss.": (None, None),  # LPIPS VGG16 + heads: vqlc loads its own
}

_CODEBOOK_PART = "codebook"
_CONFIG_HINT = (
    "The release's f16 dim-8 model is --config=imagenet_lc, the f8 dim-4 one "
    "--config=imagenet_lc:f8; a checkpoint with another codebook size needs "
    "--config.quantizer.codebook_size=<K> (e.g. 16384), another codebook width "
    "--config.codebook.feature_dim=<D>.")


def read_release_state_dict(path: str) -> Dict[str, np.ndarray]:
    """The release checkpoint's state_dict as numpy arrays ('state_dict' or 'model' entry)."""
    state_dict = torch_files.load_torch_file(path)
    if not state_dict:
        raise ValueError(f"{path}: no tensors found; is it a VQGAN-LC checkpoint?")
    if all(k.startswith("module.") for k in state_dict):  # saved from a DDP-wrapped model
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def read_codebook(path: str) -> np.ndarray:
    """A codebook file -> float32 [K, D]: a .npy array, or a .pth holding one 2-D tensor (the
    release's codebook-100K.pth) or a state_dict with `tok_embeddings.weight`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Codebook file not found: {path!r}. The release's is codebook-100K.pth; "
            "a .npy float32 [K, D] array also works.")
    if path.endswith(".npy"):
        codes = np.load(path)
    else:
        obj = torch_files.load_torch_object(path)
        if isinstance(obj, np.ndarray):
            codes = obj
        else:
            arrays = {k: v for k, v in torch_files.flatten_arrays(obj).items() if v.ndim == 2}
            named = [k for k in arrays if k.endswith("tok_embeddings.weight")]
            if len(named) == 1:
                codes = arrays[named[0]]
            elif len(arrays) == 1:
                codes = next(iter(arrays.values()))
            else:
                raise ValueError(f"{path}: expected one 2-D codebook tensor; found "
                                 f"{ {k: v.shape for k, v in arrays.items()} }.")
    if codes.ndim != 2:
        raise ValueError(f"{path}: a codebook is [K, D]; got shape {codes.shape}.")
    return np.asarray(codes, np.float32)


def split_release_state_dict(state_dict: Mapping[str, np.ndarray]
                             ) -> Dict[str, Dict[str, np.ndarray]]:
    """Groups keys by RELEASE_KEY_MAP part (longest prefix wins); skipped keys are dropped."""
    prefixes = sorted(RELEASE_KEY_MAP, key=len, reverse=True)
    parts: Dict[str, Dict[str, np.ndarray]] = {}
    unknown = []
    for key, value in state_dict.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            unknown.append(key)
            continue
        part = RELEASE_KEY_MAP[prefix][0]
        if part is not None:
            parts.setdefault(part, {})[key] = value
    if unknown:
        hint = ""
        if any(k in ("cluster_size", "embed_avg") for k in unknown):
            hint = " (cluster_size/embed_avg belong to the release's EMA quantizer, not LC)"
        raise ValueError(
            f"state_dict keys that are not part of the release's VQGAN-LC model{hint}: "
            f"{sorted(unknown)}. If the release names them differently, extend "
            "vqlc.convert.RELEASE_KEY_MAP.")
    return parts


def _prefix_map(part: str) -> Dict[str, str]:
    return {p: dest for p, (pt, dest) in RELEASE_KEY_MAP.items() if pt == part}


def release_to_variables(state_dict: Mapping[str, np.ndarray], config,
                         codebook: Optional[np.ndarray] = None, *,
                         require_discriminator: bool = True) -> dict:
    """Release state_dict -> vqlc variables for `config`, every shape checked.

    Args:
      state_dict: from `read_release_state_dict`.
      config: a tokenizer config with quantizer.kind 'lc' whose geometry matches the checkpoint.
      codebook: [K, D] from `read_codebook`, needed when the state_dict has no
        `tok_embeddings.weight`; when both exist the state_dict's wins (as in the release).
      require_discriminator: False for a tokenizer saved without its discriminator (LDM-LC's
        first stage, ldm-lc/ldm/models/models_vq.py, has none): the discriminator is then
        initialised as training starts one (seed config.seed), so the workdir is complete.

    Returns:
      {"g_params", "d_params", "d_batch_stats", "codebook"} (numpy arrays).

    Raises:
      ValueError naming missing, unexpected and mis-shaped keys, with the config flags to fix.
    """
    import jax
    import jax.numpy as jnp

    from vqlc.models import build

    if config.quantizer.kind != "lc":
        raise ValueError(f"The release checkpoints are VQGAN-LC models: set "
                         f"--config.quantizer.kind=lc (got {config.quantizer.kind!r}).")
    parts = split_release_state_dict(state_dict)
    for part in ("generator", "discriminator") if require_discriminator else ("generator",):
        if part not in parts:
            raise ValueError(f"The state_dict has no {part} keys (prefixes "
                             f"{sorted(_prefix_map(part))}): is it a VQGAN-LC checkpoint?")

    # Codebook: from the checkpoint, else from --codebook.
    cb_key = next(k for k, (p, _) in RELEASE_KEY_MAP.items() if p == _CODEBOOK_PART)
    in_ckpt = parts.get(_CODEBOOK_PART, {}).get(cb_key)
    if in_ckpt is None and codebook is None:
        raise ValueError(f"The state_dict has no {cb_key!r} (the frozen codebook): pass "
                         "--codebook=codebook-100K.pth (or a .npy [K, D] file).")
    if in_ckpt is not None and codebook is not None:
        if in_ckpt.shape != codebook.shape:
            raise ValueError(f"--codebook has shape {codebook.shape} but the checkpoint's "
                             f"{cb_key} has {in_ckpt.shape}.")
        diff = float(np.max(np.abs(np.asarray(in_ckpt, np.float32) - codebook)))
        if diff > 0:
            logging.warning("--codebook differs from the checkpoint's %s (max |diff| %.3g); "
                            "using the checkpoint's, as the release does.", cb_key, diff)
    codes = np.asarray(in_ckpt if in_ckpt is not None else codebook, np.float32)
    want = (config.quantizer.codebook_size, config.codebook.feature_dim)
    if codes.shape != want:
        raise ValueError(
            f"Codebook shape mismatch: the checkpoint's codebook is {codes.shape}, the config "
            f"asks for quantizer.codebook_size x codebook.feature_dim = {want}. {_CONFIG_HINT}")
    if not np.all(np.isfinite(codes)):
        raise ValueError("The codebook contains NaN or Inf values.")

    # Targets from shapes only: nothing is initialised.
    model = build.tokenizer_from_config(config)
    disc = build.discriminator_from_config(config)
    x = jnp.zeros((1, config.data.image_size, config.data.image_size, 3), jnp.float32)
    key = jax.random.key(0)
    g_target = jax.eval_shape(lambda: model.init({"params": key, "dropout": key}, x, train=False))
    d_target = jax.eval_shape(lambda: disc.init(key, x, train=False))
    try:
        g = taming_names.torch_to_flax(parts["generator"], _prefix_map("generator"),
                                       target={"params": g_target["params"]})
        if "discriminator" in parts:
            d = taming_names.torch_to_flax(parts["discriminator"], _prefix_map("discriminator"),
                                           target=d_target)
        else:
            logging.info("No discriminator keys: initialising the discriminator (seed %d).",
                         config.seed)
            d = disc.init(jax.random.key(config.seed), x, train=False)
    except ValueError as e:
        raise ValueError(f"The checkpoint does not match the config: {e}\n"
                         f"{_describe(state_dict)}\n{_CONFIG_HINT}") from None
    as_f32 = lambda tree: jax.tree.map(lambda a: np.asarray(a, np.float32), tree)
    return {"g_params": as_f32(g["params"]), "d_params": as_f32(d["params"]),
            "d_batch_stats": as_f32(d.get("batch_stats", {})), "codebook": codes}


def _describe(state_dict: Mapping[str, np.ndarray]) -> str:
    """What the checkpoint's own shapes say about its geometry, for error messages."""
    levels = {k.split(".")[2] for k in state_dict if k.startswith("encoder.down.")}
    facts = []
    if levels:
        facts.append(f"{len(levels)} resolution levels (f{2 ** (len(levels) - 1)})")
    if "quant_conv.weight" in state_dict:
        facts.append(f"embed_dim {state_dict['quant_conv.weight'].shape[0]}")
    if "encoder.conv_in.weight" in state_dict:
        facts.append(f"ch {state_dict['encoder.conv_in.weight'].shape[0]}")
    return "The checkpoint has " + (", ".join(facts) or "no encoder keys") + "."


def convert(config, src: str, dst: str, *, codebook_path: Optional[str] = None,
            step: Optional[int] = None) -> int:
    """Writes the vqlc workdir `dst` from the release checkpoint `src`; returns the step saved.

    `dst` must not hold a checkpoint yet. The config's codebook is set to <dst>/codebook.npy.
    """
    if not os.path.isfile(src):
        raise FileNotFoundError(
            f"Checkpoint not found: {src!r}. The release files are vqgan-lc-100K-f16-dim8.pth "
            "and vqgan-lc-100K-f8-dim4.pth (the authors' VQGAN-LC README links them).")
    dst = os.path.abspath(dst)
    refuse_existing_checkpoints(dst)
    codebook = read_codebook(codebook_path) if codebook_path else None
    variables = release_to_variables(read_release_state_dict(src), config, codebook)
    step = int(config.train.num_steps if step is None or step < 0 else step)
    write_workdir(config, variables, dst, step)
    logging.info("Converted %s -> %s (step %d, %d codes of width %d).", src, dst, step,
                 *variables["codebook"].shape)
    return step


def refuse_existing_checkpoints(dst: str) -> None:
    ckpt_dir = rundir.checkpoints(dst)
    if os.path.isdir(ckpt_dir) and any(n.isdigit() for n in os.listdir(ckpt_dir)):
        raise FileExistsError(f"{ckpt_dir} already holds checkpoints; use a new --dst.")


def write_workdir(config, variables: dict, dst: str, step: int) -> None:
    """A tokenizer workdir at `dst` from converted `variables` (release_to_variables):
    config.json, codebook.npy and a TrainState checkpoint at `step` (fresh optimiser states)."""
    import jax
    import jax.numpy as jnp

    from vqlc import checkpoint, config_io, parallel
    os.makedirs(dst, exist_ok=True)
    cb_file = rundir.codebook(dst)
    with config.unlocked():
        config.codebook.path = cb_file
        config.codebook.build = ""
    config_io.write_or_check(config, dst)
    atomic_io.atomic_save_npy(cb_file, variables["codebook"])

    # Built directly from the converted arrays (no jitted init: a full-size model would compile
    # for minutes on a CPU), then checked leaf by leaf against the structure, shapes and dtypes
    # training's own init_train_state gives, so Tokenizer.load and resuming restore into it.
    from vqlc.models import build
    from vqlc.train import optim
    from vqlc.train.state import TrainState, init_train_state
    model = build.tokenizer_from_config(config)
    disc = build.discriminator_from_config(config)
    g_tx = optim.make_optimizer(config.optim, config.train.num_steps)
    d_tx = optim.make_optimizer(config.optim, config.train.num_steps)
    mesh = parallel.make_mesh(1)
    expected, _ = jax.eval_shape(lambda: init_train_state(
        model, disc, g_tx, d_tx, image_size=config.data.image_size, seed=config.seed, mesh=mesh))
    g_params = jax.tree.map(jnp.asarray, variables["g_params"])
    d_params = jax.tree.map(jnp.asarray, variables["d_params"])
    state = TrainState(
        step=jnp.asarray(step, jnp.int32), g_params=g_params, g_opt_state=g_tx.init(g_params),
        d_params=d_params, d_batch_stats=jax.tree.map(jnp.asarray, variables["d_batch_stats"]),
        d_opt_state=d_tx.init(d_params), ema={},
        usage=jnp.zeros((config.quantizer.codebook_size,), jnp.int32),
        rng=jax.random.key_data(jax.random.key(config.seed)))
    _check_like(state, expected)
    state = jax.device_put(state, parallel.replicated(mesh))
    manager = checkpoint.make_manager(dst, keep=config.train.keep_checkpoints)
    checkpoint.save(manager, step, state, None, force=True)
    manager.close()


def _check_like(state, expected) -> None:
    """Raises unless `state` has `expected`'s tree structure, shapes and dtypes."""
    import jax
    got_def, want_def = jax.tree.structure(state), jax.tree.structure(expected)
    if got_def != want_def:
        raise AssertionError(f"converted state structure {got_def} != training's {want_def}")
    bad = [f"{jax.tree_util.keystr(path)}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
           for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state),
                                   jax.tree.leaves(expected))
           if a.shape != b.shape or a.dtype != b.dtype]
    if bad:
        raise AssertionError("converted state differs from training's: " + "; ".join(bad))


PROG = "vqlc.convert"
FLAGS = cli.new_flags()
_CONFIG = cli.define_config(FLAGS, "Python config file (e.g. vqlc/configs/imagenet_lc.py) matching "
                                   "the checkpoint.")
_SRC = flags.DEFINE_string("src", None, "The release's .pth checkpoint.", flag_values=FLAGS)
_DST = flags.DEFINE_string("dst", None, "New vqlc workdir to write.", flag_values=FLAGS)
_CODEBOOK = flags.DEFINE_string(
    "codebook", None, "Optional codebook-100K.pth or .npy [K, D]; needed when the checkpoint "
    "lacks tok_embeddings.weight.", flag_values=FLAGS)
_STEP = flags.DEFINE_integer("step", -1, "Checkpoint step to write; -1 = config.train.num_steps.",
                             flag_values=FLAGS)
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "GPT and LDM checkpoints (task gpt; task diffusion with network.kind "
    "unet): an existing tokenizer workdir to use instead of converting the checkpoint's "
    "vqgan.* / first_stage_model.* part. DiT/SiT checkpoints: the tokenizer workdir whose "
    "latents they model (required).", flag_values=FLAGS)
_WEIGHTS = flags.DEFINE_enum(
    "weights", "ema", ["ema", "model"], "DiT/SiT/LDM checkpoints: which of the release's weight "
    "sets to convert (ema: what the release samples with).", flag_values=FLAGS)
_TOKENIZER_CONFIG = flags.DEFINE_string(
    "tokenizer_config", "imagenet_lc", "GPT and LDM checkpoints: the tokenizer config matching "
    "the checkpoint's vqgan.* / first_stage_model.* part: a shipped config (name[:variant]) or "
    "a config file (path.py[:variant]). For ldm_lc_imagenet:f8 the default is "
    "imagenet_lc:f8.", flag_values=FLAGS)
flags.mark_flags_as_required(["src", "dst"], flag_values=FLAGS)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    positional = cli.parse(FLAGS, argv, PROG, __doc__)
    if positional:
        cli.usage_error(PROG, f"unexpected arguments: {positional}")
    cli.setup_logging()

    def _convert():
        if _CONFIG.value.get("task") == "gpt":
            return _convert_gpt()
        if _CONFIG.value.get("task") == "diffusion":
            return _convert_diffusion()
        step = convert(_CONFIG.value, _SRC.value, _DST.value, codebook_path=_CODEBOOK.value,
                       step=_STEP.value)
        print(f"wrote {os.path.abspath(_DST.value)} (step {step}); load it with "
              f"vqlc.Tokenizer.load({_DST.value!r})")
    return cli.main_wrapper(PROG, _convert)()  # TorchFileError is a ValueError


def _convert_gpt() -> None:
    """The release's GPT checkpoint (vqlc.gen.convert_gpt)."""
    from vqlc.gen import convert_gpt
    tokenizer_config = (None if _TOKENIZER.value
                        else tokenizer_config_from(_TOKENIZER_CONFIG.value))
    step = convert_gpt.convert_gpt(_CONFIG.value, _SRC.value, _DST.value,
                                   tokenizer=_TOKENIZER.value, tokenizer_config=tokenizer_config)
    print(f"wrote {os.path.abspath(_DST.value)} (step {step}); sample it with the sample task: "
          f"--config.generator.kind=gpt --config.generator.workdir={_DST.value}")


def tokenizer_config_from(value: str):
    """--tokenizer_config: a shipped config 'name[:variant]' or a config file
    'path.py[:variant]'."""
    name, _, variant = value.partition(":")
    if "/" in name or os.sep in name or name.endswith(".py"):
        import importlib.util
        if not os.path.isfile(name):
            raise FileNotFoundError(f"--tokenizer_config={value}: no file {name!r}.")
        spec = importlib.util.spec_from_file_location("_vqlc_tokenizer_config", name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config(variant)
    return cli.shipped_config(value)


def _convert_diffusion() -> None:
    """The release's DiT-LC / SiT-LC (vqlc.gen.convert_dit) and LDM-LC (vqlc.gen.convert_ldm)
    checkpoints, by network.kind."""
    config = _CONFIG.value
    kind = config.network.kind
    if kind not in ("dit", "sit", "unet"):
        raise ValueError(f"network.kind={kind!r}: no converter (dit, sit, unet).")
    if kind == "unet":
        from vqlc.gen import convert_ldm
        value = _TOKENIZER_CONFIG.value
        if not FLAGS["tokenizer_config"].present and config.network.size == "f8":
            value = "imagenet_lc:f8"  # the f8 LDM models the f8 tokenizer's latents
        tokenizer_config = None if _TOKENIZER.value else tokenizer_config_from(value)
        step = convert_ldm.convert_ldm(config, _SRC.value, _DST.value,
                                       tokenizer=_TOKENIZER.value,
                                       tokenizer_config=tokenizer_config, weights=_WEIGHTS.value)
        tokenizer = _TOKENIZER.value or os.path.join(_DST.value, convert_ldm.TOKENIZER_SUBDIR)
    else:
        from vqlc.gen import convert_dit
        step = convert_dit.convert_dit(config, _SRC.value, _DST.value,
                                       tokenizer=_TOKENIZER.value, weights=_WEIGHTS.value)
        tokenizer = _TOKENIZER.value
    print(f"wrote {os.path.abspath(_DST.value)} (step {step}, {_WEIGHTS.value} weights); sample "
          f"it with the sample task: --config.generator.kind=diffusion "
          f"--config.generator.workdir={_DST.value} "
          f"--config.tokenizer.workdir={tokenizer}")


if __name__ == "__main__":
    sys.exit(main())
