"""``auto``: a schedule computed from per-stage costs and a memory limit.

Qi, Wan, Huang and Lin, "Zero Bubble Pipeline Parallelism", ICLR 2024, Sec. 3:
the handmade ZB-H1/H2 are optimal only at equal F, I, W and zero communication;
with measured costs the best order differs, so the paper computes it. ``auto``
searches, for the costs and the memory it is given:

- placements: one chunk per rank in loop placement (the paper's Sec. 3), and two
  chunks per rank in V placement (the ZB-V shape of Qi, Wan, Amar and Lin,
  "Pipeline Parallelism with Controllable Memory", NeurIPS 2024, and of the Zero
  Bubble paper's appendix: the model cut into 2p stages, chunk 0 of rank r holds
  stage r and chunk 1 stage 2p-1-r, so the first and the loss stage share rank 0
  and a heavy head can be balanced against a light embedding); with ``replicas=2``
  also Chimera's bidirectional placement (two copies of the weights);
- orders: for loop and V placement, the paper's Sec. 3.1 heuristic below (the exact
  ILP of Sec. 3.2 is :mod:`.auto_ilp`, loop placement only), plus every registered
  synchronous schedule of that placement (ZB-H1/H2, 1F1B, GPipe; ZB-V, DualPipeV;
  Chimera) that fits the memory limit, so ``auto`` is never longer than any of them.

The heuristic lists actions in time order over all ranks at once (a list
scheduler on the cost model) with the paper's rules, the backward split into I
and W, each chunk's micro-batches of each kind in index order:

1. warm-up: a rank runs as many forwards as its memory limit allows before its
   first input gradient arrives, which fills the wait for it;
2. an ``I`` that can start goes first (the previous stage waits for its
   gradient), then an ``F``; ``W`` nobody waits for, so it is deferred and goes
   into a gap: one it fits (rule "fit"), any gap (rule "eager"), or a gap too
   short for it when that gap would make this rank's idle time the largest of
   all ranks (rule "bubble", the paper's tie-breaker);
3. a ``W`` is run as soon as the memory limit blocks the next forward, since
   only a ``W`` frees an activation (it still needs the layer input).

With two chunks a rank runs its deeper chunk first where both can (depth-first, as
ZB-V), and may leave a ready pass waiting a little for a preferred one about to
arrive (a list scheduler that never waits cannot hold ZB-V's turn at rank p-1
together; ``patience``). A micro-batch started on a V rank
must later hold both chunks' activations (its chunk-1 forward comes before its
chunk-0 backward), so a rank starts a new micro-batch only while a whole
micro-batch's room is left: the list scheduler then never deadlocks on memory.

The paper also searches the warm-up depth: each policy (W rule, whether I or F
goes first when both can start, patience, and a cap on how many chunk forwards a
rank runs ahead of its input gradients) gives one schedule, and the one with the
smallest makespan on the simulator's cost model wins (see :func:`heuristic`). Every
candidate respects the memory limit: a rank never holds more than
``memory_limit`` micro-batches of its activations, counted as the simulator's
``peak_activations`` counts them (one chunk's forward holds 1/chunks of a unit
until its W).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from functools import lru_cache

from .actions import Action, Kind
from .costs import Costs, Number
from .errors import ConstraintError
from .placement import Placement
from .registry import REGISTRY, register, require
from .schedule import Schedule
from .simulate import simulate

W_RULES = ("fit", "eager", "bubble")


PATIENCE = (Fraction(0), Fraction(1, 4), Fraction(1, 2))


@dataclass(frozen=True)
class Policy:
    """One point of the heuristic's search: how W fills gaps, per rank the most chunk
    forwards it may run ahead of its input gradients before it starts a new
    micro-batch (its warm-up depth), which kind goes first when both can start, and
    how long a rank leaves a ready pass waiting for one it prefers that is about to
    arrive (``patience``, in its mean pass times)."""

    w_rule: str
    depth: tuple[int, ...]
    first: Kind = Kind.I
    patience: Fraction = Fraction(0)


def layouts(stages: int, replicas: int = 1) -> list[Placement]:
    """The placements ``auto`` searches: loop x 1 chunk, V x 2 chunks, and with
    ``replicas`` >= 2 (and p even) Chimera's bidirectional x 2."""
    found = [Placement.loop(stages), Placement.v(stages, 2)]
    if replicas >= 2 and stages % 2 == 0:
        found.append(Placement.bidirectional(stages))
    return found


