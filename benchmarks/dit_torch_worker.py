"""PyTorch side of benchmarks/dit_vs_torch.py: DiT's network (facebookresearch/DiT models.py
names and math) trained with DiT's loss, and sampled with DiT's respaced ancestral sampler and
SiT's dopri5 ODE solve (torchdiffeq).

Run by the benchmark with a Python that has torch, numpy and torchdiffeq (vqlc never imports
this file). The network is the from-scratch reference of tests/golden/make_dit_release_golden.py
(not a copy). It reads one JSON command a line on stdin and answers one JSON line on stdout:

  {"cmd": "build", "name": n, "geometry": {...}, "seed": s, "weights": path}
      a DiT with random weights (see `randomise`), written to `weights` (.npz of its state_dict)
      for the JAX side to load -> {"params": count}
  {"cmd": "forward", "name": n, "x": NCHW list, "t": [B], "y": [B]}
      the network's output -> {"out": NCHW list} (the weight-copy check)
  {"cmd": "train_setup", "name": n, "latents": NCHW list, "labels": [B], "class_dropout": p,
   "lr": lr}
      a copy of the model for training, AdamW(lr, weight_decay 0) and the batch -> {}
  {"cmd": "train", "name": n}      one optimiser step -> {"t": s, "loss": x}
  {"cmd": "ddpm", "name": n, "steps": k, "labels": [B], "seed": s}
      DiT's p_sample_loop on the schedule respaced to k steps -> {"t": s}
  {"cmd": "dopri5", "name": n, "x0": NCHW list, "labels": [B], "atol": a, "rtol": r}
      SiT's ODE sample (torchdiffeq dopri5 from t = 0 to 1) -> {"t": s, "nfe": n, "x1": list}
  {"cmd": "quit"}

Sampling uses the built (initial) weights, never the trained copy, so both frameworks sample the
same network.
"""
import copy
import json
import math
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(os.path.dirname(HERE), "tests", "golden")
TRAIN_STEPS = 1000


def import_reference():
    sys.path.insert(0, GOLDEN)
    import make_dit_release_golden
    return make_dit_release_golden


def randomise(model, seed: int):
    """Every weight N(0, 1 / fan_in) (biases and the label table: 1 / width), like the golden's
    `randomised`: DiT's own adaLN-Zero init makes the network the zero map, which would make
    the weight check vacuous and the ODE trivial. The adaLN modulations are scaled by 1/4 more
    so a 12-block residual stream stays of order 1."""
    torch.manual_seed(seed)
    width = model.pos_embed.shape[-1]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "pos_embed":
                continue
            fan_in = p.shape[1] * (p[0][0].numel() if p.ndim == 4 else 1) if p.ndim > 1 \
                else width
            std = 1.0 / math.sqrt(fan_in)
            if "adaLN_modulation" in name:
                std *= 0.25
            p.normal_(0.0, std)
    return model


# ------------------------------------------------------------------------ DiT's diffusion math

