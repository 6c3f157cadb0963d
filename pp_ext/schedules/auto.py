"""``auto``: a schedule computed from per-stage costs and a memory limit.

Qi, Wan, Huang and Lin, "Zero Bubble Pipeline Parallelism", ICLR 2024, Sec. 3:
the handmade ZB-H1/H2 are optimal only at equal F, I, W and zero communication;
with measured costs the best order differs, so the paper computes it. This module
is its Sec. 3.1 heuristic (the exact ILP of Sec. 3.2 is :mod:`.auto_ilp`). One chunk
per rank, loop placement, backward split into I and W, micro-batches of each kind
in index order on every rank.

The heuristic lists actions in time order over all ranks at once (a list
scheduler on the cost model) with the paper's rules:

1. warm-up: a rank runs as many forwards as its memory limit allows before its
   first input gradient arrives, which fills the wait for it;
2. an ``I`` that can start goes first (the previous stage waits for its
   gradient), then an ``F``; ``W`` nobody waits for, so it is deferred and goes
   into a gap: one it fits (rule "fit"), any gap (rule "eager"), or a gap too
   short for it when that gap would make this rank's idle time the largest of
   all ranks (rule "bubble", the paper's tie-breaker);
3. a ``W`` is run as soon as the memory limit blocks the next forward, since
   only a ``W`` frees an activation (it still needs the layer input).

The paper also searches the warm-up depth: each policy (W rule, whether I or F
goes first when both can start, and a cap on how many forwards a rank runs
ahead of its input gradients) gives one schedule, and the one with the smallest
makespan on the simulator's cost model wins; the handmade ZB-H1/H2 orders are
kept where they fit the limit and are shorter. Every candidate respects the memory limit by
construction: a rank never holds more than ``memory_limit`` micro-batches of
activations, counted as the simulator's ``peak_activations`` counts them.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from .actions import Action, Kind
from .costs import Costs, Number
from .errors import ConstraintError
from .placement import Placement
from .registry import fixed_chunks, register
from .schedule import Schedule
from .simulate import simulate
from .zero_bubble import zb_h1, zb_h2

W_RULES = ("fit", "eager", "bubble")


@dataclass(frozen=True)
class Policy:
    """One point of the heuristic's search: how W fills gaps, and per rank the most
    forwards it may run ahead of its input gradients (its warm-up depth)."""

    w_rule: str
    depth: tuple[int, ...]
    first: Kind = Kind.I


def memory_limits(stages: int, micro_batches: int, memory_limit: Number | Sequence[Number] | None) -> tuple[int, ...]:
    """Per-rank limits in whole micro-batches of a rank's activations; ``None`` is
    1F1B's memory, ``stages`` micro-batches (what ZB-H1 holds too)."""
    if memory_limit is None:
        limits = [stages] * stages
    elif isinstance(memory_limit, Sequence):
        limits = list(memory_limit)
        if len(limits) != stages:
            raise ConstraintError(f"auto: memory limit gives {len(limits)} ranks, the pipeline has {stages}: "
                                  f"give one number, or one per rank")
    else:
        limits = [memory_limit] * stages
    for rank, limit in enumerate(limits):
        if limit < 1:
            raise ConstraintError(f"auto: memory limit {limit} on rank {rank} is below one micro-batch's "
                                  f"activations (got {limit}): give a limit >= 1")
    # an F holds a whole micro-batch: a fractional limit rounds down; more than m is never used
    return tuple(min(math.floor(limit), micro_batches) for limit in limits)


def policies(limits: Sequence[int]) -> list[Policy]:
    """The search space: every W rule with warm-up depths from 1F1B's (rank r runs
    p-r forwards ahead) up to the memory limit, and flat depths 1 .. limit."""
    p = len(limits)
    depths = {tuple(min(limit, extra + p - rank) for rank, limit in enumerate(limits)) for extra in range(max(limits))}
    depths |= {tuple(min(limit, d) for limit in limits) for d in range(1, max(limits) + 1)}
    return [Policy(rule, depth, first) for first in (Kind.I, Kind.F) for rule in W_RULES for depth in sorted(depths)]


def scaled_costs(stages: int, costs: Costs) -> tuple[list[dict[Kind, Number]], Number, int]:
    """Per-rank F, I, W durations and the comm time, as integers times ``1/scale``
    where every cost is a fraction (exact, and far faster than Fraction arithmetic
    in the scheduler's inner loop); floats stay floats (``scale`` 1)."""
    cost = [{kind: costs.duration(kind, rank, stages, stages) for kind in (Kind.F, Kind.I, Kind.W)}
            for rank in range(stages)]
    values = [v for c in cost for v in c.values()] + [costs.comm]
    if not all(isinstance(v, (int, Fraction)) for v in values):
        return cost, costs.comm, 1
    scale = math.lcm(*(Fraction(v).denominator for v in values))
    return ([{kind: int(v * scale) for kind, v in c.items()} for c in cost], int(costs.comm * scale), scale)