def memory_limits(
    stages: int, micro_batches: int, memory_limit: Number | Sequence[Number] | None, chunks: int = 1
) -> tuple[int, ...]:
    """Per-rank limits in whole chunk activations (``chunks`` per micro-batch of a
    rank's activations); ``None`` is 1F1B's memory, ``stages`` micro-batches (what
    ZB-H1 and ZB-V hold too)."""
    limits: list[Number]
    if memory_limit is None:
        limits = [stages] * stages
    elif isinstance(memory_limit, Sequence):
        limits = list(memory_limit)
        if len(limits) != stages:
            raise ConstraintError(
                f"auto: memory limit gives {len(limits)} ranks, the pipeline has {stages}: "
                f"give one number, or one per rank"
            )
    else:
        limits = [memory_limit] * stages
    for rank, limit in enumerate(limits):
        if limit < 1:
            raise ConstraintError(
                f"auto: memory limit {limit} on rank {rank} is below one micro-batch's "
                f"activations (got {limit}): give a limit >= 1"
            )
    # an F holds a whole chunk: a fractional limit rounds down; more than m micro-batches is never used
    return tuple(
        min(math.floor(Fraction(limit) * chunks), chunks * micro_batches) for limit in limits
    )


def warmup_depths(limits: Sequence[int], chunks: int = 1) -> list[tuple[int, ...]]:
    """Warm-up depths from 1F1B's (rank r runs chunks*(p-r) chunk forwards ahead) up
    to the memory limit, and flat depths 1 .. limit."""
    p = len(limits)
    depths = {
        tuple(min(limit, extra + chunks * (p - rank)) for rank, limit in enumerate(limits))
        for extra in range(max(limits))
    }
    depths |= {tuple(min(limit, d) for limit in limits) for d in range(1, max(limits) + 1)}
    return sorted(depths)


def policies(
    limits: Sequence[int],
    depths: Sequence[tuple[int, ...]] | None = None,
    patience: Sequence[Fraction] = (Fraction(0),),
) -> list[Policy]:
    """Every W rule, first kind and ``patience`` for each of ``depths`` (default:
    :func:`warmup_depths`, one chunk)."""
    return [
        Policy(rule, depth, first, wait)
        for wait in patience
        for first in (Kind.I, Kind.F)
        for rule in W_RULES
        for depth in (warmup_depths(limits) if depths is None else depths)
    ]


@lru_cache(maxsize=16)  # the same for every policy of a search (read-only)
def scaled_costs(
    placement: Placement, costs: Costs
) -> tuple[list[dict[Kind, Number]], Number, int]:
    """Per-stage F, I, W durations and the comm time, as integers times ``1/scale``
    where every cost is a fraction (exact, and far faster than Fraction arithmetic
    in the scheduler's inner loop); floats stay floats (``scale`` 1)."""
    kinds = (Kind.F, Kind.I, Kind.W)
    table, comm, scale = costs.scaled(kinds, placement.ranks, placement.stages)
    return (
        [{kind: table[(kind, stage)] for kind in kinds} for stage in range(placement.stages)],
        comm,
        scale or 1,
    )


def greedy(
    placement: Placement, micro_batches: int, costs: Costs, limits: Sequence[int], policy: Policy
) -> tuple[list[list[Action]], Number]:
    """The list scheduler of the module doc for one policy on a one-pipeline
    placement (``limits`` in chunk activations per rank): per-rank programs and their
    makespan (each action starts as soon as its rank and inputs allow, so this is the
    simulator's makespan of the same programs)."""
    orders, makespan = _greedy(placement, micro_batches, costs, limits, policy)
    return [[Action(*action) for action in order] for order in orders], makespan


