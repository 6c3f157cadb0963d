"""``pp-ext``: the command line. A small dispatcher over the command groups of
:mod:`pp_ext.commands` (``pp-ext schedule``, ``bench``, ``plan``, ``report``, ``export``, ``tune``).

Exit codes: 0 success, 2 a usage error (one line ``pp-ext: error: ...`` on
stderr), 1 an internal failure reported by a command.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from . import __version__
from .commands import GROUPS, CommandError
from .tools.logging import EVERY_RANK, get_logger
from .tools.versions import UnsupportedVersion, require_versions

log = get_logger()


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line: ``pp-ext: error: ...``."""

    def error(self, message: str) -> NoReturn:
        where = self.prog[len("pp-ext") :].strip() if self.prog.startswith("pp-ext") else self.prog
        prefix = f"{where}: " if where else ""
        self.exit(2, f"pp-ext: error: {prefix}{message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="pp-ext",
        description="Pipeline-parallel schedules for DeepSpeed: list, show, "
        "compare and draw every schedule before running it.",
    )
    parser.add_argument("--version", action="version", version=f"pp-ext {__version__}")
    subparsers = parser.add_subparsers(
        title="commands", dest="command", metavar="COMMAND", required=True
    )
    for group in GROUPS:
        importlib.import_module(f"pp_ext.commands.{group}").add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    try:
        if args.command != "schedule":  # the others build or read models: torch, transformers, ...
            require_versions()
        return int(args.handler(args) or 0)
    except CommandError as exc:
        message = " ".join(str(exc).split("\n"))
        log.error(f"error: {message}", extra=EVERY_RANK)
        if exc.detail:  # a picture (a schedule's grid), printed as it is
            print(exc.detail, file=sys.stderr)
        return exc.exit_code
    except UnsupportedVersion as exc:  # also a DeepSpeed without the engine's hooks
        log.error(f"error: {exc}", extra=EVERY_RANK)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted", extra=EVERY_RANK)
        return 130
    except BrokenPipeError:  # e.g. `pp-ext schedule list | head -1`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
