"""GPipe and 1F1B: one chunk per rank, fused backward.

- ``gpipe`` (Huang et al. 2019, "GPipe"): every forward, then every backward.
  Bubble (p-1)/(m+p-1) at unit costs; holds all m micro-batches' activations.
- ``1f1b`` (PipeDream-Flush: Narayanan et al. 2021, "Memory-Efficient
  Pipeline-Parallel DNN Training"; DAPPLE: Fan et al. 2021): rank r runs
  min(p-r-1, m) warm-up forwards, then alternates one forward and one backward,
  then drains the backwards. Same bubble as GPipe, (p-1)/(m+p-1), but rank r holds
  at most min(p-r, m) micro-batches (p on rank 0 when m >= p).
"""

from __future__ import annotations

from .actions import Action, Kind
from .placement import Placement
from .registry import fixed_chunks, register
from .schedule import Schedule


def one_f_one_b_order(forwards: list[Action], backwards: list[Action], warmup: int) -> list[Action]:
    """Interleave: ``warmup`` forwards, then forward/backward pairs, then the
    remaining backwards (the 1F1B pattern, also used by interleaved 1F1B)."""
    warmup = min(warmup, len(forwards))
    order = forwards[:warmup]
    steady = len(forwards) - warmup
    for i in range(steady):
        order += [forwards[warmup + i], backwards[i]]
    return order + backwards[steady:]


@register(
    "gpipe",
    summary="all forwards, then all backwards",
    constraints="chunks = 1",
    source="Huang et al. 2019 (GPipe)",
    placement="loop",
    check=fixed_chunks("gpipe", 1),
)
def gpipe(stages: int, micro_batches: int, chunks: int) -> Schedule:
    program = tuple(
        [Action(Kind.F, k) for k in range(micro_batches)]
        + [Action(Kind.B, k) for k in range(micro_batches)]
    )
    return Schedule("gpipe", Placement.loop(stages), micro_batches, (program,) * stages)


@register(
    "1f1b",
    summary="one forward, one backward (PipeDream-Flush / DAPPLE)",
    constraints="chunks = 1; m >= p for a full steady state",
    source="Narayanan et al. 2021; Fan et al. 2021 (DAPPLE)",
    placement="loop",
    check=fixed_chunks("1f1b", 1),
)
def one_f_one_b(stages: int, micro_batches: int, chunks: int) -> Schedule:
    forwards = [Action(Kind.F, k) for k in range(micro_batches)]
    backwards = [Action(Kind.B, k) for k in range(micro_batches)]
    programs = tuple(
        tuple(one_f_one_b_order(forwards, backwards, stages - rank - 1)) for rank in range(stages)
    )
    return Schedule("1f1b", Placement.loop(stages), micro_batches, programs)