def _greedy(
    placement: Placement, micro_batches: int, costs: Costs, limits: Sequence[int], policy: Policy
) -> tuple[list[list[tuple[Kind, int, int]]], Number]:
    """:func:`greedy` with each action as (kind, micro-batch, chunk): a search builds
    actions only for the program it keeps."""
    p, v, m, last = placement.ranks, placement.chunks, micro_batches, placement.stages - 1
    cost, comm, scale = scaled_costs(placement, costs)
    stage_of = [[placement.holds(r, c)[1] for c in range(v)] for r in range(p)]
    rank_of = [placement.locate(0, s)[0] for s in range(placement.stages)]
    # a rank prefers its deeper chunk (nearer the loss on the way down, the ZB-V order)
    chunk_order = [sorted(range(v), key=lambda c: -stage_of[r][c]) for r in range(p)]
    other = Kind.F if policy.first is Kind.I else Kind.I
    # how long a rank leaves a ready action waiting for one it prefers: patience x its mean pass
    wait = [
        policy.patience * sum(cost[s][k] for s in stage_of[r] for k in cost[s]) / (3 * v)
        for r in range(p)
    ]
    if all(isinstance(x, int) for x in [comm, *(x for c in cost for x in c.values())]):
        # exact costs (integers times 1/scale): scale the waits too, so the loop compares integers only
        factor = math.lcm(*(Fraction(w).denominator for w in wait))
        cost = [{kind: value * factor for kind, value in c.items()} for c in cost]
        comm, scale, wait = comm * factor, scale * factor, [int(w * factor) for w in wait]
    F, I, W = Kind.F, Kind.I, Kind.W  # noqa: E741 - the paper's names; locals, for the inner loop
    order = [
        [(kind, c) for kind in (policy.first, other) for c in chunk_order[r]] for r in range(p)
    ]
    # when each stage's F and I of each micro-batch ends (None: not scheduled yet)
    done: dict[Kind, list[list[Number | None]]] = {
        F: [[None] * m for _ in range(placement.stages)],
        I: [[None] * m for _ in range(placement.stages)],
    }
    issued = {F: [[0] * v for _ in range(p)], I: [[0] * v for _ in range(p)]}
    ahead = [0] * p  # chunk forwards whose I has not run
    forwards = [0] * p  # chunk forwards run
    pending: list[deque[tuple[int, int]]] = [
        deque() for _ in range(p)
    ]  # (chunk, micro-batch) of W's to run
    held = [0] * p
    free: list[Number] = [0] * p
    idle: list[Number] = [0] * p
    programs: list[list[tuple[Kind, int, int]]] = [[] for _ in range(p)]
    depth, w_rule = policy.depth, policy.w_rule

    def decide(rank: int) -> tuple[Number, tuple[Kind, int]] | None:
        """The rank's next action and its start. For each kind in ``order`` its arrival:
        when the next pass of that kind and chunk could start as far as its inputs go
        (None while they are not scheduled yet, or the rank may not run it)."""
        now = free[rank]
        patient = now + wait[rank]
        # the earliest arrival, and the first kind in ``order`` that arrives then
        upcoming: tuple[Number, tuple[Kind, int]] | None = None
        for key in order[rank]:
            kind, chunk = key
            j = issued[kind][rank][chunk]
            if j == m:
                continue
            stage = stage_of[rank][chunk]
            if kind is F:
                if (
                    chunk == 0
                ):  # a micro-batch's first chunk here: within the depth, and room for all its chunks
                    if held[rank] + v > limits[rank] or ahead[rank] >= depth[rank]:
                        continue
                elif held[rank] >= limits[rank]:
                    continue
                ready = 0 if stage == 0 else done[F][stage - 1][j]
                handover = stage > 0 and rank_of[stage - 1] != rank
            else:
                if j >= issued[F][rank][chunk]:
                    continue
                # the last stage's I follows its own F, another's the next stage's I
                ready = done[F][stage][j] if stage == last else done[I][stage + 1][j]
                handover = stage < last and rank_of[stage + 1] != rank
            if ready is None:
                continue
            if handover:
                ready += comm
            if ready <= patient:
                return (ready if ready > now else now), key
            if upcoming is None or ready < upcoming[0]:
                upcoming = ready, key
        if pending[rank]:
            gap = None if upcoming is None else upcoming[0] - now
            memory_bound = forwards[rank] < v * m and held[rank] + v > limits[rank]
            w_cost = cost[stage_of[rank][pending[rank][0][0]]][W]
            if (
                gap is None
                or memory_bound
                or w_rule == "eager"
                or gap >= w_cost
                or (w_rule == "bubble" and idle[rank] + gap > max(idle))
            ):
                return now, (W, pending[rank][0][0])
        return upcoming

    # a rank's choice changes only when it or a neighbour (whose results it waits
    # for) commits, or, under the "bubble" rule, when the largest idle time grows
    decisions: list[tuple[Number, tuple[Kind, int]] | None] = [decide(rank) for rank in range(p)]
    for _ in range(3 * placement.stages * m):
        # the rank whose decided action starts first (the lowest on ties)
        rank, chosen = -1, None
        for r, decision in enumerate(decisions):
            if decision is not None and (chosen is None or decision[0] < chosen[0]):
                rank, chosen = r, decision
        if chosen is None:  # cannot happen with limits >= chunks: see the module doc
            raise AssertionError(f"auto heuristic stalled with policy {policy}")
        start, (kind, chunk) = chosen
        j = pending[rank].popleft()[1] if kind is W else issued[kind][rank][chunk]
        most_idle = max(idle)
        idle[rank] += start - free[rank]
        free[rank] = start + cost[stage_of[rank][chunk]][kind]
        programs[rank].append((kind, j, chunk))
        if kind is W:
            held[rank] -= 1
        else:
            done[kind][stage_of[rank][chunk]][j] = free[rank]
            issued[kind][rank][chunk] += 1
            if kind is F:
                held[rank] += 1
                ahead[rank] += 1
                forwards[rank] += 1
            else:
                ahead[rank] -= 1
                pending[rank].append((chunk, j))
        stale = (
            range(p)
            if w_rule == "bubble" and idle[rank] > most_idle
            else (rank - 1, rank, rank + 1)
        )
        for r in stale:
            if 0 <= r < p:
                decisions[r] = decide(r)
    return programs, Fraction(max(free)) / scale if scale != 1 else max(free)


