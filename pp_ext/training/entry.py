"""The training job: recipe -> pipeline (x tensor x data) ranks -> fine-tuned HF model.

Run by the ``deepspeed`` launcher, one process per rank::

    deepspeed --num_gpus 2 launch/train.py --recipe recipes/quickstart.yaml train.steps=100

(``launch/train.py`` chooses DeepSpeed's accelerator before this module imports deepspeed.)

Every user error (recipe, world size, schedule constraints, missing files, model
against tokenizer and data: :mod:`pp_ext.training.preflight`) is found before the process
group starts where it can be, and is one line on stderr from rank 0 with exit code 2
on every rank; one found later by some ranks stops every rank the same way.
"""

from __future__ import annotations

import argparse
import os

from pp_ext.config.layout import Layout
from pp_ext.config.recipe import load
from pp_ext.config.schema import Recipe
from pp_ext.engine.boundary import ignore_deepspeed_deprecations
from pp_ext.engine.engine import PipelineError
from pp_ext.schedules import Schedule
from pp_ext.tools.logging import EVERY_RANK, get_logger
from pp_ext.training.errors import USAGE_ERROR, USER_ERRORS
from pp_ext.training.preflight import check_before_launch, check_data, check_expert_runs
from pp_ext.training.trainer import Trainer

log = get_logger()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="launch/train.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", required=True, help="recipes/NAME.yaml")
    # set by `deepspeed`
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    return parser.parse_args(argv)


def checked(args: argparse.Namespace, world_size: int) -> tuple[Recipe, Layout, Schedule | None]:
    """The recipe of ``args`` checked for ``world_size`` ranks, with its layout and
    prebuilt schedule (:func:`check_before_launch`); raises one of ``USER_ERRORS``. Run
    on every rank, and by ``pp-ext launch`` before any rank starts."""
    recipe = load(args.recipe, args.overrides)
    layout, prebuilt = check_before_launch(recipe, world_size)
    check_expert_runs(recipe, layout)
    if recipe.data.path is not None:
        check_data(recipe)  # bad data fails here, not on one rank later
    return recipe, layout, prebuilt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    ignore_deepspeed_deprecations()
    try:
        return Trainer(*checked(args, world_size)).train()
    except USER_ERRORS as exc:  # the user's to fix: one line
        log.error(f"error: {' '.join(str(exc).split())}")
        return USAGE_ERROR
    except PipelineError as exc:  # every rank says where it was: rank 0 may be the one that died
        log.error(f"error: {exc}", extra=EVERY_RANK)
        return 1
