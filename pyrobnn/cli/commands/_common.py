"""Options and steps shared by the commands that write a run directory (``fit``, ``sample``)."""
from __future__ import annotations

import shlex
import sys


def add_parser(sub, name: str, *, help: str, description: str, epilog: str):
    """A subcommand whose --help ends with its examples, laid out as written."""
    import argparse
    return sub.add_parser(name, help=help, description=description, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def add_run_parser(sub, name: str, *, help: str, description: str, epilog: str, what: str, func):
    """A subcommand that writes a run directory: CONFIG, --out and the run-directory options."""
    p = add_parser(sub, name, help=help, description=description, epilog=epilog)
    add_run_options(p, what)
    p.set_defaults(func=func)
    return p


def add_run_options(p, what: str):
    p.add_argument("config", help="TOML run config (see `python -m pydoc pyrobnn.cli.config` for every key)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help=f"run directory (must be empty or absent unless --resume/--overwrite); receives "
                        f"run.json, {what}")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true",
                   help="continue the run in DIR; refused when DIR has nothing to resume or its stored config "
                        "differs from CONFIG (epochs may grow)")
    g.add_argument("--resume-or-start", action="store_true",
                   help="continue the run in DIR when it has a checkpoint, else start a new one there")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run in DIR: the old one is deleted once the new one has written its first "
                        "checkpoint, and put back if the new one fails before that")
    p.add_argument("--force", action="store_true",
                   help="with --resume: continue even though CONFIG differs from the run's stored config")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def resume_command(command: str, args) -> str:
    return shlex.join(["pyrobnn", command, args.config, "--out", args.out, "--resume"])


def report_interrupt(command, guard, args, detail, saved: bool) -> int:
    if saved:
        print(f"pyrobnn {command}: interrupted by {guard.name}: {detail}\n"
              f"resume with: {resume_command(command, args)}", file=sys.stderr)
    else:
        print(f"pyrobnn {command}: interrupted by {guard.name} before anything could be saved; nothing was kept",
              file=sys.stderr)
    return guard.exit_code


def prepare(command: str, args):
    """(config, RunDirectory): the config is validated and the directory checked before any work.
    Under ``torchrun`` only rank 0 owns the directory; the other ranks get ``None`` and follow it."""
    import os

    from pyrobnn.cli.config import load_config
    from pyrobnn.cli.run import open_run
    cfg = load_config(args.config)
    if os.environ.get("RANK", "0") != "0" and "WORLD_SIZE" in os.environ:
        return cfg, None
    run = open_run(args.out, cfg, command, resume=args.resume, resume_or_start=args.resume_or_start,
                   overwrite=args.overwrite, force=args.force)
    return cfg, run
