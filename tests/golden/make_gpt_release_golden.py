"""Regenerate tests/golden/gpt_release_tiny*.pt and gpt_release_tiny.npz: a tiny GPT-LC release
checkpoint in the layout the authors' GPT training script saves.

Run with the torch venv (torch is never a dependency of vqlc or its tests):
    /work/venv-torch/bin/python tests/golden/make_gpt_release_golden.py

The release (zh460045050/VQGAN-LC, vqgan-gpt-lc) saves `transformer_{epoch}.pt`: the flat
state_dict of its Net2Net-style model, `transformer.*` (taming's minGPT, float16, with each
block's causal-mask buffer `attn.mask`) and the tokenizer under `vqgan.*` (the VQGAN-LC release
keys). DeepSpeed's `mp_rank_00_model_states.pt` holds the same dict under "module".

This script builds taming's own GPT (taming.modules.transformer.mingpt.GPT, the release's module)
at a tiny size: 64 codes + 4 classes, block 65 (the 8x8 tokens of tests/golden/release_tiny.pth's
f2 tokenizer on 16 px images), 2 layers, 2 heads, width 32. minGPT's init leaves the position
embedding at zero and LayerNorms at (1, 0); they are randomised here so a mis-mapped parameter
shows in the logits. The tokenizer part is release_tiny.pth's state_dict, prefixed `vqgan.`.
Every tensor is stored float16, as the release's fp16 training leaves it.

Files:
  gpt_release_tiny.pt            transformer.* + vqgan.* (transformer_{epoch}.pt layout)
  gpt_release_tiny_deepspeed.pt  {"module": transformer.* only, + DeepSpeed's other entries}
  gpt_release_tiny.npz           in/labels int32 [2]; in/codes int32 [2, 64];
                                 out/logits float64 [2, 64, 68]: the GPT on [class id, codes[:-1]]
                                 (class id = 64 + label), in float64 from the float16 weights.
"""
import os
import sys
import types

import numpy as np
import torch

# mingpt imports a sampling helper from transformers at module level; it is not used here.
sys.modules.setdefault("transformers", types.SimpleNamespace(top_k_top_p_filtering=None))
from taming.modules.transformer.mingpt import GPT  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_PT = os.path.join(HERE, "gpt_release_tiny.pt")
OUT_DEEPSPEED = os.path.join(HERE, "gpt_release_tiny_deepspeed.pt")
OUT_NPZ = os.path.join(HERE, "gpt_release_tiny.npz")
TOKENIZER_PTH = os.path.join(HERE, "release_tiny.pth")
CODEBOOK_SIZE, NUM_CLASSES, GRID = 64, 4, 8
LAYERS, HEADS, WIDTH = 2, 2, 32
BLOCK_SIZE = 1 + GRID * GRID


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    model = GPT(vocab_size=CODEBOOK_SIZE + NUM_CLASSES, block_size=BLOCK_SIZE, n_layer=LAYERS,
                n_head=HEADS, n_embd=WIDTH)
    with torch.no_grad():
        model.pos_emb.normal_(0.0, 0.1)
        for name, p in model.named_parameters():
            if "ln" in name:  # LayerNorm scales near 1, biases near 0, all distinct
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02)
    return model.eval()


def reference_logits(model: GPT, labels: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """The release's forward: idx = [class id, codes[:-1]], logits at every position."""
    model = model.double()
    idx = torch.cat([torch.as_tensor(labels[:, None] + CODEBOOK_SIZE),
                     torch.as_tensor(codes[:, :-1])], dim=1).long()
    with torch.no_grad():
        logits, _ = model(idx)
    return logits.numpy()


def main():
    model = tiny_gpt().half()  # the release's float16 weights
    transformer = {f"transformer.{k}": v for k, v in model.state_dict().items()}
    tokenizer = torch.load(TOKENIZER_PTH)["state_dict"]
    vqgan = {f"vqgan.{k}": v.half() if v.is_floating_point() else v
             for k, v in tokenizer.items()}
    torch.save({**transformer, **vqgan}, OUT_PT)
    torch.save({"module": transformer, "buffer_names": [k for k in transformer if "mask" in k],
                "optimizer": None, "global_steps": 10, "dp_world_size": 1,
                "ds_version": "0.9.5"}, OUT_DEEPSPEED)

    rng = np.random.default_rng(0)
    labels = np.array([1, 3], np.int32)
    codes = rng.integers(0, CODEBOOK_SIZE, size=(2, GRID * GRID)).astype(np.int32)
    logits = reference_logits(model, labels, codes)  # from the float16-rounded weights
    np.savez_compressed(OUT_NPZ, **{"in/labels": labels, "in/codes": codes,
                                    "out/logits": logits})
    for path in (OUT_PT, OUT_DEEPSPEED, OUT_NPZ):
        print(path, os.path.getsize(path), "bytes")
    print("logits", logits.shape, "std", logits.std())


if __name__ == "__main__":
    main()
