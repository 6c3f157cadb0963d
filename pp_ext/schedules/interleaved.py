"""Schedules with several chunks per rank in loop placement.

- ``interleaved-1f1b`` (Narayanan et al. 2021, "Efficient Large-Scale Language
  Model Training on GPU Clusters Using Megatron-LM", Sec. 2.2): rank r holds
  chunks c = 0..v-1 (stage c*p + r). Micro-batches go in groups of p: forwards run
  chunk 0 for the group, then chunk 1, ...; backwards run the chunks in reverse.
  Rank r runs 2(p-r-1) + (v-1)p warm-up forwards, then 1F1B. Bubble
  (p-1)/(v*m+p-1) and peak activations p + (p-1)/v (rank 0) when m is a multiple
  of p. Any other m works too, as in PyTorch's rounds: the m micro-batches form
  max(1, m // p) groups of near-equal size (each >= p when m >= p, so no chunk
  waits on the previous one), the warm-up grows with the first group, and the
  simulator shows the bubble; m < p runs as one group.
- ``looped-bfs`` (Lamy-Poirier 2023, "Breadth-First Pipeline Parallelism"): loop
  placement, every micro-batch through chunk 0, then chunk 1, ..., then the
  backwards chunk by chunk in reverse. Bubble (p-1)/(v*m+p-1) for m >= p; holds
  all m micro-batches' activations (m units).
"""

from __future__ import annotations

from .actions import Action, Kind
from .classic import one_f_one_b_order
from .placement import Placement
from .registry import register, require
from .schedule import Schedule


def group_sizes(micro_batches: int, stages: int) -> list[int]:
    """Split m micro-batches into max(1, m // p) groups as even as possible, so that
    every group has at least p members whenever m >= p (largest groups first)."""
    groups = max(1, micro_batches // stages)
    base, extra = divmod(micro_batches, groups)
    return [base + 1] * extra + [base] * (groups - extra)


def grouped_order(sizes: list[int], chunks: int, reverse_chunks: bool) -> list[tuple[int, int]]:
    """(chunk, micro-batch) pairs: consecutive groups of micro-batches of the given
    sizes, each group run through every chunk in turn (reversed for backwards)."""
    order = []
    first = 0
    for size in sizes:
        members = range(first, first + size)
        first += size
        for c in range(chunks):
            chunk = chunks - 1 - c if reverse_chunks else c
            order += [(chunk, mb) for mb in members]
    return order


def _check_interleaved(stages: int, micro_batches: int, chunks: int) -> None:
    require(
        chunks >= 2,
        f"interleaved-1f1b needs chunks >= 2 (got {chunks}): use chunks=2, "
        f"or the 1f1b schedule for one chunk per rank",
    )


@register(
    "interleaved-1f1b",
    summary="1F1B over v chunks per rank in loop placement (Megatron)",
    constraints="chunks >= 2; m a multiple of p for the closed-form bubble",
    source="Narayanan et al. 2021 (Megatron-LM)",
    placement="loop",
    default_chunks=2,
    check=_check_interleaved,
)
def interleaved_1f1b(stages: int, micro_batches: int, chunks: int) -> Schedule:
    sizes = group_sizes(micro_batches, stages)
    forwards = [Action(Kind.F, mb, c) for c, mb in grouped_order(sizes, chunks, False)]
    backwards = [Action(Kind.B, mb, c) for c, mb in grouped_order(sizes, chunks, True)]
    # rank p-1 must reach F of micro-batch 0 on its last chunk before its first
    # backward; each rank before it runs two more forwards (Megatron's warm-up)
    programs = tuple(
        tuple(
            one_f_one_b_order(
                forwards, backwards, 2 * (stages - rank - 1) + (chunks - 1) * sizes[0]
            )
        )
        for rank in range(stages)
    )
    return Schedule("interleaved-1f1b", Placement.loop(stages, chunks), micro_batches, programs)


@register(
    "looped-bfs",
    summary="breadth-first: all micro-batches through each chunk in turn",
    constraints="chunks >= 1 (chunks = 1 is GPipe)",
    source="Lamy-Poirier 2023 (Breadth-First PP)",
    placement="loop",
    default_chunks=2,
)
def looped_bfs(stages: int, micro_batches: int, chunks: int) -> Schedule:
    forwards = [Action(Kind.F, mb, c) for c, mb in grouped_order([micro_batches], chunks, False)]
    backwards = [Action(Kind.B, mb, c) for c, mb in grouped_order([micro_batches], chunks, True)]
    program = tuple(forwards + backwards)
    return Schedule(
        "looped-bfs", Placement.loop(stages, chunks), micro_batches, (program,) * stages
    )
