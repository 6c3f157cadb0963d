"""Command groups of the ``pp-ext`` command line (:mod:`pp_ext.cli` dispatches).

Each group is a module of this package named in :data:`GROUPS` that defines
``add_parser(subparsers)``: it adds its own sub-parser (``pp-ext schedule ...``,
``pp-ext bench ...``) and sets
``handler=function(args) -> int`` on each leaf command with ``set_defaults``.
A handler reports a user error by raising :class:`CommandError`; ``pp-ext``
prints it as one line ``pp-ext: error: ...`` on stderr and exits with its code.

Keep heavy imports (torch, deepspeed, transformers, omegaconf) inside the handlers, so that
``pp-ext schedule ...`` starts in milliseconds on a machine without them.
"""

from __future__ import annotations

import argparse

# module names under pp_ext.commands, in the order `pp-ext --help` lists them
GROUPS: tuple[str, ...] = ("schedule", "bench", "plan", "launch", "report", "export", "tune")


class CommandError(Exception):
    """A user error: one line for stderr, an exit code, and optional detail lines
    (e.g. the grid of an invalid schedule) printed after it."""

    def __init__(self, message: str, exit_code: int = 2, detail: str = "") -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.detail = detail


def _int_at_least(least: int, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be >= {least} (got {value})")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(1, text)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(0, text)


def format_table(rows: list[list[str]]) -> list[str]:
    """Rows of cells as text lines, each column as wide as its widest cell."""
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(max(map(len, rows)))]
    return ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]
