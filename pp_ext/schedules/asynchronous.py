"""Asynchronous schedules: 1F1B without a flush, weight updates inside the program.

The pipeline stays full across ``train_batch`` calls: rank r runs w_r = p-1-r
warm-up forwards once, then forever one forward and one backward (F_g, B_{g-w_r})
over the global micro-batch index g = n*m + k (call n, micro-batch k), and only
``flush()`` drains it. ``U`` actions mark weight updates; ``U(g)`` on a rank applies
the gradients of the backwards since its last update (through B_g) and makes a new
version of its weights, which forwards of micro-batches after g + ``version_lag``
use (those in flight keep theirs). Bubble 0 in steady state; the fill and the drain happen
once per run, so a stream of S calls has the 1F1B bubble (p-1)/(S*m+p-1) at
F = B/2 = 1. Peak activations p (rank 0), as 1F1B.

- ``pipedream`` (Narayanan et al. 2019, "PipeDream: Generalized Pipeline
  Parallelism for DNN Training", SOSP, Sec. 3.3 weight stashing): an update after
  every backward, on the gradient of that micro-batch alone; the forward of g on
  stage s uses the stage's latest version, v = max(0, g - w_s), and its backward
  the same (stashed) version. Rank r keeps min(p - r, ...) versions: up to p.
- ``pipedream-2bw`` (Narayanan et al. 2021, "Memory-Efficient Pipeline-Parallel
  DNN Training", ICML, Sec. 3.1 double-buffered weight updates): one update per
  call, on the mean gradient of its m micro-batches; batch b runs forward and
  backward at W(b-1), so W(b+1) = W(b) - lr * grad f(W(b-1)) (W(-1) = W(0)): the
  update of batch b makes the version forwards of batch b+2 use. Two versions.
  Needs m >= p (the paper's condition: batch b-2 is done everywhere before batch b starts).
- ``pipemare`` (Yang et al. 2021, "PipeMare: Asynchronous Pipeline Parallel DNN
  Training", MLSys): the program of ``pipedream`` (an update per micro-batch),
  but no stash: one version; the backward runs on the weights of the moment,
  corrected for the discrepancy (the paper's Technique 2) and with the stage's
  learning rate rescheduled by its delay (Technique 1); both are the engine's
  (:mod:`pp_ext.schedules.async_rules` states them).

``Schedule.backward_weights`` tells the engine which weights a backward uses:
``"stashed"`` (its forward's version) or ``"corrected"`` (PipeMare).

A call of the stream is cut per rank at its first forward of the call's first
micro-batch (:func:`segments`); gradients of the last micro-batches of a call
cross into the next call, which is what keeps the pipeline full. Constraints:
chunks = 1, m >= p - 1 (so that every call after the first repeats the same
program, shifted by m micro-batches), m >= p for ``pipedream-2bw``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

from .actions import Action, Kind
from .costs import Costs, Number
from .lower import lower
from .placement import Placement
from .registry import fixed_chunks, register, require
from .schedule import Schedule
from .simulate import simulate

# calls shown by `pp-ext schedule show/compare` and the property grid: a stream of
# SHOWN_STEPS calls and its drain, m * SHOWN_STEPS micro-batches in all
SHOWN_STEPS = 3


def stream(name: str, stages: int, micro_batches: int, steps: int) -> Schedule:
    """The closed compute program of ``steps`` calls of ``name`` and the final drain."""
    per_update = micro_batches if name == "pipedream-2bw" else 1
    total = steps * micro_batches
    programs = []
    for rank in range(stages):
        warmup = stages - 1 - rank
        program = [Action(Kind.F, g) for g in range(min(warmup, total))]
        for g in range(total):
            if g + warmup < total:
                program.append(Action(Kind.F, g + warmup))
            program.append(Action(Kind.B, g))
            if (g + 1) % per_update == 0:
                program.append(Action(Kind.U, g))
        programs.append(tuple(program))
    # 2BW: the version made from batch b serves batch b+2 (Sec. 3.1), m micro-batches later
    return Schedule(
        name,
        Placement.loop(stages),
        total,
        tuple(programs),
        backward_weights="corrected" if name == "pipemare" else "stashed",
        version_lag=micro_batches if name == "pipedream-2bw" else 0,
    )


def steady_call(name: str, stages: int, micro_batches: int, costs: Costs | None = None) -> Number:
    """Simulated time of one ``train_batch`` call after the first (the steady state): how
    much the stream's makespan grows per call, averaged over calls 9 to 16. The fill and
    the drain are in every makespan alike and cancel. At uniform costs every call adds
    m * (F + B) + updates * U (no bubble); with unequal stages the first calls are a
    transient (up to 6 of them on the tests' random costs) and the growth may alternate
    between calls, which a mean over 8 calls taken after 8 covers. Updates ``U`` cost
    ``costs.update`` each: m per call for ``pipedream`` and ``pipemare``, 1 for
    ``pipedream-2bw``."""
    makespan = [
        simulate(stream(name, stages, micro_batches, calls), costs).makespan for calls in (8, 16)
    ]
    return (makespan[1] - makespan[0]) / 8


# streams of up to this many calls are lowered to find where a stream's calls repeat
CALLS_SEARCHED = 7


@dataclass(frozen=True)
class Calls:
    """One rank's lowered stream cut into ``train_batch`` calls and ``flush()`` drains.

    Call n starts at the first action of a micro-batch >= n*m on the rank (its
    receive or its forward: every other action of a micro-batch comes after them), so
    a call never posts a receive for a micro-batch of a call that may not come. After
    the fill (``first``: calls 0 .. k-1, k <= 2 for the sizes tested) each call is
    ``steady`` shifted by m micro-batches; the drain after c calls is ``drains[c-1]``,
    or once they repeat the last of them shifted. Running calls 0 .. c-1 and the drain
    after c is exactly the lowered stream of c calls (tests/test_async.py)."""

    first: tuple[tuple[Action, ...], ...]
    steady: tuple[Action, ...]
    drains: tuple[tuple[Action, ...], ...]
    micro_batches: int

    def call(self, n: int) -> tuple[Action, ...]:
        if n < len(self.first):
            return self.first[n]
        return shift(self.steady, (n - len(self.first)) * self.micro_batches)

    def drain(self, calls: int) -> tuple[Action, ...]:
        known = min(calls, len(self.drains))
        return shift(self.drains[known - 1], (calls - known) * self.micro_batches)


def _call_starts(program: tuple[Action, ...], micro_batches: int, calls: int) -> list[int]:
    return [
        next(
            i
            for i, a in enumerate(program)
            if a.kind in (Kind.F, Kind.RECV_ACT) and a.micro_batch >= n * micro_batches
        )
        for n in range(calls)
    ]


def _repeats_from(parts: list[tuple[Action, ...]], micro_batches: int) -> int:
    """The first index from which every part is the one before it shifted by m, seen
    at least twice."""
    for k in range(len(parts) - 2):
        if all(
            parts[j] == shift(parts[k], (j - k) * micro_batches) for j in range(k + 1, len(parts))
        ):
            return k
    raise ValueError(f"no periodic regime in {len(parts)} parts of the stream")


@functools.lru_cache(
    maxsize=32
)  # every rank of a process group, and the tests, cut the same streams
def lowered_stream(name: str, stages: int, micro_batches: int, steps: int) -> Schedule:
    return lower(stream(name, stages, micro_batches, steps))


def calls(schedule: Schedule, micro_batches: int, rank: int) -> Calls:
    """``rank``'s :class:`Calls` of the asynchronous ``schedule`` with m = ``micro_batches``."""
    lowered = [
        lowered_stream(schedule.name, schedule.stages, micro_batches, s).programs[rank]
        for s in range(1, CALLS_SEARCHED + 1)
    ]
    longest = lowered[-1]
    starts = _call_starts(longest, micro_batches, CALLS_SEARCHED)
    parts = [longest[a:b] for a, b in zip(starts, starts[1:])]  # calls 0 .. CALLS_SEARCHED - 2
    k = _repeats_from(parts, micro_batches)
    drains = []
    for s, program in enumerate(lowered[:-1], start=1):
        done = starts[s]
        if program[:done] != longest[:done]:  # a call must not depend on how many follow
            raise ValueError(
                f"{schedule.name}: the first {s} calls of rank {rank} change with the stream's length"
            )
        drains.append(program[done:])
    c = _repeats_from(drains, micro_batches)
    return Calls(tuple(parts[:k]), parts[k], tuple(drains[: c + 1]), micro_batches)


def shift(actions: tuple[Action, ...], offset: int) -> tuple[Action, ...]:
    """The same actions ``offset`` micro-batches later (a later call of the stream)."""
    return tuple(replace(a, micro_batch=a.micro_batch + offset) for a in actions)


def _check(name: str, at_least_p: bool):
    def check(stages: int, micro_batches: int, chunks: int) -> None:
        fixed_chunks(name, 1)(stages, micro_batches, chunks)
        need = stages if at_least_p else stages - 1
        require(
            micro_batches >= need,
            f"{name} needs micro_batches >= {need} at stages={stages} (got "
            f"micro_batches={micro_batches}): use micro_batches={need} or more",
        )

    return check


def _register(name: str, summary: str, source: str, at_least_p: bool = False) -> None:
    @register(
        name,
        summary=summary,
        source=source,
        placement="loop",
        check=_check(name, at_least_p),
        synchronous=False,
        constraints=f"chunks = 1; m >= {'p' if at_least_p else 'p-1'}; asynchronous "
        f"(shown: {SHOWN_STEPS} calls and the drain)",
    )
    def generate(stages: int, micro_batches: int, chunks: int) -> Schedule:
        return stream(name, stages, micro_batches, SHOWN_STEPS)


_register(
    "pipedream",
    "1F1B without flush, an update per micro-batch, weight stashing",
    "Narayanan et al. 2019 (PipeDream, SOSP)",
)
_register(
    "pipedream-2bw",
    "1F1B without flush, double-buffered weights, W(t+1) = W(t) - lr*g(W(t-1))",
    "Narayanan et al. 2021 (PipeDream-2BW, ICML)",
    at_least_p=True,
)
_register(
    "pipemare",
    "1F1B without flush, one weight version, lr rescheduling + discrepancy correction",
    "Yang et al. 2021 (PipeMare, MLSys)",
)