def heuristic(
    placement: Placement, micro_batches: int, costs: Costs, limits: Sequence[int]
) -> tuple[tuple[tuple[Action, ...], ...], Number]:
    """The best of :func:`greedy` over :func:`policies` (the first on ties: the least
    memory-hungry), with its makespan. One chunk: every depth. Two chunks (twice the
    passes, and patience too): the depths are swept with the "fit" rule first, and
    the whole policy space is searched at the three best."""
    return _heuristic(placement, micro_batches, costs, tuple(limits))


@lru_cache(
    maxsize=64
)  # a search asked again (auto_schedule after ranked, the ILP's start) is not run again
def _heuristic(
    placement: Placement, micro_batches: int, costs: Costs, limits: tuple[int, ...]
) -> tuple[tuple[tuple[Action, ...], ...], Number]:
    def best_of(
        search: list[Policy],
    ) -> list[tuple[Number, int, Policy, list[list[tuple[Kind, int, int]]]]]:
        runs = []
        for index, policy in enumerate(search):
            programs, makespan = _greedy(placement, micro_batches, costs, limits, policy)
            runs.append((makespan, index, policy, programs))
        return sorted(runs, key=lambda run: run[:2])

    depths = warmup_depths(limits, placement.chunks)
    if placement.chunks == 1:
        makespan, _, _, programs = best_of(policies(limits, depths))[0]
    else:
        sweep = best_of(
            [Policy("fit", depth, first) for depth in depths for first in (Kind.I, Kind.F)]
        )
        top = list(dict.fromkeys(run[2].depth for run in sweep))[:3]
        makespan, _, _, programs = min(
            sweep[0], best_of(policies(limits, top, PATIENCE))[0], key=lambda run: run[:2]
        )
    return tuple(tuple(Action(*action) for action in order) for order in programs), makespan


def layout_costs(
    placement: Placement, costs: Costs | Sequence[Costs] | Mapping[str, Costs]
) -> Costs | None:
    """The costs of ``placement``: by its name where ``costs`` maps placement names
    to costs (each measured in its own layout, as ``pp-ext bench`` does), else the
    first that fits: uniform costs fit every placement, per-stage costs the one with
    as many stages."""
    if isinstance(costs, Mapping):
        return costs.get(placement.name)
    for option in [costs] if isinstance(costs, Costs) else costs:
        if option.per_stage is None or len(option.per_stage) == placement.stages:
            return option
    return None


def fits(schedule: Schedule, costs: Costs, limits: Sequence[int]) -> Number | None:
    """The simulated makespan of ``schedule`` where its peak activations stay within
    ``limits`` (chunk activations per rank), else None."""
    sim = simulate(schedule, costs)
    if all(
        peak * schedule.chunks <= limit
        for peak, limit in zip(sim.peak_activations_per_rank, limits)
    ):
        return sim.makespan
    return None


def fixed_schedules(placement: Placement, micro_batches: int) -> tuple[tuple[str, Schedule], ...]:
    """Each registered synchronous schedule (``auto`` aside) of ``placement`` that
    accepts its ranks and ``micro_batches``, by name, in registry order."""
    found = []
    for name, spec in REGISTRY.items():
        if name == "auto" or not spec.synchronous or spec.placement != placement.name:
            continue
        try:
            found.append((name, spec.build(placement.ranks, micro_batches, placement.chunks)))
        except ConstraintError:
            continue
    return tuple(found)


def candidates(
    placement: Placement, micro_batches: int, costs: Costs, limits: Sequence[int]
) -> list[tuple[Schedule, Number]]:
    """What ``auto`` weighs in one placement, with makespans: the heuristic's
    schedule (one-pipeline placements), then each registered synchronous schedule of
    the placement that accepts the sizes and fits ``limits``."""
    m, found = micro_batches, []
    if placement.pipelines == 1:
        programs, makespan = heuristic(placement, m, costs, limits)
        found.append((Schedule("auto", placement, m, programs), makespan))
    for _, schedule in fixed_schedules(placement, m):
        fitted = fits(schedule, costs, limits)  # its makespan, None where it does not fit
        if fitted is not None:
            found.append((replace(schedule, name="auto"), fitted))
    return found


