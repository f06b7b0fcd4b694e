"""Every file of a run directory (--workdir), named once.

    checkpoints/<step>/         orbax saves (state, data iterator)          vqlc.checkpoint
    config.json                 the run's config                            vqlc.config_io
    metrics.jsonl               training scalars, one record per log step   vqlc.train.reporting
    images/step_<8 digits>.png  reconstruction previews during training
    plots/utilization.png       codebook utilisation over training
    eval/                       metrics.json, metrics.md, code_counts.npy, code_usage.png,
                                reconstructions.png                         vqlc.eval.evaluator
    codebook.npy, codebook.json the LC tokenizer's frozen codebook          vqlc.codebook.frozen
    codebook_features/          features the nested codebook task extracted
    features/                   the codebook task's feature shards

Paths are strings joined with etils.epath, so a gs:// workdir works wherever files are written
through vqlc.atomic_io and read through epath.
"""
from etils import epath

CHECKPOINTS = "checkpoints"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
IMAGES = "images"
PLOTS = "plots"
EVAL = "eval"
CODEBOOK = "codebook.npy"
CODEBOOK_INFO = "codebook.json"
CODEBOOK_FEATURES = "codebook_features"
FEATURES = "features"


def join(workdir, *parts) -> str:
    return str(epath.Path(workdir).joinpath(*parts))


def absolute(workdir) -> str:
    """Local paths made absolute (orbax needs them); remote ones as they are."""
    path = epath.Path(workdir)
    return str(path if "://" in str(workdir) else path.absolute())


def checkpoints(workdir) -> str:
    return join(absolute(workdir), CHECKPOINTS)


def config(workdir) -> str:
    return join(workdir, CONFIG)


def metrics(workdir) -> str:
    return join(workdir, METRICS)


def preview(workdir, step: int) -> str:
    return join(workdir, IMAGES, f"step_{step:08d}.png")


def utilization_plot(workdir) -> str:
    return join(workdir, PLOTS, "utilization.png")


def eval_dir(workdir) -> str:
    return join(workdir, EVAL)


def eval_file(workdir, name: str) -> str:
    """eval/<name>: metrics.json, metrics.md, code_counts.npy, code_usage.png, ..."""
    return join(workdir, EVAL, name)


def codebook(workdir) -> str:
    return join(workdir, CODEBOOK)


def codebook_info(workdir) -> str:
    return join(workdir, CODEBOOK_INFO)


def codebook_features(workdir) -> str:
    return join(workdir, CODEBOOK_FEATURES)


def features(workdir) -> str:
    return join(workdir, FEATURES)
