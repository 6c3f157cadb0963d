"""ZB-V: the V-shaped zero-bubble schedule, two chunks per rank.

Qi, Wan, Amar and Lin, "Pipeline Parallelism with Controllable Memory",
NeurIPS 2024 (arXiv 2405.15362): the V-ZB schedule (PyTorch's
``ScheduleZBVZeroBubble`` runs the same rank orders). The model is cut into
2p stages in V placement: chunk 0 of rank r holds stage r (the way down), chunk 1
holds stage 2p-1-r (the way back up), so rank p-1 holds stages p-1 and p and a
micro-batch turns round there with a local hand-over (F_k then F_k.c1, I_k.c1
then I_k, no message), and rank 0 holds both the first and the last stage. The
backward is split into I and W as in ZB-H1/H2.

Rank r runs, in half-units (one chunk's F, I or W at unit costs):
warm-up 2(p-r)-1 chunk-0 forwards (the time micro-batch 0 takes to go down the
V and back up to this rank), r pairs (F.c1, F) while the first loss gradient
comes down to it, p-r rounds (F.c1, I.c1, W.c1); then steady rounds
(F, I, W, F.c1, I.c1, W.c1); cooldown r pairs (I, I.c1) with W's deferred so
gradients reach rank 0 fast, p-r rounds (I, W), and the deferred W's.

At unit costs (F = I = W = 1 per rank, 1/2 per chunk): peak activations
min(m, p) whole-rank units, as 1F1B; flushed bubble ratio LB = (p-1)/(6m+p-1)
for m >= floor(3p/2) (p=4: m >= 6); steady-state bubble 0 (every rank busy
without a break) for m >= 2p-1. The pattern is built
for max(m, 2p-1) micro-batches; with fewer the extra micro-batches are dropped,
which keeps it valid (no dependency crosses micro-batches) at a larger bubble.
Needs chunks = 2; refuses no m or p.
"""

from __future__ import annotations

from collections import deque

from .actions import Action, Kind
from .placement import Placement
from .registry import fixed_chunks, register
from .schedule import Schedule

DOWN, UP = 0, 1  # chunk 0 runs down the V, chunk 1 back up
F, I, W = Kind.F, Kind.I, Kind.W  # noqa: E741


def materialise(pattern: list[tuple[Kind, int]], chunks: int) -> list[Action]:
    """Actions from (kind, chunk) slots: F and I take the chunk's next micro-batch,
    W the oldest of the chunk whose I has run and whose W has not."""
    taken = {(kind, chunk): 0 for kind in (F, I) for chunk in range(chunks)}
    pending: list[deque[int]] = [deque() for _ in range(chunks)]
    out = []
    for kind, chunk in pattern:
        if kind is W:
            out.append(Action(W, pending[chunk].popleft(), chunk))
            continue
        mb = taken[(kind, chunk)]
        taken[(kind, chunk)] += 1
        if kind is I:
            pending[chunk].append(mb)
        out.append(Action(kind, mb, chunk))
    return out


def zbv_pattern(ranks: int, micro_batches: int, rank: int) -> list[tuple[Kind, int]]:
    """Rank ``rank``'s slots for ``micro_batches`` >= 2p-1 (see the module doc)."""
    p, r, n = ranks, rank, micro_batches
    pattern = [(F, DOWN)] * (2 * (p - r) - 1)
    pattern += [(F, UP), (F, DOWN)] * r
    pattern += [(F, UP), (I, UP), (W, UP)] * (p - r)
    # after the warm-up chunk 0 has run 2p-1-r forwards and chunk 1 p: n-p steady
    # rounds bring both to n, chunk 0 first (its last p-1-r rounds have no forward)
    for step in range(n - p):
        if step < n - (2 * p - 1 - r):
            pattern.append((F, DOWN))
        pattern += [(I, DOWN), (W, DOWN), (F, UP), (I, UP), (W, UP)]
    pattern += [(I, DOWN), (I, UP)] * r + [(I, DOWN), (W, DOWN)] * (p - r)
    return pattern + [(W, UP)] * r + [(W, DOWN)] * r


@register(
    "zbv",
    summary="zero bubble in V placement: 2 chunks per rank, 1F1B memory (ZB-V)",
    constraints="chunks = 2 (V placement); flushed bubble LB for m >= floor(3p/2); "
    "steady-state bubble 0 for m >= 2p-1",
    source="Qi et al. 2024 (Pipeline Parallelism with Controllable Memory, V-ZB)",
    placement="v",
    default_chunks=2,
    check=fixed_chunks("zbv", 2),
)
def zbv(stages: int, micro_batches: int, chunks: int) -> Schedule:
    full = max(micro_batches, 2 * stages - 1)  # the warm-up alone needs 2p-1 micro-batches
    programs = tuple(
        tuple(
            a
            for a in materialise(zbv_pattern(stages, full, rank), 2)
            if a.micro_batch < micro_batches
        )
        for rank in range(stages)
    )
    return Schedule("zbv", Placement.v(stages, 2), micro_batches, programs)
