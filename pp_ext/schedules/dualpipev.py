"""DualPipeV: DeepSeek's DualPipe cut in half, two chunks per rank in V placement.

Source: DeepSeek-AI, "DeepSeek-V3 Technical Report" (2024), Sec. 3.2.1 (DualPipe),
and the V-shape variant ``DualPipeV`` of https://github.com/deepseek-ai/DualPipe
(also DeepSpeed's ``DualPipeVSchedule`` and PyTorch's ``ScheduleDualPipeV``).

Rank r holds stage r as chunk 0 and stage 2p-1-r as chunk 1 (``Placement.v(p, 2)``):
micro-batches go out on chunk 0, turn round on rank p-1 and come back on chunk 1, so
rank 0 holds the first and the loss stage. Each rank runs DualPipeV's eight phases
(n = p-r-1 on rank r; "F&B" is an overlapped pair, here the two actions back to back,
forward first, as DualPipeV issues them):

1. 2n forwards of chunk 0;            5. n times: B of chunk 1, F1&B0;
2. r+1 pairs F0 F1;                   6. r+1 pairs B1 B0, W deferred;
3. n times: I1, W, F1 (zero bubble);  7. n times: a deferred W, then I0 (W deferred);
4. m-2p+r+1 times: F0&B1, F1&B0;      8. the 2(r+1) deferred W's left.

Every backward is split into I and W (DeepSpeed's port keeps W inside B): a B of
DualPipeV is I then its W at once (the input gradient leaves a W earlier); a W that
DualPipeV's zero-bubble phases defer (``WeightGradStore``) waits in a FIFO for the next
weight slot. One change: DualPipeV defers W only from the middle of phase 6 on, this
order defers all of phase 6 (``original_drain=True`` gives DualPipeV's own).

Bubble at unit costs (F = I = W = 1 per rank, 1/2 per chunk): every rank idles
exactly (p-1)/2, so the flushed makespan is 3m + (p-1)/2 and the bubble ratio is the
lower bound for v = 2, (p-1)/(6m+p-1), for every m >= 2p; DualPipeV's own drain gets
the same, DeepSpeed's port (W inside every B) does not (p=4, m=8: 59/2 against 51/2).
DeepSeek's figure (PP/2-1)(F&B+B-3W) counts an overlapped F&B as one slot. Back to
back without a flush (``steady_state``) the bubble is 0: rank r ends with 2(r+1) W's,
enough to cover the next step's first forward reaching it; with DualPipeV's own
drain (r+1 W's at the end) it stays at the flushed figure.

Peak activations p + 1/2 per rank (2p+1 chunk activations, each held from F to W):
all 2p warm-up forwards are alive when the first F&B pair issues its forward; the
deferred drain adds none, as no forward is left by then.
Weights 1x (two chunks of one rank's share). Constraints: chunks = 2, m >= 2p.
"""

from __future__ import annotations

from collections import deque

from .actions import Action, Kind
from .placement import Placement
from .registry import fixed_chunks, register, require
from .schedule import Schedule


class _Rank:
    """One rank's program in issue order. Each chunk runs its micro-batches in order
    (the k-th F or I of a chunk is micro-batch k), as DualPipeV's per-phase counters do."""

    def __init__(self) -> None:
        self.program: list[Action] = []
        self.forwards = [0, 0]
        self.backwards = [0, 0]
        self.deferred: deque[Action] = deque()

    def f(self, chunk: int) -> None:
        self.program.append(Action(Kind.F, self.forwards[chunk], chunk))
        self.forwards[chunk] += 1

    def b(self, chunk: int, defer: bool = False) -> None:
        mb = self.backwards[chunk]
        self.backwards[chunk] += 1
        self.program.append(Action(Kind.I, mb, chunk))
        weight = Action(Kind.W, mb, chunk)
        if defer:
            self.deferred.append(weight)
        else:
            self.program.append(weight)

    def w(self) -> None:
        if self.deferred:  # DualPipeV's weight slot is a no-op on an empty store
            self.program.append(self.deferred.popleft())


def dualpipev_program(
    ranks: int, micro_batches: int, rank: int, *, original_drain: bool = False
) -> tuple[Action, ...]:
    """The compute program of ``rank`` (phases as in the module doc).

    ``original_drain`` defers W in phase 6 only from the middle on, as DualPipeV does:
    same flushed bubble, but no overlap of consecutive steps (kept for comparison)."""
    p, m, r = ranks, micro_batches, rank
    n = p - r - 1
    out = _Rank()
    for _ in range(2 * n):
        out.f(0)
    for _ in range(r + 1):
        out.f(0)
        out.f(1)
    for _ in range(n):
        out.b(1, defer=True)
        out.w()  # fills the wait for the next chunk-1 activation
        out.f(1)
    for _ in range(m - 2 * p + r + 1):
        out.f(0)
        out.b(1)
        out.f(1)
        out.b(0)
    for _ in range(n):
        out.b(1)
        out.f(1)
        out.b(0)
    start = (r + 1) // 2 if original_drain else 0  # first pair whose W's wait
    for i in range(r + 1):
        # DualPipeV switches chunk 1 of an even rank one pair after chunk 0
        out.b(1, defer=i >= start + (original_drain and r % 2 == 0))
        out.b(0, defer=i >= start)
    for _ in range(n):
        out.w()
        out.b(0, defer=True)
    while out.deferred:
        out.w()
    return tuple(out.program)


def _check_dualpipev(stages: int, micro_batches: int, chunks: int) -> None:
    fixed_chunks("dualpipev", 2)(stages, micro_batches, chunks)
    require(
        micro_batches >= 2 * stages,
        f"dualpipev needs micro_batches >= 2*stages (got m={micro_batches}, p={stages}): "
        f"use micro_batches={2 * stages}",
    )


@register(
    "dualpipev",
    summary="DeepSeek's DualPipeV: V-shape F&B pairs, split backward, W's fill the drain",
    constraints="chunks = 2 (V placement); m >= 2p",
    source="DeepSeek-AI 2024 (DeepSeek-V3 report; github.com/deepseek-ai/DualPipe)",
    placement="v",
    default_chunks=2,
    check=_check_dualpipev,
)
def dualpipev(stages: int, micro_batches: int, chunks: int) -> Schedule:
    programs = tuple(dualpipev_program(stages, micro_batches, r) for r in range(stages))
    return Schedule("dualpipev", Placement.v(stages, 2), micro_batches, programs)
