"""Simulator: run a schedule on a cost model, without tensors.

Each rank runs its program in order; an action starts when the rank is free and
its inputs are there (a message from another rank arrives ``comm`` after the
action that made it ends). Sends are asynchronous and take no rank time.

Metrics (the figures of ``SCHEDULES.md``):
- ``makespan``: first start to last end of the step (flushed), plus the costs'
  ``replica_reduce`` where two pipelines sum their replicas' gradients (Chimera);
- ``bubble_ratio`` = 1 - sum(busy) / (ranks * makespan);
- ``peak_activations``: most micro-batch activations held at once on a rank, in
  units of one micro-batch's activations of a whole rank's layers; ``F`` of a
  chunk holds ``ranks/stages`` of a unit until its ``B`` (or its ``W`` when the
  backward is split, since W still needs the layer inputs);
- ``weight_copies``: copies of a rank's weights it keeps: replicas (Chimera's two
  pipelines) times the weight versions alive at once (asynchronous schedules
  stash one version per in-flight micro-batch between updates ``U``);
- ``messages``: tensors sent between ranks per step.

Steady state (:func:`steady_state`): the step repeated without a global flush
between steps, each rank starting step n+1 as soon as its own step n is done (the
optimizer post-validation of Qi et al. 2024, Sec. 5). ``period`` is the time per
step once the repetition is periodic; its bubble is the papers' "zero bubble".
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from fractions import Fraction
from typing import NamedTuple

from .actions import Action, Kind
from .costs import Costs, Number
from .errors import InvalidScheduleError
from .grid import step_grid
from .schedule import Schedule


class Span(NamedTuple):
    action: Action
    start: Number
    end: Number


@dataclass(frozen=True)
class Simulation:
    schedule: Schedule
    costs: Costs
    timeline: tuple[tuple[Span, ...], ...]
    makespan: Number
    busy: tuple[Number, ...]
    peak_activations_per_rank: tuple[Number, ...]
    weight_copies: Number
    messages: int

    @property
    def bubble_ratio(self) -> Number:
        if not self.makespan:
            return 0
        return 1 - sum(self.busy) / (self.schedule.ranks * self.makespan)

    @property
    def peak_activations(self) -> Number:
        return max(self.peak_activations_per_rank)

    def metrics(self) -> dict[str, float | int]:
        return {
            "makespan": float(self.makespan),
            "bubble_ratio": float(self.bubble_ratio),
            "peak_activations": float(self.peak_activations),
            "weight_copies": float(self.weight_copies),
            "messages": self.messages,
        }


def _peak_activations(schedule: Schedule, rank: int, program: tuple[Action, ...]) -> Number:
    unit = Fraction(schedule.ranks, schedule.stages)
    held = peak = Fraction(0)
    for action in program:
        if action.kind is Kind.F:
            held += unit
            peak = max(peak, held)
        elif action.kind in (Kind.B, Kind.W):
            held -= unit
    return peak


def _weight_versions(schedule: Schedule, program: tuple[Action, ...]) -> Number:
    """Most weight versions alive at once on a rank, averaged over its chunks: the
    latest, plus each older one a forward used whose backward is still to come (a
    stash), plus each older one later forwards will still use (PipeDream-2BW's
    second buffer, ``Schedule.version_lag``)."""
    if not any(a.kind is Kind.U for a in program):
        return Fraction(1)  # synchronous: one version, updated after the flush
    updates: list[list[int]] = [[] for _ in range(schedule.chunks)]
    pinned: dict[tuple[int, int], int] = {}  # (chunk, mb) -> version its forward used
    stashed = schedule.backward_weights != "corrected"  # PipeMare's backward takes the latest
    next_forward = [0] * schedule.chunks
    most = Fraction(1)
    for action in program:
        chunk = action.chunk
        if action.kind is Kind.U:
            updates[chunk].append(action.micro_batch)
        elif action.kind is Kind.F:
            pinned[action.key()] = schedule.forward_version(updates[chunk], action.micro_batch)
            next_forward[chunk] = action.micro_batch + 1
        elif action.kind in (Kind.B, Kind.W):
            pinned.pop(action.key(), None)
        alive = sum(
            len(
                {v for (c, _), v in pinned.items() if c == chunk and stashed}
                | {
                    len(updates[chunk]),
                    schedule.forward_version(updates[chunk], next_forward[chunk]),
                }
            )
            for chunk in range(schedule.chunks)
        )
        most = max(most, Fraction(alive, schedule.chunks))
    return most


def simulate(schedule: Schedule, costs: Costs | None = None) -> Simulation:
    costs = costs or Costs()
    compute = schedule.compute_only()
    programs = compute.programs
    ranks = len(programs)
    kinds = {a.kind for program in programs for a in program}
    duration, comm, scale = costs.scaled(kinds, ranks, compute.stages)

    def reported(time: Number) -> Number:  # a time of the loop in the costs' units
        return Fraction(time) / scale if scale else time

    finish: dict[tuple[int, Action], Number] = {}
    times: list[list[tuple[Action, Number, Number]]] = [[] for _ in range(ranks)]
    free: list[Number] = [0 if scale else Fraction(0)] * ranks
    pc = [0] * ranks
    progress = True
    while progress:
        progress = False
        for rank in range(ranks):
            while pc[rank] < len(programs[rank]):
                action = programs[rank][pc[rank]]
                deps = compute.dependencies(rank, action)
                if any(dep not in finish for dep in deps):
                    break
                start = max(
                    [free[rank]] + [finish[(r, a)] + (comm if r != rank else 0) for r, a in deps]
                )
                end = start + duration[(action.kind, compute.stage(rank, action))]
                finish[(rank, action)] = end
                times[rank].append((action, start, end))
                free[rank] = end
                pc[rank] += 1
                progress = True
    blocked = [(r, pc[r]) for r in range(ranks) if pc[r] < len(programs[r])]
    if blocked:
        waits = "; ".join(
            f"rank {r} at {programs[r][s]} waits for "
            + ", ".join(
                f"{dep} of rank {d}"
                for d, dep in compute.dependencies(r, programs[r][s])
                if (d, dep) not in finish
            )
            for r, s in blocked
        )
        raise InvalidScheduleError(
            f"deadlock: no rank can go on ({waits})", step_grid(compute, blocked)
        )
    spans = [span for row in times for span in row]
    makespan = (
        reported(max(end for *_, end in spans) - min(start for _, start, _ in spans))
        if spans
        else Fraction(0)
    )
    if schedule.placement.pipelines > 1 and spans:
        makespan += costs.replica_reduce  # after the flush, before the step (Costs.replica_reduce)
    return Simulation(
        schedule=schedule,
        costs=costs,
        timeline=tuple(
            tuple(Span(action, reported(start), reported(end)) for action, start, end in row)
            for row in times
        ),
        makespan=makespan,
        busy=tuple(
            reported(sum(end - start for _, start, end in row))
            if scale
            else sum((end - start for _, start, end in row), Fraction(0))
            for row in times
        ),
        peak_activations_per_rank=tuple(
            _peak_activations(compute, r, p) for r, p in enumerate(programs)
        ),
        weight_copies=schedule.placement.pipelines
        * max((_weight_versions(compute, p) for p in programs), default=Fraction(1)),
        messages=sum(len(compute.outgoing(r, a)) for r, p in enumerate(programs) for a in p),
    )


@dataclass(frozen=True)
class SteadyState:
    period: Number
    bubble_ratio: Number


def repeat(schedule: Schedule, steps: int) -> Schedule:
    """The compute program of ``steps`` consecutive steps with no flush between them:
    micro-batch k of step n becomes k + n*m."""
    compute = schedule.compute_only()
    m = schedule.micro_batches
    programs = tuple(
        tuple(replace(a, micro_batch=a.micro_batch + n * m) for n in range(steps) for a in program)
        for program in compute.programs
    )
    return replace(
        compute,
        micro_batches=m * steps,
        programs=programs,
        pipeline_of=schedule.pipeline_of * steps,
    )


def steady_state(schedule: Schedule, costs: Costs | None = None, steps: int = 6) -> SteadyState:
    """Period and bubble of the step repeated back to back (see the module doc).

    The period is the mean time between the ends of steps ``steps//2`` and
    ``steps`` of the repetition: after a transient of about one step the ends of
    consecutive steps are evenly spaced (max-plus periodic regime), so this is exact
    at unit costs for the schedules here.
    """
    if steps < 2:
        raise ValueError("steady_state needs steps >= 2")
    sim = simulate(repeat(schedule, steps), costs)
    m = schedule.micro_batches
    ends = [
        max(
            (s.end for row in sim.timeline for s in row if s.action.micro_batch // m == n),
            default=0,
        )
        for n in range(steps)
    ]
    first = steps // 2
    period = (ends[-1] - ends[first - 1]) / (steps - first)
    busy = sum(sim.busy) / steps
    return SteadyState(period, 1 - busy / (schedule.ranks * period) if period else 0)
