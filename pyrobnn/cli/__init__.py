"""``pyrobnn`` command line. Subcommands are discovered from the modules of :mod:`pyrobnn.cli.commands`,
each defining ``register(subparsers)``; a feature adds its command by adding one module.

Command modules import torch, Pyro and the rest of pyrobnn inside their ``run`` functions only, so
``pyrobnn --help`` answers without importing them.

Every error is one line on stderr (``pyrobnn COMMAND: error: ...``) and a non-zero exit status: 2 for
bad input (config, arguments, files), 1 for anything else; ``--debug`` shows the traceback instead.
Ctrl-C exits with 130 (SIGTERM 143); a closed pipe (``pyrobnn info FILE | head``) ends quietly.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from . import commands

EPILOG = """\
examples, a run from start to finish (config keys: python -m pydoc pyrobnn.cli.config):
  pyrobnn fit run.toml --out runs/digits            # SVI; Ctrl-C then --resume continues bit-identically
  pyrobnn report runs/digits                        # plots and an HTML page from the run's ArviZ file
  pyrobnn distill distill.toml --teacher runs/digits --out runs/student
  pyrobnn sample sgld.toml --out runs/digits-sgld   # SGLD / pSGLD chains
  pyrobnn report runs/digits-sgld

`pyrobnn COMMAND --help` explains each option of a command.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyrobnn", description="Bayesian neural networks on Pyro.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        if hasattr(module, "register"):
            module.register(sub)
    return parser


def _one_line(e: BaseException) -> str:
    """The first line of an exception's message (Pyro appends a multi-line "Trace Shapes" table)."""
    text = str(e).split("Trace Shapes:")[0].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines) if lines else type(e).__name__


def _quiet_stdout():
    """After a broken pipe: point stdout at /dev/null so the interpreter's final flush cannot fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted before or after the command
    parser = build_parser()
    args = parser.parse_args([a for a in argv if a != "--debug"])
    args.debug = debug
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    name = args.command + (f" {args.dwp_command}" if getattr(args, "dwp_command", None) else "")
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's final flush
        return code
    except BrokenPipeError:
        _quiet_stdout()
        return 141  # 128 + SIGPIPE, what a tool killed by the closed pipe would report
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"pyrobnn {name}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError, NotImplementedError) as e:
        if args.debug:
            raise
        # bad input is reported as one clear line, not a traceback
        print(f"pyrobnn {name}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 — anything else is still one line (traceback with --debug)
        if args.debug:
            raise
        print(f"pyrobnn {name}: error: {type(e).__name__}: {_one_line(e)} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1
