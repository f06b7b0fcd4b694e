"""PyTorch side of benchmarks/gpt_vs_torch.py: taming-transformers' minGPT (the release's GPT-LC).

Run by the benchmark with a Python that has torch and taming-transformers (vqlc never imports
this file). It reads one JSON command a line on stdin and answers one JSON line on stdout:

  {"cmd": "build", "spec": {...}}             the model, AdamW and the batch -> {"params": n}
  {"cmd": "train"}                            one optimiser step -> {"t": s, "loss": x}
  {"cmd": "sample", "how": "recompute"|"past", "batch": b, "top_k": k}
      a whole token map -> {"t": s, "tokens": b * codes}; recompute = taming's `sample` (the
      growing prefix through the whole network every step, as the release samples), past =
      taming's `sample_with_past` (its cache of keys and values)
  {"cmd": "prefix", "batch": b, "length": n, "top_k": k}
      one step of taming's `sample` on a prefix of n tokens (class token + n - 1 codes) -> {"t": s}
  {"cmd": "quit"}

The train step is the release's (taming's Net2NetTransformer.shared_step): inputs corrupted with
pkeep (replacement ids drawn from the image codes), the class token in front, F.cross_entropy on
the full [batch * tokens, vocab] logits; AdamW (0.9, 0.95) with minGPT's configure_optimizers
weight decay (linear layers' weights only).
"""
import json
import os
import sys
import time
import types

import torch
import torch.nn.functional as F


def top_k_top_p_filtering(logits, top_k=0, top_p=1.0, filter_value=-float("inf")):
    """transformers' function, top-k part only (what sample_with_past asks with top_p=None)."""
    if top_p is not None and top_p < 1.0:
        raise NotImplementedError("the benchmark samples with top-k only")
    if top_k:
        kth = torch.topk(logits, top_k)[0][..., -1, None]
        logits = logits.masked_fill(logits < kth, filter_value)
    return logits


def import_mingpt():
    """taming's mingpt, importable without `transformers` (newer ones lack the function)."""
    try:
        import transformers
        transformers.top_k_top_p_filtering
    except (ImportError, AttributeError):
        stub = types.ModuleType("transformers")
        stub.top_k_top_p_filtering = top_k_top_p_filtering
        sys.modules["transformers"] = stub
    from taming.modules.transformer import mingpt
    return mingpt


def param_groups(model, weight_decay: float) -> list:
    """minGPT's configure_optimizers: decay Linear weights; not biases, norms, embeddings."""
    decay = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    decayed = {id(p) for p in decay}
    rest = [p for p in model.parameters() if id(p) not in decayed]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": rest, "weight_decay": 0.0}]


class TorchGPT:
    def __init__(self, spec: dict, mingpt):
        torch.manual_seed(spec["seed"])
        self.mingpt, self.spec = mingpt, spec
        self.codebook_size = spec["codebook_size"]
        self.model = mingpt.GPT(vocab_size=spec["codebook_size"] + spec["num_classes"],
                                block_size=spec["num_codes"] + 1, n_layer=spec["num_layers"],
                                n_head=spec["num_heads"], n_embd=spec["width"])
        self.opt = torch.optim.AdamW(param_groups(self.model, spec["weight_decay"]),
                                     lr=spec["lr"], betas=(spec["b1"], spec["b2"]),
                                     eps=spec["eps"])
        self.codes = torch.tensor(spec["codes"], dtype=torch.long)
        self.labels = torch.tensor(spec["labels"], dtype=torch.long)

    def class_tokens(self, labels: torch.Tensor) -> torch.Tensor:
        return (labels + self.codebook_size)[:, None]

    def train_step(self) -> float:
        self.model.train()
        codes = self.codes
        keep = torch.bernoulli(torch.full(codes.shape, self.spec["pkeep"])).bool()
        inputs = torch.where(keep, codes, torch.randint_like(codes, self.codebook_size))
        x = torch.cat([self.class_tokens(self.labels), inputs[:, :-1]], dim=1)
        logits, _ = self.model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), codes.reshape(-1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.item()

    def sample_labels(self, batch: int) -> torch.Tensor:
        return torch.arange(batch) % self.spec["num_classes"]

    def sample(self, how: str, batch: int, top_k: int) -> int:
        self.model.eval()
        c = self.class_tokens(self.sample_labels(batch))
        steps = self.spec["num_codes"]
        if how == "recompute":
            out = self.mingpt.sample(self.model, c, steps, temperature=1.0, sample=True,
                                     top_k=top_k)[:, 1:]
        else:
            out = self.mingpt.sample_with_past(c, self.model, steps, top_k=top_k)
        assert out.shape == (batch, steps), out.shape
        return batch * steps

    def prefix_step(self, batch: int, length: int, top_k: int) -> None:
        self.model.eval()
        codes = torch.randint(self.codebook_size, (batch, length - 1))
        x = torch.cat([self.class_tokens(self.sample_labels(batch)), codes], dim=1)
        self.mingpt.sample(self.model, x, 1, temperature=1.0, sample=True, top_k=top_k)


def handle(gpt, msg: dict) -> dict:
    start = time.perf_counter()
    if msg["cmd"] == "train":
        loss = gpt.train_step()
        return {"t": time.perf_counter() - start, "loss": loss}
    if msg["cmd"] == "sample":
        tokens = gpt.sample(msg["how"], msg["batch"], msg["top_k"])
        return {"t": time.perf_counter() - start, "tokens": tokens}
    if msg["cmd"] == "prefix":
        gpt.prefix_step(msg["batch"], msg["length"], msg["top_k"])
        return {"t": time.perf_counter() - start}
    raise ValueError(f"unknown command {msg['cmd']!r}")


def main():
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library prints go to stderr; stdout carries only the protocol
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    torch.set_num_threads(threads)
    mingpt = import_mingpt()
    gpt = None
    proto.write(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads()})
                + "\n")
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "quit":
            break
        if msg["cmd"] == "build":
            gpt = TorchGPT(msg["spec"], mingpt)
            answer = {"params": sum(p.numel() for p in gpt.model.parameters())}
        else:
            with torch.set_grad_enabled(msg["cmd"] == "train"):
                answer = handle(gpt, msg)
        proto.write(json.dumps(answer) + "\n")


if __name__ == "__main__":
    main()