def ranked(
    stages: int,
    micro_batches: int,
    costs: Costs | Sequence[Costs] | Mapping[str, Costs] | None = None,
    memory_limit: Number | Sequence[Number] | None = None,
    chunks: int | None = None,
    replicas: int = 1,
) -> list[tuple[Schedule, Number]]:
    """Every distinct program ``auto`` weighs (see the module doc), shortest simulated
    makespan first, for these costs under ``memory_limit`` micro-batches of a rank's
    activations per rank (default: ``stages``, 1F1B's), in the placement it chooses:
    ``chunks`` 1 keeps it to loop placement, 2 to V placement (or bidirectional, with
    ``replicas`` 2); ``None`` weighs both. ``costs`` (default: unit costs) is one cost
    model, one per cut of the model (per-stage costs of p stages serve loop and
    bidirectional placement, of 2p stages V placement) or one per placement name; a
    placement no cost model fits is not searched. Equal makespans keep the search
    order (the first placement of :func:`layouts`, loop, first; the heuristic before
    the fixed schedules); a program found twice (the heuristic rebuilding a fixed
    schedule) is listed once. A caller that can time them (``pp-ext bench``) picks
    among the first few by measurement, where the simulator's error is larger than
    their differences."""
    costs = costs or Costs()
    found: dict[tuple, tuple[Schedule, Number]] = {}
    for placement in layouts(stages, replicas):
        layout = layout_costs(placement, costs)
        if layout is None or chunks not in (None, placement.chunks):
            continue
        limits = memory_limits(stages, micro_batches, memory_limit, placement.chunks)
        for schedule, makespan in candidates(placement, micro_batches, layout, limits):
            found.setdefault((placement.name, schedule.programs), (schedule, makespan))
    if not found:
        if isinstance(costs, Mapping):
            given = f"the costs are for placements {', '.join(costs)}, which give"
        else:
            sizes = sorted(
                {
                    len(c.per_stage)
                    for c in ([costs] if isinstance(costs, Costs) else costs)
                    if c.per_stage is not None
                }
            )
            given = (
                f"the costs give {' or '.join(map(str, sizes))} stages, which fit"
                if sizes
                else "uniform costs fit"
            )
        raise ConstraintError(
            f"auto: {given} no placement of {stages} ranks with chunks={chunks} ({stages} stages: "
            f"1 chunk in loop placement; {2 * stages}: 2 chunks in V placement): give costs of "
            f"those stages (or keyed by placement name: loop, v)"
        )
    return sorted(
        found.values(), key=lambda candidate: candidate[1]
    )  # stable: ties keep the search order


def origin(schedule: Schedule) -> str | None:
    """The registered synchronous schedule whose programs ``schedule`` runs (its
    placement, sizes and actions equal), or None for a program of ``auto``'s own."""
    return next(
        (
            name
            for name, fixed in fixed_schedules(schedule.placement, schedule.micro_batches)
            if fixed.programs == schedule.programs
        ),
        None,
    )


def auto_schedule(
    stages: int,
    micro_batches: int,
    costs: Costs | Sequence[Costs] | Mapping[str, Costs] | None = None,
    memory_limit: Number | Sequence[Number] | None = None,
    chunks: int | None = None,
    replicas: int = 1,
) -> Schedule:
    """The shortest schedule of :func:`ranked` (same arguments)."""
    return ranked(stages, micro_batches, costs, memory_limit, chunks, replicas)[0][0]


def _check_auto(stages: int, micro_batches: int, chunks: int) -> None:
    require(
        chunks in (1, 2),
        f"auto holds 1 chunk per rank (loop placement) or 2 (V placement) (got chunks={chunks}): "
        f"use chunks=1 or chunks=2",
    )


@register(
    "auto",
    summary="computed from costs and a memory limit: the Zero Bubble paper's heuristic in loop or "
    "V placement (unit costs and 1F1B's memory when built by name)",
    constraints="chunks = 1 (loop placement) or 2 (V placement); memory limit >= 1 micro-batch per rank "
    "(default p)",
    source="Qi et al. 2024 (Zero Bubble Pipeline Parallelism, ICLR, Sec. 3; Pipeline Parallelism with "
    "Controllable Memory, NeurIPS)",
    placement="loop",
    placements=((2, "v"),),
    check=_check_auto,
)
def auto(stages: int, micro_batches: int, chunks: int) -> Schedule:
    return auto_schedule(stages, micro_batches, chunks=chunks)
