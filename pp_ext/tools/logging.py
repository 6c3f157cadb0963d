"""One logger for what pp-ext says while it works (progress, decisions, errors): on
stderr, each line prefixed with the program's name, from rank 0 only unless a message
is for every rank (as torchtitan's ``tools/logging.py``). What a command prints as its
result (a table, JSON) is its output and goes to stdout with ``print``.
"""

from __future__ import annotations

import logging
import os
import sys


def rank() -> int:
    """This process's global rank under a launcher (``RANK``); 0 outside one."""
    return int(os.environ.get("RANK", "0"))


class _Stderr(logging.StreamHandler):
    """sys.stderr as it is at each line, not as it was at set-up (pytest's capture,
    a caller's redirection)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # logging.StreamHandler sets it in __init__
        pass


class _RankZero(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "every_rank", False) or rank() == 0


EVERY_RANK = {"every_rank": True}  # ``log.error(message, extra=EVERY_RANK)``: said on each rank


def get_logger(program: str = "pp-ext") -> logging.Logger:
    """The logger whose lines read ``program: message`` (``pp-ext``, ``pp-ext tune``, ...)."""
    name = "pp_ext" + "".join(f".{word}" for word in program.split()[1:])
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = _Stderr()
        handler.setFormatter(logging.Formatter(f"{program}: %(message)s"))
        handler.addFilter(_RankZero())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # the program's own lines, not also a root handler's
    return logger
