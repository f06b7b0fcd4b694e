"""A trained tokenizer as a taming-transformers VQModel state dict, for PyTorch users.

    python -m vqlc.torch_export --workdir=runs/demo [--step=N] --dst=exports/demo.safetensors

    import safetensors.torch; from taming.models.vqgan import VQModel
    model = VQModel(ddconfig, lossconfig={"target": "torch.nn.Identity"}, n_embed=K, embed_dim=D)
    model.load_state_dict(safetensors.torch.load_file("exports/demo.safetensors"))

(the command prints these lines with the tokenizer's own ddconfig, K and D filled in).

The file, in safetensors' format, holds float32 tensors under taming's VQModel names and
PyTorch layouts (conv weights OIHW, GroupNorm `weight`):
    encoder.*, decoder.*, quant_conv.*, post_quant_conv.*   the autoencoder
    quantize.embedding.weight   [K, embed_dim]: the codes the decoder sees, searched by plain
                                squared L2 as taming's VectorQuantizer does
and, in its metadata (strings): format "taming-vqmodel"; ddconfig (JSON: taming's ddconfig,
Encoder/Decoder keyword arguments); n_embed and embed_dim; quantizer (vq | fc | ema | lc);
l2_normalized_codes ("true" | "false"); source (JSON: the workdir, step and config hash).

Per quantizer, the codes exported (each quantizer's `codebook()`):
    lc   the frozen codebook through the trained projector. LC's inference picks the nearest
         projected code, so taming's nearest-code search reproduces it; the projector and the
         frozen codebook themselves are not in the file.
    vq   the trained codebook; ema its moving-average codebook.
    fc   the l2-normalised codes (l2_normalized_codes "true"). FC searches with l2-normalised
         latents and taming's VectorQuantizer does not normalise: l2-normalise quant_conv's
         output before `model.quantize`, or the nearest codes differ.
Not exported: the discriminator, optimiser state, EMA training statistics.

`flax_to_torch` is the inverse of `vqlc.models.taming_names.torch_to_flax` for the autoencoder.
"""
import json
import re
import sys
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import numpy as np
import safetensors.numpy
from absl import flags

from vqlc import atomic_io, cli, tokenizer
from vqlc.models import taming_names

PROG = "vqlc.torch_export"
FORMAT = "taming-vqmodel"
CODEBOOK_KEY = "quantize.embedding.weight"
# The Flax submodule of VQModel that is not part of taming's autoencoder: exported only as the
# code table under CODEBOOK_KEY.
QUANTIZER_MODULE = "quantizer"

# taming's Encoder/Decoder (taming/modules/diffusionmodules/model.py). ModuleList members are
# `down.N`, `up.N`, `block.N`, `attn.N`; everything else is a named attribute. The Flax names
# glue both with "_", so `up_0_block_1` and `mid_block_1` are told apart by this grammar.
_RESNET_LAYERS = ("norm1", "conv1", "norm2", "conv2", "nin_shortcut")
_ATTN_LAYERS = ("norm", "q", "k", "v", "proj_out")
_BLOCKS = (  # (Flax block name, taming module path, the layers such a block has)
    (re.compile(r"(down|up)_(\d+)_block_(\d+)"), r"\1.\2.block.\3", _RESNET_LAYERS),
    (re.compile(r"(down|up)_(\d+)_attn_(\d+)"), r"\1.\2.attn.\3", _ATTN_LAYERS),
    (re.compile(r"down_(\d+)_downsample"), r"down.\1.downsample", ("conv",)),
    (re.compile(r"up_(\d+)_upsample"), r"up.\1.upsample", ("conv",)),
    (re.compile(r"mid_(block_1|block_2)"), r"mid.\1", _RESNET_LAYERS),
    (re.compile(r"mid_attn_1"), "mid.attn_1", _ATTN_LAYERS),
)
_TOP_LAYERS = ("conv_in", "norm_out", "conv_out")  # attributes of the Encoder/Decoder itself
# Prefixes that name a single layer (VQModel's 1x1 convs): their parameters sit right under it.
_LONE_LAYERS = ("quant_conv", "post_quant_conv")

# Flax parameter name and rank -> (torch parameter name, axes of the Flax array in torch order).
_LAYOUTS = {
    ("kernel", 4): ("weight", (3, 2, 0, 1)),  # conv HWIO -> OIHW
    ("kernel", 2): ("weight", (1, 0)),  # linear [in, out] -> [out, in]
    ("scale", 1): ("weight", (0,)),  # GroupNorm / BatchNorm
}


# ---------------------------------------------------------------------------------------------
# Flax names -> taming names


