"""``pp-ext schedule list|show|compare``: inspect the registered schedules.

Generic over :data:`pp_ext.schedules.registry.REGISTRY`: a schedule registered
anywhere in :mod:`pp_ext.schedules` shows up here without a change.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from pp_ext.schedules import render
from pp_ext.schedules.costs import Costs
from pp_ext.schedules.errors import ConstraintError, InvalidScheduleError, ScheduleError
from pp_ext.schedules.grid import step_grid, time_grid
from pp_ext.schedules.lower import lower
from pp_ext.schedules.registry import REGISTRY, ScheduleSpec, get
from pp_ext.schedules.schedule import Schedule
from pp_ext.schedules.simulate import Simulation, SteadyState, simulate, steady_state
from pp_ext.tools.files import check_output_path, write_atomic

from . import CommandError, format_table, positive_int

fmt = render.format_number

COSTS_HELP = (
    "cost model: F,I,W[,comm] per micro-batch and rank (e.g. 1,1,1,0.1; fractions like 1/3 "
    'work), or a JSON file of per-stage costs {"comm": x, "stages": [{"forward": f, '
    '"input_grad": i, "weight_grad": w}, ...]}; default 1,1,1,0 (the papers\' unit costs)'
)


# --------------------------------------------------------------------------- parser


def add_parser(subparsers) -> None:
    group = subparsers.add_parser(
        "schedule",
        help="list, show and compare pipeline schedules",
        description="Inspect the registered pipeline schedules: their programs, "
        "simulated metrics and timeline pictures.",
    )
    commands = group.add_subparsers(
        title="schedule commands", dest="schedule_command", metavar="COMMAND", required=True
    )

    listing = commands.add_parser(
        "list",
        help="registered schedules with their constraints and sources",
        description="Registered schedules: name, summary, constraints, source.",
    )
    listing.add_argument("--json", action="store_true", help="print a JSON list instead of text")
    listing.set_defaults(handler=run_list)

    show = commands.add_parser(
        "show",
        help="one schedule: grid, metrics, pictures",
        description="Build, validate and simulate one schedule; print its rank x "
        "time grid and metrics; optionally draw it (--svg, --png).",
    )
    show.add_argument("name", metavar="NAME", help="schedule name (see 'pp-ext schedule list')")
    _add_sizes(show)
    show.add_argument(
        "--svg", metavar="FILE", help="write the timeline picture as SVG (no dependency)"
    )
    show.add_argument(
        "--png",
        metavar="FILE",
        help=f"write the timeline picture as PNG (needs matplotlib: {render.PLOT_HINT})",
    )
    show.add_argument(
        "--steps",
        action="store_true",
        help="print the program order per rank, with sends and receives, instead of the time grid",
    )
    show.set_defaults(handler=run_show)

    compare = commands.add_parser(
        "compare",
        help="every schedule at the same sizes, one row each",
        description="Simulate every registered schedule that accepts the sizes. "
        "Without --chunks each schedule uses its own default chunks.",
    )
    _add_sizes(compare)
    compare.add_argument(
        "--json", action="store_true", help="print a JSON list of objects instead of a table"
    )
    compare.set_defaults(handler=run_compare)


def _add_sizes(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stages", "-p", type=positive_int, required=True, metavar="P", help="pipeline ranks p"
    )
    parser.add_argument(
        "--micro-batches",
        "-m",
        type=positive_int,
        required=True,
        metavar="M",
        help="micro-batches per step m",
    )
    parser.add_argument(
        "--chunks",
        "-v",
        type=positive_int,
        metavar="V",
        help="chunks (virtual stages) per rank v; default: the schedule's own",
    )
    parser.add_argument("--costs", metavar="F,I,W[,comm] | FILE.json", help=COSTS_HELP)


# --------------------------------------------------------------------------- shared


@dataclass(frozen=True)
class Result:
    spec: ScheduleSpec
    chunks: int
    schedule: Schedule
    simulation: Simulation
    steady: SteadyState


def parse_costs(value: str | None) -> Costs:
    try:
        return Costs.from_option(value)
    except (ValueError, OSError) as exc:
        message = str(exc)
        if "--costs" not in message and "cost file" not in message:
            message = f"--costs {value}: {message}"
        raise CommandError(message) from None


def find_spec(name: str) -> ScheduleSpec:
    try:
        return get(name)
    except ScheduleError as exc:
        raise CommandError(str(exc)) from None


def run_schedule(
    spec: ScheduleSpec, stages: int, micro_batches: int, chunks: int | None, costs: Costs
) -> Result:
    """Build, validate and simulate; raises ConstraintError, InvalidScheduleError or
    ValueError (costs that do not fit the schedule)."""
    chunks = spec.resolve_chunks(chunks)
    schedule = spec.build(stages, micro_batches, chunks)
    simulation = simulate(schedule, costs)
    return Result(spec, chunks, schedule, simulation, steady_state(schedule, costs))


def _invalid(exc: InvalidScheduleError) -> CommandError:
    return CommandError(
        f"the generated schedule is invalid (a bug in its generator): {exc.reason}",
        exit_code=1,
        detail=exc.grid,
    )


def metrics(result: Result) -> dict[str, float | int]:
    return {**result.simulation.metrics(), "steady_bubble_ratio": float(result.steady.bubble_ratio)}


# --------------------------------------------------------------------------- list


def run_list(args: argparse.Namespace) -> int:
    specs = list(REGISTRY.values())
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "name": s.name,
                        "summary": s.summary,
                        "constraints": s.constraints,
                        "source": s.source,
                        "placement": s.placement,
                        "default_chunks": s.default_chunks,
                    }
                    for s in specs
                ],
                indent=2,
            )
        )
        return 0
    width = max([len(s.name) for s in specs] + [len("NAME")])
    print(f"{'NAME'.ljust(width)}  SUMMARY")
    for spec in specs:
        pad = " " * (width + 2)
        print(f"{spec.name.ljust(width)}  {spec.summary}")
        print(f"{pad}constraints: {spec.constraints}")
        print(f"{pad}placement: {spec.placement}, default chunks: {spec.default_chunks}")
        print(f"{pad}source: {spec.source}")
    print(
        f"\n{len(specs)} schedules. 'pp-ext schedule show NAME -p P -m M' prints one; "
        f"'pp-ext schedule compare -p P -m M' compares them."
    )
    return 0


# --------------------------------------------------------------------------- show


def run_show(args: argparse.Namespace) -> int:
    # check everything that can fail before anything is written
    try:
        if args.svg:
            check_output_path(args.svg)
        if args.png:
            check_output_path(args.png)
            render.require_matplotlib()
    except (OSError, ImportError) as exc:
        raise CommandError(str(exc)) from None
    costs = parse_costs(args.costs)
    spec = find_spec(args.name)
    try:
        result = run_schedule(spec, args.stages, args.micro_batches, args.chunks, costs)
    except InvalidScheduleError as exc:
        raise _invalid(exc) from None
    except ValueError as exc:  # ConstraintError, or costs that do not fit the schedule
        raise CommandError(str(exc)) from None

    # draw in memory, then write each file atomically
    try:
        pictures = []
        if args.svg:
            pictures.append(
                (args.svg, render.to_svg(result.simulation, result.steady).encode("utf-8"))
            )
        if args.png:
            pictures.append((args.png, render.png_bytes(result.simulation, result.steady)))
        written = [write_atomic(path, data) for path, data in pictures]
    except (OSError, ImportError) as exc:
        raise CommandError(str(exc)) from None

    print(_show_text(result, costs, args.steps))
    for path in written:
        print(f"wrote {path}")
    return 0


def _show_text(result: Result, costs: Costs, steps: bool) -> str:
    schedule, sim, steady = result.schedule, result.simulation, result.steady
    lines = [
        f"{schedule.name}: {result.spec.summary}",
        f"p={schedule.ranks} m={schedule.micro_batches} v={schedule.chunks}, {schedule.placement.name} "
        f"placement; {render.costs_text(costs)}",
        "",
    ]
    if steps:
        lines.append(
            "program order per rank (sF/sB send an activation/gradient to rank N: >rN; "
            "rF/rB receive one from rank N: <rN)"
        )
        lines.append(step_grid(lower(schedule)))
    else:
        grid = time_grid(sim)
        if grid == step_grid(sim.schedule):
            lines.append(
                "program order per rank (too many time steps for a time grid; see --svg/--png)"
            )
        else:
            lines.append("rank x time ('.' idle, '=' the action goes on)")
        lines.append(grid)
    rows = [
        ("makespan", fmt(sim.makespan), "first start to last end of one step"),
        (
            "bubble ratio",
            fmt(sim.bubble_ratio),
            "flushed: one step ending in a global synchronisation",
        ),
        (
            "steady-state bubble",
            fmt(steady.bubble_ratio),
            f"steps back to back without a flush, period {fmt(steady.period)}",
        ),
        (
            "peak activations",
            fmt(sim.peak_activations),
            "per rank: " + " ".join(fmt(a) for a in sim.peak_activations_per_rank),
        ),
        ("weight copies", fmt(sim.weight_copies), "per rank, in units of the rank's weights"),
        ("messages", str(sim.messages), "tensors sent between ranks per step"),
    ]
    value_width = max(len(value) for _, value, _ in rows)
    lines.append("")
    lines += [f"{name:<20} {value:<{value_width}}   ({note})" for name, value, note in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- compare


def _compare(
    stages: int, micro_batches: int, chunks: int | None, costs: Costs
) -> list[tuple[dict, str]]:
    rows = []
    for spec in REGISTRY.values():
        row: dict = {
            "schedule": spec.name,
            "stages": stages,
            "micro_batches": micro_batches,
            "chunks": spec.resolve_chunks(chunks),
        }
        label = ""
        try:
            row.update(metrics(run_schedule(spec, stages, micro_batches, chunks, costs)))
        except ConstraintError as exc:
            row["error"], label = str(exc), "refuses"
        except InvalidScheduleError as exc:
            row["error"], label = (
                f"invalid schedule (a bug in its generator): {exc.reason}",
                "error",
            )
        except (
            ValueError
        ) as exc:  # costs that do not fit this schedule (per-stage file, other stage count)
            row["error"], label = str(exc), "error"
        rows.append((row, label))
    return rows


_COLUMNS = (
    ("schedule", "schedule"),
    ("stages", "p"),
    ("micro_batches", "m"),
    ("chunks", "v"),
    ("bubble_ratio", "bubble"),
    ("steady_bubble_ratio", "steady"),
    ("peak_activations", "peak act"),
    ("weight_copies", "weights"),
    ("messages", "messages"),
    ("makespan", "makespan"),
)


def run_compare(args: argparse.Namespace) -> int:
    costs = parse_costs(args.costs)
    rows = _compare(args.stages, args.micro_batches, args.chunks, costs)
    if args.json:
        print(json.dumps([row for row, _ in rows], indent=2))
        return 0
    table = [[header for _, header in _COLUMNS]]
    errors = {}
    for row, label in rows:
        if "error" in row:
            cells = [str(row[key]) for key, _ in _COLUMNS[:4]]
            errors[len(table)] = f"{label}: {row['error']}"
            table.append(cells)
        else:
            table.append(
                [
                    fmt(row[key]) if not isinstance(row[key], str) else row[key]
                    for key, _ in _COLUMNS
                ]
            )
    out = sys.stdout
    print(
        f"p={args.stages} m={args.micro_batches}"
        + (f" v={args.chunks}" if args.chunks else " (each schedule at its default chunks v)")
        + f"; {render.costs_text(costs)}",
        file=out,
    )
    print(
        "bubble: flushed step; steady: steps back to back; peak act: micro-batches of a rank's "
        "activations; weights: copies per rank\n",
        file=out,
    )
    for index, text in enumerate(format_table(table)):
        print(f"{text}  {errors[index]}" if index in errors else text, file=out)
    return 0
