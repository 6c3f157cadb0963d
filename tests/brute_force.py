"""A second simulator, written for the tests and independent of pp_ext.schedules.simulate.

Where a schedule's figure has no derivation by hand, tests check the closed form
against this simulation as well as against ``simulate``: a bug in the simulator then
cannot move the formula and its expectation together.

Independent means: it reads only a schedule's data (``programs``, ``placement.routes``,
``pipeline_of``) and the cost numbers, and it derives the data dependencies itself
from the routes, not through ``Schedule.dependencies``, ``Placement.locate`` or
``Costs.duration``. It is also another algorithm: a clock over integer time (all
durations scaled by a common denominator) that, at each moment something ends or
arrives, starts the next action of every idle rank whose inputs are there, instead
of the simulator's fixed point over per-rank programs.

Rules (as the papers' figures): a rank runs its program in order, one action at a
time; F at stage s needs F at stage s-1; B or I at stage s needs F at stage s and the
input gradient of stage s+1 (made by I where that stage splits its backward, else by
B); W needs I. A result crossing ranks arrives ``comm`` after it ends. Uniform costs
are per rank and micro-batch, a chunk costing ranks/stages of them; B = I + W.
"""

from __future__ import annotations

import math
from fractions import Fraction

from pp_ext.schedules import Costs, Schedule
from pp_ext.schedules.actions import Action


def _durations(schedule: Schedule, costs: Costs) -> dict[tuple[str, int], Fraction]:
    """(kind, stage) -> duration of one micro-batch's pass."""
    stages = len(schedule.placement.routes[0])
    share = Fraction(schedule.placement.ranks, stages)
    table = {}
    for stage in range(stages):
        if costs.per_stage is not None:  # measured per stage: used as they are
            f, i, w, *fused = (Fraction(x) for x in costs.per_stage[stage])
        else:
            (f, i, w), fused = (
                (Fraction(x) * share for x in (costs.forward, costs.input_grad, costs.weight_grad)),
                [],
            )
        table.update(
            {
                ("F", stage): f,
                ("I", stage): i,
                ("W", stage): w,
                ("B", stage): fused[0] if fused else i + w,
                ("U", stage): Fraction(costs.update),
            }
        )
    return table


def run(
    schedule: Schedule, costs: Costs | None = None
) -> dict[tuple[int, str, int, int], tuple[Fraction, Fraction]]:
    """(rank, kind, micro_batch, chunk) -> (start, end) of every compute action."""
    costs = costs or Costs()
    routes = schedule.placement.routes
    stage_of = {
        slot: (pipeline, stage)
        for pipeline, route in enumerate(routes)
        for stage, slot in enumerate(route)
    }
    programs = [
        [(a.kind.value, a.micro_batch, a.chunk) for a in program if a.kind.is_compute]
        for program in schedule.programs
    ]
    present = {(rank, *action) for rank, program in enumerate(programs) for action in program}
    durations = _durations(schedule, costs)
    comm = Fraction(costs.comm)
    scale = math.lcm(comm.denominator, *(d.denominator for d in durations.values()))
    ticks = {key: int(d * scale) for key, d in durations.items()}
    delay = int(comm * scale)

    def inputs(rank: int, kind: str, mb: int, chunk: int) -> list[tuple[int, str, int, int]]:
        """The actions whose results (rank, kind, mb, chunk) waits for."""
        if kind == "U":
            return []
        pipeline, stage = stage_of[(rank, chunk)]
        route = routes[schedule.pipeline_of[mb] if schedule.pipeline_of else 0]
        if kind == "W":
            return [(rank, "I", mb, chunk)]
        if kind == "F":
            if stage == 0:
                return []
            down_rank, down_chunk = route[stage - 1]
            return [(down_rank, "F", mb, down_chunk)]
        needs = [(rank, "F", mb, chunk)]
        if stage + 1 < len(route):
            up_rank, up_chunk = route[stage + 1]
            split = (up_rank, "I", mb, up_chunk) in present
            needs.append((up_rank, "I" if split else "B", mb, up_chunk))
        return needs

    spans: dict[tuple[int, str, int, int], tuple[int, int]] = {}
    position = [0] * len(programs)
    busy_until = [0] * len(programs)
    clock, left = 0, sum(map(len, programs))
    while left:
        started = True
        while started:  # zero-length actions may let another start at the same tick
            started = False
            for rank, program in enumerate(programs):
                if position[rank] == len(program) or busy_until[rank] > clock:
                    continue
                kind, mb, chunk = program[position[rank]]
                needs = inputs(rank, kind, mb, chunk)
                if all(
                    n in spans and spans[n][1] + (delay if n[0] != rank else 0) <= clock
                    for n in needs
                ):
                    end = clock + ticks[(kind, stage_of[(rank, chunk)][1])]
                    spans[(rank, kind, mb, chunk)] = (clock, end)
                    busy_until[rank] = end
                    position[rank] += 1
                    left -= 1
                    started = True
        if left:
            upcoming = [t for t in busy_until if t > clock]
            upcoming += [end + delay for _, end in spans.values() if end + delay > clock]
            if not upcoming:
                stuck = {
                    rank: program[position[rank]]
                    for rank, program in enumerate(programs)
                    if position[rank] < len(program)
                }
                raise AssertionError(f"brute force: deadlock, waiting ranks {stuck}")
            clock = min(upcoming)  # nothing changes before the next end or arrival
    return {key: (Fraction(s, scale), Fraction(e, scale)) for key, (s, e) in spans.items()}


def makespan(schedule: Schedule, costs: Costs | None = None) -> Fraction:
    """First start to last end of the step (the replicas' reduction, if priced, excluded)."""
    spans = run(schedule, costs).values()
    return max(e for _, e in spans) - min(s for s, _ in spans)


def repeated(schedule: Schedule, steps: int) -> Schedule:
    """``steps`` steps back to back with no flush: micro-batch k of step n is k + n*m."""
    m = schedule.micro_batches
    programs = tuple(
        tuple(
            Action(a.kind, a.micro_batch + n * m, a.chunk)
            for n in range(steps)
            for a in program
            if a.kind.is_compute
        )
        for program in schedule.programs
    )
    return Schedule(
        schedule.name, schedule.placement, m * steps, programs, schedule.pipeline_of * steps
    )


def period(schedule: Schedule, costs: Costs | None = None, steps: int = 8) -> Fraction:
    """Time per step of the step repeated back to back, once the ends of consecutive
    steps are evenly spaced (asserted over the last three steps)."""
    m = schedule.micro_batches
    spans = run(repeated(schedule, steps), costs)
    ends = [max(e for (_, _, mb, _), (_, e) in spans.items() if mb // m == n) for n in range(steps)]
    gaps = {b - a for a, b in zip(ends[-4:], ends[-3:])}
    assert len(gaps) == 1, f"brute force: not periodic after {steps} steps: step ends {ends}"
    return gaps.pop()
