"""The `ddlp` command line."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys


# the commands most people start with come first in `ddlp --help`; the rest follow by name
FIRST = ("quickstart", "train", "evaluate", "predict", "whatif")


def command_modules() -> list[str]:
    """Modules of ddlp/commands/: each defines add_parser(subparsers) and imports nothing heavy
    at module level, so `ddlp --help` stays fast. A new module there is a new command."""
    from . import commands
    names = [m.name for m in pkgutil.iter_modules(commands.__path__)]
    return sorted(names, key=lambda n: (FIRST.index(n) if n in FIRST else len(FIRST), n))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ddlp", description="Deep Dynamic Latent Particles: "
                                 "object-centric video prediction with latent particles.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    for module in command_modules():
        importlib.import_module(f"ddlp.commands.{module}").add_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "fn", None):
        ap.print_help()
        return 0
    from .config import ConfigError
    from .convert import ConversionError
    from .train import TrainingError
    try:
        return args.fn(args)
    except (ConfigError, ConversionError, FileNotFoundError, ValueError, TrainingError) as e:
        print(f"ddlp {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
