"""``pp-ext launch``: DeepSpeed's launcher, the ``deepspeed`` command with the same
arguments, after the recipe has been checked in the launcher's own process::

    pp-ext launch --num_gpus 2 launch/train.py --recipe recipes/quickstart.yaml [key=value ...]

``deepspeed`` starts the ranks first, and each checks the recipe once it has imported
torch, deepspeed and transformers (tens of seconds); here the same checks
(:func:`pp_ext.training.entry.checked`, for the number of ranks DeepSpeed's runner
will start) run before any rank exists, so a mistake is one line, exit code 2,
nothing started and nothing written. Then DeepSpeed's runner runs in this process
(``deepspeed.launcher.runner.main``, what the ``deepspeed`` command is), at log level
``warning`` unless the arguments set one: its and its per-node launcher's INFO lines
(the command lines, the world info, "exits successfully") are not the training log.
Without a hostfile the level is ``error``: the runner's one WARNING then says only that
it runs on local resources, which the run's first line already shows.
"""

from __future__ import annotations

import argparse
import os

from . import CommandError


def add_parser(subparsers) -> None:
    # "+": no option is pp-ext's, every argument is deepspeed's (--help prints deepspeed's)
    parser = subparsers.add_parser(
        "launch",
        prefix_chars="+",
        add_help=False,
        help="deepspeed's launcher, after the recipe is checked (same arguments as deepspeed)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "deepspeed_args",
        nargs=argparse.REMAINDER,
        metavar="[deepspeed options] launch/train.py --recipe RECIPE [key=value ...]",
    )
    parser.set_defaults(handler=run)


def world_size(ds_args: argparse.Namespace) -> int:
    """The number of ranks DeepSpeed's runner starts for ``ds_args``: its hostfile (or
    this machine's devices), ``--include``/``--exclude``, ``--num_nodes``/``--num_gpus``,
    through the runner's own functions (as ``deepspeed.launcher.runner.main``)."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.launcher import runner

    pool = runner.fetch_hostfile(ds_args.hostfile) if os.path.isfile(ds_args.hostfile) else None
    if not pool:
        pool = {"localhost": get_accelerator().device_count()}
    active = runner.parse_inclusion_exclusion(pool, ds_args.include, ds_args.exclude)
    active = runner.apply_num_nodes_and_gpus(active, ds_args.num_nodes, ds_args.num_gpus)
    return sum(len(slots) for slots in active.values())


def run(args: argparse.Namespace) -> int:
    from pp_ext.engine.distributed import select_accelerator

    select_accelerator()  # before deepspeed is imported; the ranks inherit the choice
    from deepspeed.launcher import runner

    from pp_ext.training import entry
    from pp_ext.training.errors import USER_ERRORS

    argv = list(args.deepspeed_args)
    ds_args = runner.parse_args(argv)  # deepspeed's own parser: its usage errors, its --help
    if not any(a.startswith("--log_level") or a in ("-q", "--quiet") for a in argv):
        # the runner's INFO lines are noise; without a hostfile its only WARNING says the
        # run is local, which ``world_size`` already found and the first log line says
        local = not os.path.isfile(ds_args.hostfile)
        argv.insert(0, f"--log_level={'error' if local else 'warning'}")
    ranks = world_size(ds_args)
    if ranks:  # none: the runner says it has no resources
        try:
            entry.checked(entry.parse_args(ds_args.user_args), ranks)
        except USER_ERRORS as exc:
            raise CommandError(" ".join(str(exc).split())) from None
    runner.main(argv)  # exits with a rank's code if one fails
    return 0
