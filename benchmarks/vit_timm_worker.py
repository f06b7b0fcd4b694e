"""PyTorch side of benchmarks/vit_vs_timm.py: timm's VisionTransformer trained with MAE's
fine-tuning optimiser (AdamW with layer-wise lr decay) on soft targets.

Run by the benchmark (through benchmarks/torch_worker_client.py) with a Python that has torch,
timm and numpy; vqlc never imports this file. Argument: the torch thread count. It reads one JSON
command a line on stdin and answers one JSON line on stdout:

  {"cmd": "build", "spec": {...}, "batch": path}
      the network, the optimiser, and the batch (.npz: images NCHW float32, targets [B, K])
      -> {"params": count}
  {"cmd": "train"}   one optimiser step -> {"t": s, "loss": x, "max_rss_kib": peak RSS so far}
  {"cmd": "quit"}
"""
import json
import os
import resource
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

GOLDEN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests",
                      "golden")


def import_vision_transformer():
    """timm's VisionTransformer (timm imports torchvision: tests/golden/torch_compat imports it
    even where its compiled ops cannot load)."""
    sys.path.insert(0, GOLDEN)
    from torch_compat import import_torchvision
    import_torchvision()
    import timm
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer, timm.__version__


def param_groups(model, depth: int, lr: float, weight_decay: float, layer_decay: float) -> list:
    """MAE's fine-tuning groups: lr * layer_decay ** (depth + 1 - layer id), where the layer id is
    0 for cls_token / pos_embed / patch_embed, i + 1 for blocks.i, depth + 1 for the rest; no
    weight decay on 1-D parameters, cls_token and pos_embed. The same rule as
    vqlc.cls.recipe.make_optimizer, so both sides run the same optimiser."""
    groups = {}
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        if top in ("cls_token", "pos_embed", "patch_embed"):
            layer = 0
        elif top == "blocks":
            layer = int(name.split(".")[1]) + 1
        else:
            layer = depth + 1
        decay = p.ndim > 1 and top not in ("cls_token", "pos_embed")
        group = groups.setdefault((layer, decay), {
            "params": [], "weight_decay": weight_decay if decay else 0.0,
            "lr": lr * layer_decay ** (depth + 1 - layer)})
        group["params"].append(p)
    return list(groups.values())


class TimmViT:
    def __init__(self, spec: dict, batch_path: str, vision_transformer):
        torch.manual_seed(spec["seed"])
        self.model = vision_transformer(
            img_size=spec["image_size"], patch_size=spec["patch_size"], embed_dim=spec["width"],
            depth=spec["depth"], num_heads=spec["num_heads"], global_pool="avg", fc_norm=True,
            drop_path_rate=spec["drop_path"], num_classes=spec["num_classes"])
        # MAE's main_finetune.py re-initialises the head (vqlc.cls.vit does the same).
        torch.nn.init.trunc_normal_(self.model.head.weight, std=2e-5)
        self.opt = torch.optim.AdamW(
            param_groups(self.model, spec["depth"], spec["lr"], spec["weight_decay"],
                         spec["layer_decay"]), lr=spec["lr"])
        with np.load(batch_path) as batch:
            self.images = torch.from_numpy(batch["images"].copy())
            self.targets = torch.from_numpy(batch["targets"].copy())

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def train_step(self) -> float:
        self.model.train()
        logits = self.model(self.images)
        loss = torch.sum(-self.targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


def main():
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library prints go to stderr; stdout carries only the protocol
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    torch.set_num_threads(threads)
    vision_transformer, timm_version = import_vision_transformer()
    proto.write(json.dumps({"torch": torch.__version__, "timm": timm_version,
                            "threads": torch.get_num_threads()}) + "\n")
    vit = None
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "quit":
            break
        if msg["cmd"] == "build":
            vit = TimmViT(msg["spec"], msg["batch"], vision_transformer)
            answer = {"params": vit.num_params()}
        elif msg["cmd"] == "train":
            start = time.perf_counter()
            loss = vit.train_step()
            answer = {"t": time.perf_counter() - start, "loss": loss,
                      "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
        else:
            raise ValueError(f"unknown command {msg['cmd']!r}")
        proto.write(json.dumps(answer) + "\n")


if __name__ == "__main__":
    main()
