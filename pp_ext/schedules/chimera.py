"""Chimera: two pipelines running in opposite directions over two weight replicas.

Li and Hoefler, "Chimera: Efficiently Training Large-Scale Neural Networks with
Bidirectional Pipelines", SC'21 (arXiv 2107.06925), Sec. 3.

Placement ``bidirectional`` (p even): rank r holds stage r of the *down* pipeline
(chunk 0) and stage p-1-r of the *up* pipeline (chunk 1), so every stage has two
replicas, on ranks s and p-1-s. The step's m = k*p micro-batches come in k basic
units of p: in unit u, micro-batches u*p .. u*p+p/2-1 take the down pipeline and
u*p+p/2 .. u*p+p-1 the up pipeline. The replicas' gradients are summed before the
one synchronous optimizer step (the engine's replica all-reduce), so training
equals ordinary training on all m micro-batches.

Order. In a basic unit each pipeline runs its p/2 micro-batches 1F1B-style, one
injected every two slots; at F = B = 1 (the paper's Fig. 3) rank r runs, for the
k-th micro-batch of a pipeline (k < p/2),

    down F at r + 2k          down B at 2p-1-r + 2k
    up   F at p-1-r + 2k      up   B at p+r + 2k

Down forwards and up backwards fall on slots of the parity of r, up forwards and
down backwards on the other parity, and within a parity the two never meet (that
would need k >= p/2): the two pipelines merge without conflict, the paper's claim
for even p. Units are concatenated directly (the paper's direct concatenation
for m > p) with a period of 2p slots: unit u's forwards, shifted by 2p*u, land in
the slots its predecessor's tail leaves free (again by parity), so no slot holds
two actions. Each rank runs its actions in the order of these slots; the
simulator then times them under any cost model.

Figures (flushed step; per rank and micro-batch a stage costs F forward, B backward):
- F = B = 1 (the paper's Table 2): rank r's slots run from min(r, p-1-r) to
  2m + p - 3 - min(r, p-1-r), so the makespan is 2m + p - 2 for 2m of work per
  rank: bubble ratio (p-2)/(2m+p-2) exactly (p-2 idle slots per rank).
- F = 1, B = 2 (this project's unit costs, F = I = W = 1): the same order gives
  makespan (4p-2)*m/p + p - 2, so bubble ratio
  (p-2)(m+p) / ((4p-2)m + p(p-2)) (p=4, m=8: 1/5; 1F1B: 3/11); each unit
  of p micro-batches adds 4p-2 to the makespan for 3p of work, because the
  F = B order leaves a backward wave waiting on the other pipeline's longer one.
  Not derived by hand: ``tests/test_chimera.py`` checks it against a second
  simulation written in the tests (``tests/brute_force.py``, independent of the
  simulator), and ``tests/test_properties.py`` asserts it over its grid.
  The paper's forward doubling and backward halving (its other ways to scale to
  m > p) attack exactly this; they are not implemented here.
- Peak activations on rank r: p/2 + 1 + min(r, p-1-r) micro-batches, so between
  p/2 + 1 (ranks 0 and p-1) and p (the middle ranks), the paper's range.
- Weights: 2 copies per rank (two stages' replicas; each stage's weights exist twice).
Constraints: p even, chunks = 2, m a multiple of p.
"""

from __future__ import annotations

from .actions import Action, Kind
from .placement import Placement
from .registry import register, require
from .schedule import Schedule

DOWN, UP = 0, 1


def check(stages: int, micro_batches: int, chunks: int) -> None:
    require(
        stages % 2 == 0,
        f"chimera needs an even number of pipeline stages, got stages={stages}: "
        f"use an even p (each rank pairs with rank p-1-r)",
    )
    require(
        chunks == 2,
        f"chimera holds exactly 2 chunks per rank (a down and an up replica), got "
        f"chunks={chunks}: use chunks=2",
    )
    nearest = max(stages, round(micro_batches / stages) * stages)
    require(
        micro_batches % stages == 0,
        f"chimera needs micro_batches a multiple of stages={stages} (basic "
        f"units of p micro-batches), got micro_batches={micro_batches}: "
        f"use e.g. micro_batches={nearest}",
    )


def slots(ranks: int, micro_batches: int, rank: int) -> list[tuple[int, Action]]:
    """(slot at F = B = 1, action) of every action of ``rank`` (see the module doc)."""
    p, r, half = ranks, rank, ranks // 2
    out = []
    for unit in range(micro_batches // p):
        base, shift = unit * p, 2 * p * unit
        for k in range(half):
            down, up = base + k, base + half + k
            out += [
                (shift + r + 2 * k, Action(Kind.F, down, DOWN)),
                (shift + 2 * p - 1 - r + 2 * k, Action(Kind.B, down, DOWN)),
                (shift + p - 1 - r + 2 * k, Action(Kind.F, up, UP)),
                (shift + p + r + 2 * k, Action(Kind.B, up, UP)),
            ]
    return out


@register(
    "chimera",
    summary="two opposite pipelines over two weight replicas (bidirectional)",
    constraints="p even; chunks = 2 (bidirectional placement); m a multiple of p",
    source="Li & Hoefler 2021 (Chimera, SC'21)",
    placement="bidirectional",
    default_chunks=2,
    check=check,
)
def chimera(stages: int, micro_batches: int, chunks: int) -> Schedule:
    programs = []
    for rank in range(stages):
        ordered = sorted(slots(stages, micro_batches, rank), key=lambda slot: slot[0])
        assert len({t for t, _ in ordered}) == len(ordered), (
            "two actions in one slot: the merge has a conflict"
        )
        programs.append(tuple(action for _, action in ordered))
    pipeline_of = tuple(int(mb % stages >= stages // 2) for mb in range(micro_batches))
    return Schedule(
        "chimera", Placement.bidirectional(stages), micro_batches, tuple(programs), pipeline_of
    )