class Diffusion:
    """The parts of DiT's GaussianDiffusion (linear betas, LEARNED_RANGE variance, LossType.MSE)
    the benchmark needs, on `betas` (float64) and `timestep_map` (index -> original step)."""

    def __init__(self, betas, timestep_map=None):
        b = np.asarray(betas, np.float64)
        ac = np.cumprod(1.0 - b)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = b * (1.0 - ac_prev) / (1.0 - ac)
        self.num_steps = len(b)
        self.alphas_cumprod = ac
        self.timestep_map = torch.as_tensor(np.arange(len(b)) if timestep_map is None
                                            else timestep_map, dtype=torch.long)
        self.coef = {
            "sqrt_ac": np.sqrt(ac), "sqrt_1m_ac": np.sqrt(1.0 - ac),
            "sqrt_recip_ac": np.sqrt(1.0 / ac), "sqrt_recipm1_ac": np.sqrt(1.0 / ac - 1.0),
            # log of the posterior variance, its 0 at t = 0 replaced by the value at t = 1
            "post_logvar": np.log(np.append(post_var[1], post_var[1:])),
            "log_beta": np.log(b),
            "mean_c1": b * np.sqrt(ac_prev) / (1.0 - ac),
            "mean_c2": (1.0 - ac_prev) * np.sqrt(1.0 - b) / (1.0 - ac)}

    def at(self, name, t, ndim=4):
        """coefficient[t] as float32 [B, 1, 1, 1] (DiT's _extract_into_tensor)."""
        v = torch.from_numpy(self.coef[name])[t].float()
        return v.reshape(-1, *([1] * (ndim - 1)))

    def posterior(self, x0, xt, t):
        """mean and log variance of q(x_{t-1} | x_t, x_0)."""
        mean = self.at("mean_c1", t) * x0 + self.at("mean_c2", t) * xt
        return mean, self.at("post_logvar", t).expand_as(xt)

    def reverse(self, out, xt, t):
        """The model's p(x_{t-1} | x_t): mean and learned-range log variance."""
        c = xt.shape[1]
        eps, v = out[:, :c], out[:, c:]
        frac = (v + 1.0) / 2.0
        log_var = frac * self.at("log_beta", t) + (1.0 - frac) * self.at("post_logvar", t)
        x0 = self.at("sqrt_recip_ac", t) * xt - self.at("sqrt_recipm1_ac", t) * eps
        mean, _ = self.posterior(x0, xt, t)
        return mean, log_var

    def loss(self, model, x0, y):
        """DiT's training_losses (MSE + hybrid VLB for the learned variance), batch mean."""
        t = torch.randint(0, self.num_steps, (x0.shape[0],))
        noise = torch.randn_like(x0)
        xt = self.at("sqrt_ac", t) * x0 + self.at("sqrt_1m_ac", t) * noise
        out = model(xt, self.timestep_map[t], y)
        c = x0.shape[1]
        eps = out[:, :c]
        # The VLB trains only the variance: its mean comes from a frozen epsilon.
        frozen = torch.cat([eps.detach(), out[:, c:]], dim=1)
        true_mean, true_logvar = self.posterior(x0, xt, t)
        mean, logvar = self.reverse(frozen, xt, t)
        kl = 0.5 * (-1.0 + logvar - true_logvar + torch.exp(true_logvar - logvar)
                    + (true_mean - mean) ** 2 * torch.exp(-logvar))
        kl = kl.mean(dim=(1, 2, 3)) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar)
        nll = nll.mean(dim=(1, 2, 3)) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
        return (mse + vb).mean()


def approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log P(x) per element on a 256-level grid over [-1, 1], open-ended outer bins (nats)."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def linear_betas(n=TRAIN_STEPS):
    scale = 1000.0 / n
    return np.linspace(scale * 1e-4, scale * 0.02, n, dtype=np.float64)


def space_timesteps(num_timesteps: int, count: int) -> list:
    """DiT's space_timesteps for one section: `count` indices spread over the steps, both ends
    kept, the stride accumulated as a float and each position rounded."""
    stride = (num_timesteps - 1) / (count - 1) if count > 1 else 1
    kept, position = set(), 0.0
    for _ in range(count):
        kept.add(round(position))
        position += stride
    return sorted(kept)


def spaced_diffusion(count: int) -> Diffusion:
    """SpacedDiffusion: new betas from the kept alphas_cumprod, the network sees the originals."""
    full = Diffusion(linear_betas())
    kept = space_timesteps(full.num_steps, count)
    ac = full.alphas_cumprod[kept]
    betas = 1.0 - ac / np.append(1.0, ac[:-1])
    return Diffusion(betas, kept)


# ------------------------------------------------------------------------------------ worker

