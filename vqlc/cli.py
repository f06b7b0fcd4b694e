"""One flag library for every command line (vqlc.main, vqlc.figures, vqlc.convert, vqlc.fid).

Each command defines its flags on its own `absl.flags.FlagValues` (so importing one command
never clashes with another's flags, and tests can call `main(argv)` in-process), parses with
:func:`parse`, and reports a user's mistake with :func:`usage_error` (exit status 2 and one line
on stderr, no traceback). Shared flags (--config, --workdir, --distributed) mean the same
everywhere.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Sequence

from absl import flags
from ml_collections import config_flags

from vqlc import extras

# What a command raises for bad input it could not have caught earlier (or for an optional
# package that is not installed): reported in one line, not traced.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
               extras.MissingExtra)


def new_flags() -> flags.FlagValues:
    return flags.FlagValues()


def define_config(fv: flags.FlagValues, help: str = "Python config file.",
                  required: bool = True):
    """--config=<file.py> [--config.a.b=v ...]; locked, so a typo'd field is an error."""
    holder = config_flags.DEFINE_config_file("config", None, help, flag_values=fv,
                                             lock_config=True)
    if required:
        flags.mark_flag_as_required("config", flag_values=fv)
    return holder


def define_workdir(fv: flags.FlagValues,
                   help: str = "Run directory: checkpoints, metrics, outputs.",
                   required: bool = True):
    holder = flags.DEFINE_string("workdir", None, help, flag_values=fv)
    if required:
        flags.mark_flag_as_required("workdir", flag_values=fv)
    return holder


def define_export_source(fv: flags.FlagValues):
    """--workdir (a tokenizer's training workdir) and --step: what an export command reads."""
    workdir = define_workdir(fv, "Training workdir to export (config.json, checkpoints/, and "
                                 "codebook.npy for an LC tokenizer).")
    step = flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the "
                                "newest).", lower_bound=0, flag_values=fv)
    return workdir, step


def define_distributed(fv: flags.FlagValues):
    return flags.DEFINE_bool(
        "distributed", None,
        "Join JAX's multi-process runtime (jax.distributed.initialize). Unset: "
        "VQLC_DISTRIBUTED=1/0 decides, else on when VQLC_COORDINATOR_ADDRESS is set or a "
        "multi-process SLURM step or TPU VM slice is detected (see vqlc/distributed.py and "
        "launch/).", flag_values=fv)


def usage_error(prog: str, message: str, fv: flags.FlagValues | None = None):
    """Exits with status 2 and `prog: message` on stderr (plus a usage hint)."""
    hint = f"\nTry: python -m {prog} --help" if fv is not None else ""
    print(f"{prog}: {message}{hint}", file=sys.stderr)
    raise SystemExit(2)


def _underscored(arg: str) -> str:
    """--max-images=3 -> --max_images=3: flag names may be written with dashes too."""
    if not arg.startswith("--"):
        return arg
    name, eq, value = arg[2:].partition("=")
    return "--" + name.replace("-", "_") + eq + value


def parse(fv: flags.FlagValues, argv: Sequence[str], prog: str, doc: str = "") -> list[str]:
    """Parses `argv` (without the program name) into `fv`; returns the positional arguments.
    Flag names may use dashes or underscores.
    --help prints `doc` and the flags and exits 0; a bad flag exits 2."""
    try:
        argv = [_config_by_name(_underscored(a)) for a in argv]
    except ValueError as e:
        usage_error(prog, str(e), fv)
    if any(a in ("-h", "--help", "--helpfull", "-help") for a in argv):
        print((doc or "").strip() + "\n\nflags:\n" + fv.get_help())
        raise SystemExit(0)
    try:
        return fv([prog, *argv])[1:]
    except flags.Error as e:
        usage_error(prog, str(e), fv)
    except extras.MissingExtra as e:  # a config that imports an optional package
        usage_error(prog, str(e))


def config_names() -> list[str]:
    """The configs shipped in vqlc/configs, by the names --config accepts."""
    import vqlc.configs
    folder = os.path.dirname(vqlc.configs.__file__)
    return sorted(n[:-3] for n in os.listdir(folder) if n.endswith(".py") and n[0] != "_")


def shipped_config_path(value: str) -> str:
    """'<name>[:variant]' of a config shipped in vqlc/configs -> '<its file>[:variant]';
    an unknown name is a ValueError listing the shipped ones."""
    name, sep, variant = value.partition(":")
    if name not in config_names():
        raise ValueError(f"--config={value}: no config named {name!r}; shipped configs: "
                         f"{', '.join(config_names())} (or give a file path).")
    import vqlc.configs
    return os.path.join(os.path.dirname(vqlc.configs.__file__), name + ".py") + sep + variant


def shipped_config(value: str):
    """The ConfigDict of '<name>[:variant]', a config shipped in vqlc/configs."""
    import importlib
    shipped_config_path(value)  # checks the name
    name, _, variant = value.partition(":")
    return importlib.import_module(f"vqlc.configs.{name}").get_config(variant)


def _config_by_name(arg: str) -> str:
    """--config=<name>[:variant] (a config shipped in vqlc/configs, so that an installed
    package runs it) becomes that file's path; a path (with a '/' or '.py') stays."""
    for prefix in ("--config=", "-config="):
        if arg.startswith(prefix):
            value = arg[len(prefix):]
            name = value.partition(":")[0]
            if not name or "/" in name or os.sep in name or name.endswith(".py"):
                return arg
            return prefix + shipped_config_path(value)
    return arg


def parse_subcommand(positional: Sequence[str], choices: Sequence[str], prog: str) -> str:
    """The one positional argument naming what to do, checked against `choices`."""
    if len(positional) != 1 or positional[0] not in choices:
        got = " ".join(positional) or "nothing"
        usage_error(prog, f"expected one of {', '.join(choices)} as the first argument; "
                          f"got {got}.")
    return positional[0]


class _QuietLibraries(logging.Filter):
    """Keeps orbax's, grain's and jax's INFO chatter out of the console; warnings pass."""

    def filter(self, record):
        return record.levelno >= logging.WARNING or not any(
            f"/{lib}/" in record.pathname for lib in ("orbax", "grain", "jax"))


def setup_logging() -> None:
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    for handler in root.handlers:
        if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
            handler.addFilter(_QuietLibraries())


def main_wrapper(prog: str, main: Callable[[], int | None]) -> Callable[[], int]:
    """Runs `main()` turning USER_ERRORS into `prog: error: ...` and exit status 2."""
    def wrapped() -> int:
        try:
            return main() or 0
        except USER_ERRORS as e:
            usage_error(prog, str(e))
    return wrapped
