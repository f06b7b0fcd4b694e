"""The paper's analysis figures from trained workdirs, as PNGs.

    python -m vqlc.figures utilization --workdir runs/lc --workdir runs/vq --out util.png
    python -m vqlc.figures token_replacement --workdir runs/lc --n 1,2,5,10,50 \\
        --max-images 256 --out tr.png --json tr.json
    python -m vqlc.figures tsne --workdir runs/lc --out tsne.png [--max-codes 5000]

utilization: codebook utilisation over training (metrics.jsonl), one line per run.
token_replacement: PSNR on the evaluation split when every token is replaced by its n-th
  nearest code (n = 1: ordinary quantisation), one line per run.
tsne: t-SNE of each run's codebook in the quantizer's latent space, active codes (used at least
  once in the evaluation, <workdir>/eval/code_counts.npy) green, inactive blue, a panel per run.
Labels default to the quantizer kind and K from each workdir's config.json; --label overrides
(once per --workdir, in order).
"""
import json
import os
import sys
from types import SimpleNamespace

from absl import flags

from vqlc import cli

PROG = "vqlc.figures"
FIGURES = ("utilization", "token_replacement", "tsne")
# Flags that only some figures read; any other figure refuses them.
_ONLY_FOR = {"n": ("token_replacement",), "max_images": ("token_replacement",),
             "batch_size": ("token_replacement",), "json": ("token_replacement",),
             "max_codes": ("tsne",), "compute_usage": ("tsne",), "seed": ("tsne",)}


def _error(message: str):
    cli.usage_error(PROG, message)


def _parse_ns(text: str) -> list[int]:
    from vqlc.neighbors import MAX_RANK
    try:
        ns = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        _error(f"--n must be comma-separated integers such as 1,2,5,10; got {text!r}")
    if not ns or ns[0] < 1 or ns[-1] > MAX_RANK:
        _error(f"--n values must lie in [1, {MAX_RANK}]; got {text!r}")
    return ns


def _define_flags() -> flags.FlagValues:
    """A fresh set per call: repeated flags (--workdir) accumulate across parses otherwise."""
    fv = cli.new_flags()
    flags.DEFINE_multi_string("workdir", None, "a training workdir; repeat for several runs",
                              flag_values=fv)
    flags.mark_flag_as_required("workdir", flag_values=fv)
    flags.DEFINE_multi_string("label", None, "legend label per --workdir (default: quantizer "
                              "kind and K)", flag_values=fv)
    flags.DEFINE_string("out", "", "PNG to write (default: <figure>.png)", flag_values=fv)
    flags.DEFINE_string("title", "", "figure title", flag_values=fv)
    flags.DEFINE_string("n", "1,2,5,10,50", "token_replacement: comma-separated ranks; ranks "
                        "above a run's K are skipped for that run", flag_values=fv)
    flags.DEFINE_integer("max_images", 256, "token_replacement: evaluation images to use (0: "
                         "the whole split, held in memory)", flag_values=fv)
    flags.DEFINE_integer("batch_size", 0, "token_replacement: images per encode/decode call "
                         "(default: the run's eval.batch_size)", flag_values=fv)
    flags.DEFINE_string("json", "", "token_replacement: also write the numbers here",
                        flag_values=fv)
    flags.DEFINE_integer("max_codes", 5000, "tsne: codes shown per run; larger codebooks are "
                         "subsampled evenly, keeping the active/inactive ratio", flag_values=fv)
    flags.DEFINE_bool("compute_usage", False, "tsne: count code usage over the evaluation "
                      "split here instead of reading <workdir>/eval/code_counts.npy",
                      flag_values=fv)
    flags.DEFINE_integer("seed", 0, "tsne: t-SNE random seed", flag_values=fv)
    return fv


def _parse(argv) -> SimpleNamespace:
    fv = _define_flags()
    figure = cli.parse_subcommand(cli.parse(fv, argv, PROG, __doc__), FIGURES, PROG)
    for name, figures in _ONLY_FOR.items():
        if fv[name].present and figure not in figures:
            _error(f"--{name} applies to {' and '.join(figures)}, not {figure}.")
    args = SimpleNamespace(figure=figure, **{name: fv[name].value for name in fv})
    args.out = args.out or f"{figure}.png"
    args.n = _parse_ns(args.n)
    return args


