"""Zero-bubble schedules with one chunk per rank: ZB-H1 and ZB-H2.

Qi, Wan, Huang and Lin, "Zero Bubble Pipeline Parallelism", ICLR 2024 (arXiv
2401.10241), Sec. 3, the handcrafted schedules. The backward is split into
``I`` (input gradient, which the previous stage waits for) and ``W`` (weight
gradient, which nobody waits for), so W can be moved into what would otherwise
be idle time. Both run 1F1B on F and I; they differ in the warm-up and in where
W goes. Figures at unit costs (F = I = W = 1) unless stated; p ranks, m
micro-batches, loop placement, one chunk per rank.

- ``zb-h1``: rank i runs the 1F1B warm-up of p-1-i forwards, then F/I pairs,
  and defers each W by i micro-batches (W_k right after I_{k+i}; the last i+1
  W's close the step), so the W's fill the cooldown where 1F1B idles. Peak
  activations min(m, p) on every rank (1F1B: on rank 0 only), since an
  activation lives until its W. Flushed makespan max(3m+p-1, 2m+2p-1): for
  m >= p the bubble ratio is (p-1)/(3m+p-1), the lower bound LB; for m < p it
  is 1 - 3m/(2m+2p-1), also optimal (the last rank's m F and m I end at 2m+p-1
  at best, then the last gradient crosses p-1 ranks and a W follows). With
  general costs the bubble per rank is (p-1)(F+I-W) when W <= min(F, I)
  (found by simulation: (p-1)max(F+I-W, F, I) flushed, (p-1)max(F+I-W, I)
  steady; tests/test_zero_bubble.py checks both against a second, independent
  simulation, tests/brute_force.py).
- ``zb-h2``: rank i runs 2p-1-2i warm-up forwards, filling the wait for the
  first gradient, then I-W-F rounds; in the cooldown it skips W for 2i rounds
  so the last gradients reach rank 0 quickly, and the 2i+1 deferred W's close
  the step. Every rank is then busy without a break from its first action to
  its last (a parallelogram), so steps repeated without a flush leave no
  bubble: steady-state bubble (p-1)(F+I-2W) = 0 (for general costs, found by
  simulation and checked against tests/brute_force.py: (p-1)max(0, F+I-2W, I-F)).
  This needs m >= 2p-1; below it the same rules
  give a valid schedule with a steady bubble. The flushed bubble is LB for
  m >= p and equals zb-h1's for m < p. Peak activations min(m, 2p-1), reached
  on every rank: rank 0 after its warm-up, rank i in the cooldown with 2i W's
  deferred.

Neither refuses any m or p; both need chunks = 1.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from functools import partial

from .actions import Action, Kind
from .classic import one_f_one_b_order
from .placement import Placement
from .registry import fixed_chunks, register
from .schedule import Schedule


def with_weights(order: list[Action], place_w: Callable[[int], bool]) -> list[Action]:
    """Add the W passes to an F/I order: right after the j-th I (from 0), the oldest
    pending W if ``place_w(j)``; the W's still pending close the program."""
    out: list[Action] = []
    pending: deque[Action] = deque()
    done = 0
    for action in order:
        out.append(action)
        if action.kind is Kind.I:
            pending.append(Action(Kind.W, action.micro_batch, action.chunk))
            if place_w(done):
                out.append(pending.popleft())
            done += 1
    return out + list(pending)


def _one_chunk(
    name: str,
    stages: int,
    micro_batches: int,
    warmup: Callable[[int], int],
    place_w: Callable[[int, int], bool],
) -> Schedule:
    forwards = [Action(Kind.F, k) for k in range(micro_batches)]
    inputs = [Action(Kind.I, k) for k in range(micro_batches)]
    programs = tuple(
        tuple(
            with_weights(one_f_one_b_order(forwards, inputs, warmup(rank)), partial(place_w, rank))
        )
        for rank in range(stages)
    )
    return Schedule(name, Placement.loop(stages), micro_batches, programs)


@register(
    "zb-h1",
    summary="1F1B on F and I, each rank's W's deferred into the cooldown (ZB-H1)",
    constraints="chunks = 1; bubble LB = (p-1)/(3m+p-1) for m >= p",
    source="Qi et al. 2024 (Zero Bubble Pipeline Parallelism, ICLR)",
    placement="loop",
    check=fixed_chunks("zb-h1", 1),
)
def zb_h1(stages: int, micro_batches: int, chunks: int) -> Schedule:
    # rank i holds p-i activations in flight after its warm-up; deferring its W's
    # by i micro-batches keeps the total at p, and the i+1 W's left at the end
    # fill exactly the time the last gradient needs to climb to rank 0
    return _one_chunk(
        "zb-h1",
        stages,
        micro_batches,
        warmup=lambda rank: stages - 1 - rank,
        place_w=lambda rank, j: j >= rank,
    )


@register(
    "zb-h2",
    summary="extra warm-up forwards and W's deferred in the cooldown: "
    "zero bubble in steady state (ZB-H2)",
    constraints="chunks = 1; flushed bubble LB for m >= p; steady-state bubble 0 for m >= 2p-1",
    source="Qi et al. 2024 (Zero Bubble Pipeline Parallelism, ICLR)",
    placement="loop",
    check=fixed_chunks("zb-h2", 1),
)
def zb_h2(stages: int, micro_batches: int, chunks: int) -> Schedule:
    # rank i waits 2p-1-2i units for its first gradient: that many forwards fill it
    # (the 1F1B order adds one forward to the warm-up). The W's of I-rounds
    # s .. s+2i-1 (s = m-2p+1: the last 2i rounds that still have a forward) are
    # deferred, so each rank passes gradients on at one per 2 units and rank i
    # ends with 2i+1 W's while ranks i-1 .. 0 finish their I's.
    first_skip = micro_batches - 2 * stages + 1
    return _one_chunk(
        "zb-h2",
        stages,
        micro_batches,
        warmup=lambda rank: 2 * (stages - 1 - rank),
        place_w=lambda rank, j: not first_skip <= j < first_skip + 2 * rank,
    )