def _flatten(tree: Mapping[str, Any], prefix: Tuple[str, ...] = ()) -> Dict[Tuple[str, ...], Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def _destinations(prefix_map: Mapping[str, Optional[str]]) -> Dict[Tuple[str, ...], str]:
    """Flax path -> torch key prefix, from a torch_to_flax prefix map (None: left out)."""
    out: Dict[Tuple[str, ...], str] = {}
    for prefix, dest in prefix_map.items():
        if dest is None:
            continue
        path = tuple(p for p in dest.split("/") if p)
        if path in out:
            raise ValueError(f"prefix_map sends both {out[path]!r} and {prefix!r} to {dest!r}: "
                             "the inverse is ambiguous.")
        out[path] = prefix
    return out


def _torch_module(module: Tuple[str, ...], prefix: str) -> str:
    """The taming module path (dots) of the Flax module path `module` under torch `prefix`."""
    if not module:
        if prefix.rstrip(".").rsplit(".", 1)[-1] in _LONE_LAYERS:
            return prefix.rstrip(".")
        raise ValueError("a parameter directly under an Encoder/Decoder is no taming layer")
    if len(module) == 1:
        if module[0] in _TOP_LAYERS:
            return prefix + module[0]
        raise ValueError(f"{module[0]!r} is not a layer of taming's Encoder/Decoder "
                         f"({', '.join(_TOP_LAYERS)}) nor a block holding layers")
    if len(module) == 2:
        block, layer = module
        for pattern, torch_path, layers in _BLOCKS:
            if pattern.fullmatch(block):
                if layer not in layers:
                    raise ValueError(f"block {block!r} has layers {', '.join(layers)}, not "
                                     f"{layer!r}")
                return prefix + pattern.sub(torch_path, block) + "." + layer
        raise ValueError(f"{block!r} is not a block of taming's Encoder/Decoder")
    raise ValueError("taming's modules nest a block and a layer at most")


def _torch_entry(path: Tuple[str, ...], ndim: int,
                 destinations: Mapping[Tuple[str, ...], str]) -> Tuple[str, Tuple[int, ...]]:
    """(taming key, Flax axes in torch order) of the Flax parameter `path` (params collection)."""
    base = max((d for d in destinations if path[:len(d)] == d), key=len, default=None)
    if base is None:
        raise ValueError(f"outside every prefix_map destination "
                         f"{sorted('/'.join(d) for d in destinations)}")
    *module, name = path[len(base):]
    if name == "bias":
        layout = ("bias", tuple(range(ndim)))
    elif (name, ndim) in _LAYOUTS:
        layout = _LAYOUTS[(name, ndim)]
    else:
        raise ValueError(f"a {ndim}-D {name!r} has no taming counterpart (expected a 4-D conv "
                         "or 2-D linear 'kernel', a 1-D 'scale' or a 'bias')")
    torch_name, axes = layout
    return f"{_torch_module(tuple(module), destinations[base])}.{torch_name}", axes


def _torch_entries(params: Mapping[str, Any],
                   prefix_map: Mapping[str, Optional[str]]) -> Dict[str, Tuple[Any, tuple]]:
    """taming key -> (Flax leaf, axes) for every leaf of `params`, or a ValueError naming each
    leaf that has no place in taming's modules."""
    if "params" in params:
        raise ValueError("flax_to_torch takes a params collection: pass variables['params'], "
                         "not the variables.")
    destinations = _destinations(prefix_map)
    entries: Dict[str, Tuple[Any, tuple]] = {}
    problems = []
    for path, leaf in _flatten(params).items():
        where = "/".join(path)
        try:
            key, axes = _torch_entry(path, len(leaf.shape), destinations)
        except ValueError as e:
            problems.append(f"{where}: {e}")
            continue
        if key in entries:
            problems.append(f"{where}: maps to {key}, which another parameter already took")
            continue
        entries[key] = (leaf, axes)
    if problems:
        raise ValueError("these parameters have no place in a taming state_dict (is the model "
                         "taming-shaped?):\n  " + "\n  ".join(problems))
    return dict(sorted(entries.items()))


def flax_to_torch(params: Mapping[str, Any],
                  prefix_map: Mapping[str, Optional[str]] = taming_names.VQMODEL_PREFIX_MAP,
                  ) -> Dict[str, np.ndarray]:
    """The taming state_dict (key -> float32 C-contiguous numpy array) of Flax `params`.

    The exact inverse of `taming_names.torch_to_flax` for the autoencoder: `params` is a params
    collection (not the variables) of VQModel's encoder, decoder, quant_conv and post_quant_conv
    (VQMODEL_PREFIX_MAP) or of a bare Encoder or Decoder (IDENTITY_PREFIX_MAP). Conv kernels
    HWIO -> OIHW, linear kernels [in, out] -> [out, in], GroupNorm `scale` -> `weight`.

    Raises:
      ValueError naming every parameter taming's modules have no place for (a quantizer, an
      extra layer, a block name outside taming's grammar).
    """
    return {key: np.ascontiguousarray(np.transpose(np.asarray(jax.device_get(leaf),
                                                              np.float32), axes))
            for key, (leaf, axes) in _torch_entries(params, prefix_map).items()}


def torch_shapes(params: Mapping[str, Any],
                 prefix_map: Mapping[str, Optional[str]] = taming_names.VQMODEL_PREFIX_MAP,
                 ) -> Dict[str, Tuple[int, ...]]:
    """taming key -> torch shape of what `flax_to_torch(params)` would return, from shapes alone
    (leaves may be jax.ShapeDtypeStruct, e.g. from jax.eval_shape): nothing is copied."""
    return {key: tuple(leaf.shape[a] for a in axes)
            for key, (leaf, axes) in _torch_entries(params, prefix_map).items()}


# ---------------------------------------------------------------------------------------------
# A tokenizer -> file


def ddconfig(config) -> dict:
    """taming's ddconfig (Encoder/Decoder keyword arguments) of a tokenizer config."""
    m = config.model
    return {"double_z": False, "z_channels": m.z_channels, "resolution": config.data.image_size,
            "in_channels": 3, "out_ch": 3, "ch": m.ch, "ch_mult": list(m.ch_mult),
            "num_res_blocks": m.num_res_blocks, "attn_resolutions": list(m.attn_resolutions),
            "dropout": m.dropout}


def _codebook(tok) -> np.ndarray:
    """[K, embed_dim]: the codes the quantizer searches and the decoder gets (for LC the frozen
    codebook through the projector)."""
    codes = tok.model.apply(tok.variables, method=lambda m: m.quantizer.codebook())
    return np.ascontiguousarray(jax.device_get(codes), np.float32)


def state_dict(tok) -> Dict[str, np.ndarray]:
    """The tokenizer's taming VQModel state_dict: autoencoder plus CODEBOOK_KEY."""
    params = {k: v for k, v in tok.variables["params"].items() if k != QUANTIZER_MODULE}
    arrays = flax_to_torch(params)
    arrays[CODEBOOK_KEY] = _codebook(tok)
    return arrays


def metadata(tok) -> Dict[str, str]:
    """The file's safetensors metadata (every value a string, as the format requires)."""
    q = tok.config.quantizer
    return {"format": FORMAT, "ddconfig": json.dumps(ddconfig(tok.config)),
            "n_embed": str(q.codebook_size), "embed_dim": str(q.dim), "quantizer": q.kind,
            # FC searches unit latents among unit codes; taming does not normalise.
            "l2_normalized_codes": json.dumps(q.kind == "fc"),
            "source": json.dumps(tok.identity())}


def export_tokenizer(tok, path: str) -> int:
    """Writes `path` (.safetensors; local or gs://, atomically) holding the Tokenizer `tok` as a
    taming VQModel state_dict with metadata (see the module docstring); returns its size."""
    data = safetensors.numpy.save(state_dict(tok), metadata=metadata(tok))
    atomic_io.write_bytes(path, data)
    return len(data)


def pytorch_snippet(tok, path: str) -> str:
    """Three lines of Python that load the file written by export_tokenizer into taming's VQModel
    (lossconfig Identity: the file has no loss weights)."""
    q = tok.config.quantizer
    lines = [
        "import safetensors.torch; from taming.models.vqgan import VQModel",
        f"model = VQModel(ddconfig={ddconfig(tok.config)!r}, lossconfig={{'target': "
        f"'torch.nn.Identity'}}, n_embed={q.codebook_size}, embed_dim={q.dim})",
        f"model.load_state_dict(safetensors.torch.load_file({path!r}))",
    ]
    if q.kind == "fc":
        lines.append("# fc: l2-normalise model.quant_conv's output before model.quantize "
                     "(the codes are unit vectors)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line


def _define_flags() -> flags.FlagValues:
    fv = cli.new_flags()
    cli.define_export_source(fv)
    flags.DEFINE_string("dst", None, "The .safetensors file to write (replaced if it exists).",
                        flag_values=fv)
    flags.mark_flag_as_required("dst", flag_values=fv)
    return fv


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    fv = _define_flags()
    positional = cli.parse(fv, argv, PROG, __doc__)
    if positional:
        cli.usage_error(PROG, f"unexpected arguments: {' '.join(positional)}", fv)
    if not fv.dst.endswith(".safetensors"):
        cli.usage_error(PROG, f"--dst={fv.dst}: expected a file name ending in .safetensors.",
                        fv)

    def run() -> int:
        tok = tokenizer.Tokenizer.load(fv.workdir, fv.step)
        size = export_tokenizer(tok, fv.dst)
        print(f"wrote {fv.dst} ({size / 2**20:.2f} MB): {fv.workdir} step {tok.step} as a taming "
              f"VQModel state_dict, {tok.config.quantizer.kind} codes under {CODEBOOK_KEY}")
        print("load it in PyTorch (taming-transformers):")
        print("\n".join("  " + line for line in pytorch_snippet(tok, fv.dst).splitlines()))
        return 0

    return cli.main_wrapper(PROG, run)()


if __name__ == "__main__":
    sys.exit(main())
