"""Time and peak memory of converting a full-size DiT-LC / SiT-LC release checkpoint.

    # 1. a random DiT-XL/2 checkpoint in the release's layout (torch; ~11 GB on disk with opt)
    /work/venv-torch/bin/python benchmarks/convert_dit.py checkpoint --out=/tmp/dit_xl.pt \\
        [--opt=adam|none]
    # 2. a tokenizer workdir with the LC f16 latent shape 16x16x8 (vqlc's venv)
    python benchmarks/convert_dit.py tokenizer --out=/tmp/lc16_tok
    # 3. the conversion itself
    /usr/bin/time -v python -m vqlc.convert --config=dit_lc_imagenet --src=/tmp/dit_xl.pt \\
        --dst=/tmp/dit_xl_converted --tokenizer=/tmp/lc16_tok
    # read "Elapsed (wall clock) time" and "Maximum resident set size" from time's report

The checkpoint is `{"model", "ema", "opt", "args": argparse.Namespace}` as dit-lc/train.py saves
it: DiT-XL/2 (28 blocks, width 1152, 16 heads, patch 2) over 16x16x8 latents, 1,000 classes +
null, learned sigma, float32, built from the torch reference of
tests/golden/make_dit_release_golden.py (DiT's module names) with random weights (`ema` and
`model` differ); `--opt=adam` adds AdamW's two moment tensors per parameter (as the release's
files hold them: the file is then ~4x the weights, 10.8 GB), `--opt=none` an AdamW state
without moments (2.7 GB per weight set, 5.4 GB). The converter reads only the `ema` tensors,
lazily, so `opt` costs it disk reads of the zip's directory, not memory.

The tokenizer step writes tests/tiny_tokenizer.py's random tokenizer at 32 px with f2, whose
latents are 16x16x8 like imagenet_lc's at 256 px with f16: the conversion needs only the latent
shape and the tokenizer's identity (loading the real imagenet_lc tokenizer adds its own
~0.6 GB of weights and codebook).
"""
import argparse
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_checkpoint(out: str, opt: str) -> None:
    import torch
    sys.path.insert(0, os.path.join(ROOT, "tests", "golden"))
    from make_dit_release_golden import DiT
    start = time.time()
    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = DiT(16, 2, 8, 1152, 28, 16, 1000)
        with torch.no_grad():
            for name, p in net.named_parameters():
                if name != "pos_embed":
                    p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1] if p.ndim > 1 else 1152))
        nets.append(net)
    model, ema = nets
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    opt_state = optimizer.state_dict()
    if opt == "adam":  # the moments AdamW keeps per parameter after a step
        for i, p in enumerate(model.parameters()):
            if p.requires_grad:
                opt_state["state"][i] = {"step": torch.tensor(400_000.0),
                                         "exp_avg": torch.randn_like(p) * 1e-3,
                                         "exp_avg_sq": torch.rand_like(p) * 1e-6}
    args = argparse.Namespace(model="DiT-XL/2", num_classes=1000, image_size=256,
                              latent_size=16, embed_dim=8, global_batch_size=256,
                              start_epoch=80, results_dir="train_logs/dit_lc_100K_f16")
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt_state,
                "args": args}, out)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: {os.path.getsize(out) / 1e9:.2f} GB, {params:,} parameters per set "
          f"(pos_embed included), opt={opt}, {time.time() - start:.0f} s")


def make_tokenizer(out: str) -> None:
    from tests import tiny_tokenizer
    tiny_tokenizer.make_workdir(out, **{"data.image_size": 32})
    from vqlc.tokenizer import Tokenizer
    tok = Tokenizer.load(out)
    side = tok.image_size // tok.downsample_factor
    print(f"wrote {out}: latents {side}x{side}x{tok.latent_dim}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["checkpoint", "tokenizer"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--opt", choices=["adam", "none"], default="adam")
    a = parser.parse_args()
    if a.what == "checkpoint":
        make_checkpoint(a.out, a.opt)
    else:
        make_tokenizer(a.out)


if __name__ == "__main__":
    main()