def greedy(stages: int, micro_batches: int, costs: Costs, limits: Sequence[int],
           policy: Policy) -> tuple[list[list[Action]], Number]:
    """The list scheduler of the module doc for one policy: per-rank programs and
    their makespan (each action starts as soon as its rank and inputs allow, so
    this is the simulator's makespan of the same programs)."""
    p, m = stages, micro_batches
    cost, comm, scale = scaled_costs(stages, costs)
    done = {Kind.F: [[None] * m for _ in range(p)], Kind.I: [[None] * m for _ in range(p)]}
    issued = {Kind.F: [0] * p, Kind.I: [0] * p}
    pending: list[deque[int]] = [deque() for _ in range(p)]
    held, free, idle = [0] * p, [0] * p, [0] * p
    programs: list[list[Action]] = [[] for _ in range(p)]

    def arrival(kind: Kind, rank: int) -> Number | None:
        """When the next ``kind`` of ``rank`` could start as far as its inputs go;
        None while they are not scheduled yet (or the rank may not run it)."""
        j = issued[kind][rank]
        if j == m:
            return None
        if kind is Kind.F:
            if held[rank] >= limits[rank] or j - issued[Kind.I][rank] >= policy.depth[rank]:
                return None
            if rank == 0:
                return 0
            end, link = done[Kind.F][rank - 1][j], comm
        else:
            if j >= issued[Kind.F][rank]:
                return None
            if rank == p - 1:
                return done[Kind.F][rank][j]
            end, link = done[Kind.I][rank + 1][j], comm
        return None if end is None else end + link

    def decide(rank: int) -> tuple[Number, Kind] | None:
        now = free[rank]
        ready = {kind: t for kind in (Kind.I, Kind.F) if (t := arrival(kind, rank)) is not None}
        order = (policy.first, Kind.F if policy.first is Kind.I else Kind.I)
        for kind in order:
            if kind in ready and ready[kind] <= now:
                return now, kind
        upcoming = min(ready.values(), default=None)
        if pending[rank]:
            gap = None if upcoming is None else upcoming - now
            memory_bound = issued[Kind.F][rank] < m and held[rank] >= limits[rank]
            if (gap is None or memory_bound or policy.w_rule == "eager" or gap >= cost[rank][Kind.W]
                    or (policy.w_rule == "bubble" and idle[rank] + gap > max(idle))):
                return now, Kind.W
        if upcoming is None:
            return None
        return upcoming, next(kind for kind in order if ready.get(kind) == upcoming)

    # a rank's choice changes only when it or a neighbour (whose results it waits
    # for) commits, or, under the "bubble" rule, when the largest idle time grows
    decisions: list[tuple[Number, Kind] | None] = [decide(rank) for rank in range(p)]
    for _ in range(3 * p * m):
        rank = min((r for r in range(p) if decisions[r] is not None), key=lambda r: (decisions[r][0], r),
                   default=None)
        if rank is None:  # cannot happen with limits >= 1: every micro-batch can go through alone
            raise AssertionError(f"auto heuristic stalled with policy {policy}")
        start, kind = decisions[rank]
        j = pending[rank].popleft() if kind is Kind.W else issued[kind][rank]
        most_idle = max(idle)
        idle[rank] += start - free[rank]
        free[rank] = start + cost[rank][kind]
        programs[rank].append(Action(kind, j))
        if kind is Kind.W:
            held[rank] -= 1
        else:
            done[kind][rank][j] = free[rank]
            issued[kind][rank] += 1
            if kind is Kind.F:
                held[rank] += 1
            else:
                pending[rank].append(j)
        stale = range(p) if policy.w_rule == "bubble" and idle[rank] > most_idle else (rank - 1, rank, rank + 1)
        for r in stale:
            if 0 <= r < p:
                decisions[r] = decide(r)
    return programs, Fraction(max(free), scale) if scale != 1 else max(free)


def heuristic(stages: int, micro_batches: int, costs: Costs, limits: Sequence[int]) -> tuple[list[list[Action]], Number]:
    """The best of :func:`greedy` over :func:`policies` (the first on ties: the least
    memory-hungry), with its makespan."""
    best = None
    for policy in policies(limits):
        programs, makespan = greedy(stages, micro_batches, costs, limits, policy)
        if best is None or makespan < best[1]:
            best = programs, makespan
    return best


def auto_schedule(stages: int, micro_batches: int, costs: Costs | None = None,
                  memory_limit: Number | Sequence[Number] | None = None) -> Schedule:
    """The shortest schedule found for these costs (default: unit costs) under
    ``memory_limit`` micro-batches of activations per rank (default: ``stages``,
    1F1B's): the heuristic's, or the paper's handmade ZB-H1 / ZB-H2 where they fit
    the limit and are shorter (a greedy order can lose a few per cent to them when
    stages differ in cost; this way ``auto`` never does)."""
    costs = costs or Costs()
    limits = memory_limits(stages, micro_batches, memory_limit)
    programs, makespan = heuristic(stages, micro_batches, costs, limits)
    for handmade in (zb_h1, zb_h2):
        candidate = handmade(stages, micro_batches, 1)
        sim = simulate(candidate, costs)
        if sim.makespan < makespan and all(a <= b for a, b in zip(sim.peak_activations_per_rank, limits)):
            programs, makespan = candidate.programs, sim.makespan
    return Schedule("auto", Placement.loop(stages), micro_batches, tuple(map(tuple, programs)))


@register("auto", summary="computed from costs and a memory limit: the Zero Bubble paper's heuristic "
                          "(unit costs and 1F1B's memory when built by name)",
          constraints="chunks = 1; memory limit >= 1 micro-batch per rank (default p)",
          source="Qi et al. 2024 (Zero Bubble Pipeline Parallelism, ICLR), Sec. 3", placement="loop",
          check=fixed_chunks("auto", 1))
def auto(stages: int, micro_batches: int, chunks: int) -> Schedule:
    return auto_schedule(stages, micro_batches)