class Worker:
    def __init__(self):
        self.ref = import_reference()
        self.models, self.train = {}, {}

    def build(self, name, geometry, seed, weights):
        g = geometry
        model = self.ref.DiT(g["input_size"], g["patch"], g["channels"], g["width"], g["depth"],
                             g["heads"], g["num_classes"])
        model = randomise(model, seed).eval()
        self.models[name] = model
        np.savez(weights, **{k: v.numpy() for k, v in model.state_dict().items()})
        return {"params": sum(p.numel() for p in model.parameters() if p.requires_grad)}

    def forward(self, name, x, t, y):
        with torch.no_grad():
            out = self.models[name](torch.tensor(x), torch.tensor(t), torch.tensor(y))
        return {"out": out.tolist()}

    def train_setup(self, name, latents, labels, class_dropout, lr, seed=0):
        torch.manual_seed(seed)
        model = copy.deepcopy(self.models[name]).train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0)
        self.train[name] = dict(model=model, opt=opt, x=torch.tensor(latents),
                                y=torch.tensor(labels), dropout=class_dropout,
                                diffusion=Diffusion(linear_betas()),
                                null=model.y_embedder.embedding_table.num_embeddings - 1)
        return {}

    def train_step(self, name):
        s = self.train[name]
        y = s["y"]
        drop = torch.rand(y.shape[0]) < s["dropout"]  # DiT's LabelEmbedder.token_drop
        y = torch.where(drop, torch.full_like(y, s["null"]), y)
        loss = s["diffusion"].loss(s["model"], s["x"], y)
        s["opt"].zero_grad(set_to_none=True)
        loss.backward()
        s["opt"].step()
        return loss.item()

    def ddpm(self, name, steps, labels, seed):
        """DiT's p_sample_loop (clip_denoised=False, no guidance) on the respaced schedule."""
        model, diffusion = self.models[name], spaced_diffusion(steps)
        torch.manual_seed(seed)
        y = torch.tensor(labels)
        c, side = model.x_embedder.proj.in_channels, model.pos_embed.shape[1]
        side = int(round(side ** 0.5)) * model.patch
        x = torch.randn(len(labels), c, side, side)
        for i in reversed(range(diffusion.num_steps)):
            t = torch.full((len(labels),), i, dtype=torch.long)
            out = model(x, diffusion.timestep_map[t], y)
            mean, log_var = diffusion.reverse(out, x, t)
            if i > 0:
                x = mean + torch.exp(0.5 * log_var) * torch.randn_like(x)
            else:
                x = mean
        return x

    def dopri5(self, name, x0, labels, atol, rtol):
        """SiT's ODE sampler for a velocity model on the linear path: t from 0 to 1."""
        import torchdiffeq
        model = self.models[name]
        y = torch.tensor(labels)
        x0 = torch.tensor(x0)
        nfe = [0]

        def velocity(t, x):
            nfe[0] += 1
            return model(x, torch.ones(x.shape[0]) * t, y)[:, :x.shape[1]]

        xs = torchdiffeq.odeint(velocity, x0, torch.tensor([0.0, 1.0]), method="dopri5",
                                atol=atol, rtol=rtol)
        return xs[-1], nfe[0]


def handle(w: Worker, msg: dict) -> dict:
    cmd = msg.pop("cmd")
    if cmd == "build":
        return w.build(**msg)
    if cmd == "train_setup":
        return w.train_setup(**msg)
    start = time.perf_counter()
    if cmd == "forward":
        return w.forward(**msg)
    if cmd == "train":
        with torch.enable_grad():
            loss = w.train_step(msg["name"])
        return {"t": time.perf_counter() - start, "loss": loss}
    with torch.no_grad():
        if cmd == "ddpm":
            w.ddpm(**msg)
            return {"t": time.perf_counter() - start}
        if cmd == "dopri5":
            x1, nfe = w.dopri5(**msg)
            return {"t": time.perf_counter() - start, "nfe": nfe, "x1": x1.tolist()}
    raise ValueError(f"unknown command {cmd!r}")


def main():
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library prints go to stderr; stdout carries only the protocol
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    torch.set_num_threads(threads)
    worker = Worker()
    proto.write(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads()})
                + "\n")
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "quit":
            break
        proto.write(json.dumps(handle(worker, msg)) + "\n")


if __name__ == "__main__":
    main()