def _labels(args) -> list[str]:
    from vqlc.eval import analysis
    for w in args.workdir:
        try:
            analysis.check_workdir(w)
        except FileNotFoundError as e:
            _error(str(e))
    if args.label and len(args.label) != len(args.workdir):
        _error(f"got {len(args.label)} --label for {len(args.workdir)} --workdir; give "
                     f"one per workdir or none.")
    return args.label or [analysis.run_label(w) for w in args.workdir]


def _utilization(args, labels) -> None:
    from vqlc.eval import analysis
    from vqlc.train import reporting
    curves = []
    for w, label in zip(args.workdir, labels):
        try:
            steps, util = analysis.load_utilization(w)
        except (FileNotFoundError, ValueError) as e:
            _error(str(e))
        curves.append((label, reporting.read_metrics(w)))
        print(f"{label:<24} {len(steps):5d} points, steps {steps[0]}-{steps[-1]}, utilisation "
              f"first {100 * util[0]:.1f}%, last {100 * util[-1]:.1f}%, "
              f"min {100 * util.min():.1f}%")
    analysis.plot_utilization_runs(curves, args.out, title=args.title)


def _token_replacement(args, labels) -> None:
    from vqlc import Tokenizer
    from vqlc.eval import analysis
    results, table = [], {}
    for w, label in zip(args.workdir, labels):
        tok = Tokenizer.load(w)
        ns = [n for n in args.n if n <= tok.codebook_size]
        if len(ns) < len(args.n):
            print(f"note: {label}: skipping n > K = {tok.codebook_size}: "
                  f"{[n for n in args.n if n > tok.codebook_size]}", file=sys.stderr)
        if not ns:
            _error(f"no --n value within {label}'s codebook size {tok.codebook_size}")
        images = analysis.eval_images(tok.config, args.max_images, args.batch_size or None)
        r = analysis.token_replacement(tok, images, ns, batch_size=args.batch_size or None)
        results.append((label, r))
        table[label] = {"workdir": os.path.abspath(w), "step": tok.step,
                        **{k: v for k, v in r.items() if k != "psnr_per_image"}}
    analysis.plot_token_replacement(results, args.out, title=args.title)
    all_ns = sorted({n for _, r in results for n in r["n"]})
    print(f"PSNR (dB) on {results[0][1]['num_images']} evaluation images when each token is "
          f"replaced by its n-th nearest code")
    print(f"{'n':>6} " + " ".join(f"{label:>20}" for label, _ in results))
    for n in all_ns:
        cells = [f"{dict(zip(r['n'], r['psnr'])).get(n, float('nan')):20.3f}" for _, r in results]
        print(f"{n:>6} " + " ".join(cells))
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(table, f, indent=2)
        print(f"wrote {args.json}")


def _tsne(args, labels) -> None:
    from vqlc import Tokenizer
    from vqlc.eval import analysis
    if args.max_codes < 3:
        _error(f"--max-codes must be at least 3; got {args.max_codes}")
    panels = []
    for w, label in zip(args.workdir, labels):
        tok = Tokenizer.load(w)
        if args.compute_usage:
            counts = analysis.compute_code_counts(tok, analysis.eval_image_batches(tok.config))
        else:
            try:
                counts = analysis.load_code_counts(w)
            except FileNotFoundError as e:
                _error(str(e))
        r = analysis.codebook_tsne(tok, counts, max_codes=args.max_codes, seed=args.seed)
        panels.append((label, r))
        print(f"{label:<24} active {r['num_active']:7d}  inactive {r['num_inactive']:7d}  "
              f"utilisation {100 * r['utilization']:.2f}%  shown {len(r['ids'])}")
    analysis.plot_tsne(panels, args.out, title=args.title)


def main(argv=None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    labels = _labels(args)
    {"utilization": _utilization, "token_replacement": _token_replacement,
     "tsne": _tsne}[args.figure](args, labels)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
