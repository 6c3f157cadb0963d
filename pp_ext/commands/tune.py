"""``pp-ext tune --recipe R``: measure the recipe's model, search the layouts, write the winner.

Qi et al. 2024 ("Zero Bubble Pipeline Parallelism", ICLR, Sec. 3) show that the
best pipeline schedule depends on the measured F, I (their B), W and communication
times and on the memory at hand, so a schedule is chosen from a profile rather than
guessed. ``tune`` profiles the recipe's own model at its shapes
(:func:`pp_ext.bench.profiler.profile_recipe`; or reads ``--profile``), then simulates
every candidate on the measured per-stage costs:

- schedule: every registered synchronous schedule that accepts the sizes, at each
  chunk count it allows (1-4, at most one layer per stage), plus ``auto`` computed
  from the measured costs under the memory limit (:func:`~pp_ext.schedules.auto.auto_schedule`)
  with one chunk in loop placement and with two in V placement;
- micro-batches: the recipe's count times 1/4 .. 4, each with the micro-batch size
  that keeps the global batch (``micro_batches x micro_batch_size``) exactly, so
  training computes the same thing; each size is measured (the costs are not linear);
- partition: ``parameters``, ``uniform`` and ``balanced`` (the measured layer costs,
  :func:`~pp_ext.planning.partition.balanced_parts`).

With ``parallel.expert: E`` > 1 each MoE layer's all-to-alls are priced in its F and
I from the profile's all-to-all fit (:meth:`~pp_ext.schedules.cost_model.Profile.stage_costs`).

Peak memory per rank = activations (the profile's saved bytes of the rank's layers
for one micro-batch, times the simulator's peak of micro-batches in flight on that
rank, as ``pp-ext plan`` counts them) + weights, gradients and optimizer state
(:mod:`pp_ext.planning.memory`; under a LoRA recipe the frozen base holds its weights
only). Candidates over ``--memory-limit`` are dropped. The
predicted step time is the simulated makespan (the optimizer step, the same for all,
is left out). The winner is written as ``key=value`` lines (``--out``), for
``deepspeed ... launch/train.py --recipe R $(cat FILE)``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pp_ext.planning.search import GIB, Candidate, micro_batch_splits, search
from pp_ext.schedules.cost_model import Profile
from pp_ext.tools.files import write_atomic
from pp_ext.tools.logging import get_logger

from . import CommandError, format_table, positive_int


def add_parser(subparsers) -> None:
    tune = subparsers.add_parser(
        "tune",
        help="profile a recipe's model, search schedule x micro-batches x chunks x partition, write the best",
        description="Measure the recipe's model layer by layer at its shapes (F, I, W, activation bytes, p2p "
        "latency; 2 local ranks, or 1 where one GPU is visible, then p2p is priced at 0), simulate "
        "every schedule x micro-batch split x chunks x partition on the measured costs, drop those over "
        "the memory limit, print them ranked and write the winner's recipe overrides (key=value lines).",
    )
    tune.add_argument("--recipe", required=True, metavar="FILE", help="recipes/NAME.yaml")
    tune.add_argument(
        "--memory-limit",
        type=float,
        default=None,
        metavar="GB",
        help="GiB per rank for weights, gradients, optimizer state and activations (default: no limit)",
    )
    tune.add_argument(
        "--profile",
        metavar="FILE",
        help="read this profile instead of measuring (its micro-batch size only)",
    )
    tune.add_argument(
        "--out",
        metavar="FILE",
        help="overrides file to write (default OUTPUT_DIR/tune.txt); each "
        "measured profile goes beside it as FILE.profile-bSIZE.json",
    )
    tune.add_argument(
        "--repeats", type=positive_int, default=5, help="timed repeats per layer pass (default 5)"
    )
    tune.add_argument(
        "--top", type=positive_int, default=15, help="table rows to print (default 15)"
    )
    tune.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    tune.set_defaults(handler=run_tune)


say = get_logger("pp-ext tune").info


def profile_file(out: Path, micro_batch_size: int) -> Path:
    """Where tune keeps the profile measured at ``micro_batch_size``, beside ``out``."""
    return out.with_name(f"{out.name}.profile-b{micro_batch_size}.json")


def overrides(best: Candidate, profile_path: Path) -> list[str]:
    """The winner as recipe overrides, one ``key=value`` per line (no spaces)."""
    method = best.partition.split("=")[0]  # of methods giving the same cut, the first needs no file
    lines = [
        f"parallel.schedule={best.schedule}",
        f"parallel.micro_batches={best.micro_batches}",
        f"train.micro_batch_size={best.micro_batch_size}",
        f"parallel.chunks={best.chunks}",
        "parallel.partition=" + (f"balanced:{profile_path}" if method == "balanced" else method),
    ]
    if best.schedule == "auto":
        lines.append(f"parallel.profile={profile_path}")
        if best.memory_limit:
            lines.append(f"parallel.memory_limit=[{','.join(map(str, best.memory_limit))}]")
    return lines


def run_tune(args: argparse.Namespace) -> int:
    # torch, deepspeed, omegaconf: only when this command runs (pp_ext.commands)
    from pp_ext.config.recipe import RecipeError, load
    from pp_ext.engine.distributed import select_accelerator

    select_accelerator()  # before deepspeed is first imported
    from pp_ext.bench.profiler import profile_ranks, profile_recipe
    from pp_ext.config.recipe import state_bytes
    from pp_ext.engine.module import partition
    from pp_ext.hf.loading import load_config
    from pp_ext.peft import planned_parameters
    from pp_ext.training.preflight import check_before_launch, recipe_layer_specs

    if args.memory_limit is not None and args.memory_limit <= 0:
        raise CommandError(f"--memory-limit must be > 0 GiB per rank, got {args.memory_limit}")
    try:
        recipe = load(args.recipe, args.overrides)
        data = recipe.parallel.data if recipe.parallel.data != "auto" else 1
        layout, _ = check_before_launch(
            recipe, recipe.parallel.pipeline * recipe.parallel.tensor * data
        )
        pipe, tensor, data, chunks = layout.pipeline, layout.tensor, layout.data, layout.chunks
    except RecipeError as exc:
        raise CommandError(str(exc)) from None
    if tensor > 1:
        raise CommandError(
            f"pp-ext tune profiles whole layers (tensor 1), the recipe has parallel.tensor={tensor}: "
            f"tune with parallel.tensor=1"
        )
    out = Path(args.out or Path(recipe.output_dir) / "tune.txt")
    if out.is_dir():
        raise CommandError(f"--out {out} is a folder: give a file name, e.g. {out / 'tune.txt'}")
    if not out.parent.is_dir():  # found before the profile, not after it
        raise CommandError(
            f"--out {out}: folder {out.parent} does not exist: create it or give --out in an existing one"
        )
    splits = micro_batch_splits(recipe.parallel.micro_batches, recipe.train.micro_batch_size)
    if args.profile:
        try:
            profile = Profile.load(args.profile)
            profile.check_shapes(recipe, args.profile)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        batch = recipe.parallel.micro_batches * recipe.train.micro_batch_size
        if batch % profile.micro_batch_size:
            raise CommandError(
                f"profile {args.profile} measured micro-batches of {profile.micro_batch_size} samples, "
                f"which do not divide the recipe's {batch} samples per step: profile again without "
                f"--profile"
            )
        profiles, profile_path = {profile.micro_batch_size: profile}, Path(args.profile)
        say(f"read {args.profile}: micro-batch size {profile.micro_batch_size} only")
    else:
        ranks = profile_ranks()
        say(
            f"profiling {recipe.model.path} at micro-batch sizes {', '.join(str(b) for _, b in splits)} "
            f"x {recipe.data.seq_len} tokens ({recipe.model.dtype}) on {ranks} local rank(s)"
        )
        if ranks == 1:
            say(
                "one GPU visible: the layers are measured on it; p2p latency, all-reduce and all-to-all need a "
                "second GPU (NCCL takes one rank per GPU) and are priced at 0"
            )
        profiles, profile_path = (
            profile_recipe(recipe, tuple(b for _, b in splits), args.repeats),
            None,
        )
    say("simulating the candidates on the measured costs")
    try:
        specs = recipe_layer_specs(recipe)
        found, dropped = search(
            profiles,
            planned_parameters(specs, recipe.peft, load_config(recipe.model.path)),
            lambda method, stages: partition(specs, stages, method),
            pipe,
            recipe.parallel.micro_batches * recipe.train.micro_batch_size,
            state_bytes(recipe, data),
            args.memory_limit,
            layout.expert,
        )
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    if not found:
        raise CommandError(
            f"no candidate fits --memory-limit {args.memory_limit} GiB per rank ({dropped} over it): "
            f"raise the limit, or lower train.micro_batch_size or data.seq_len"
        )
    best = found[0]
    if profile_path is None:  # every measured size, for later runs with --profile
        for size, profile in profiles.items():
            profile.save(profile_file(out, size))
        profile_path = profile_file(out, best.micro_batch_size)
    write_atomic(out, ("\n".join(overrides(best, profile_path)) + "\n").encode())

    print(
        f"{recipe.model.path}: pipeline {pipe}, {recipe.parallel.micro_batches * recipe.train.micro_batch_size} "
        f"samples x {recipe.data.seq_len} tokens per step and data rank; {len(found)} candidate(s) simulated "
        f"on measured costs"
        + (f", {dropped} over {args.memory_limit} GiB dropped" if args.memory_limit else "")
    )
    rows = [
        [
            "rank",
            "schedule",
            "v",
            "m x b",
            "partition",
            "step s (sim)",
            "bubble",
            "peak GiB per rank",
        ]
    ]
    for index, c in enumerate(found[: args.top], 1):
        rows.append(
            [
                str(index),
                c.schedule,
                str(c.chunks),
                f"{c.micro_batches} x {c.micro_batch_size}",
                c.partition,
                f"{c.step_s:.4f}",
                f"{c.bubble:.3f}",
                " ".join(f"{b / GIB:.3f}" for b in c.memory),
            ]
        )
    print("\n".join(format_table(rows)))
    recipe_step = next(
        (
            c
            for c in found
            if (c.schedule, c.chunks, c.micro_batches)
            == (recipe.parallel.schedule, chunks, recipe.parallel.micro_batches)
            and recipe.parallel.partition in c.partition.split("=")
        ),
        None,
    )
    if recipe_step is not None:
        print(
            f"the recipe's own choice ({recipe_step.schedule}, v={recipe_step.chunks}, {recipe_step.partition}): "
            f"{recipe_step.step_s:.4f} s; the best is {recipe_step.step_s / best.step_s:.3f}x faster (simulated)"
        )
    print(f"wrote {out} (train with: launch/train.py --recipe {args.recipe} $(cat {out}))")
    return 0
