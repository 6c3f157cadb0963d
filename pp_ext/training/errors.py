"""What the user fixes (one line on stderr, exit code 2), as opposed to a bug (a
traceback), and how every rank learns of one that some ranks found."""

from __future__ import annotations

from contextlib import contextmanager

import torch.distributed as dist

from pp_ext.checkpoint.export import ExportError
from pp_ext.config.recipe import RecipeError
from pp_ext.peft.config import PeftError

USAGE_ERROR = 2  # the exit code of a user error, as argparse's
USER_ERRORS = (RecipeError, FileNotFoundError, ExportError, PeftError)


@contextmanager
def together():
    """The block on this rank, then a meeting of every rank (a barrier): if the block
    raised a user error on any rank, every rank raises the first one (rank 0 says it),
    rather than one rank stopping while the others wait for it in a collective until
    it is gone ("Connection closed by peer")."""
    error = None
    try:
        yield
    except USER_ERRORS as exc:
        error = " ".join(str(exc).split())
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    if first := next((e for e in errors if e is not None), None):
        raise RecipeError(first)
