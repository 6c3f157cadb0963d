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
  (:mod:`pp_ext.async_rules` states them).

``Schedule.backward_weights`` tells the engine which weights a backward uses:
``"stashed"`` (its forward's version) or ``"corrected"`` (PipeMare).

A call of the stream is cut per rank at its first forward of the call's first
micro-batch (:func:`segments`); gradients of the last micro-batches of a call
cross into the next call, which is what keeps the pipeline full. Constraints:
chunks = 1, m >= p - 1 (so that every call after the first repeats the same
program, shifted by m micro-batches), m >= p for ``pipedream-2bw``.
"""
from __future__ import annotations

from dataclasses import replace

from .actions import Action, Kind
from .costs import Costs, Number
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
    return Schedule(name, Placement.loop(stages), total, tuple(programs),
                    backward_weights="corrected" if name == "pipemare" else "stashed",
                    version_lag=micro_batches if name == "pipedream-2bw" else 0)


def steady_call(name: str, stages: int, micro_batches: int, costs: Costs | None = None) -> Number:
    """Simulated time of one ``train_batch`` call after the first (the steady state): how
    much the stream's makespan grows per call, averaged over calls 9 to 16. The fill and
    the drain are in every makespan alike and cancel. At uniform costs every call adds
    m * (F + B) + updates * U (no bubble); with unequal stages the first calls are a
    transient (up to 6 of them on the tests' random costs) and the growth may alternate
    between calls, which a mean over 8 calls taken after 8 covers. Updates ``U`` cost
    ``costs.update`` each: m per call for ``pipedream`` and ``pipemare``, 1 for
    ``pipedream-2bw``."""
    makespan = [simulate(stream(name, stages, micro_batches, calls), costs).makespan for calls in (8, 16)]
    return (makespan[1] - makespan[0]) / 8


def segments(lowered: Schedule, micro_batches: int, rank: int) -> tuple[tuple[Action, ...], ...]:
    """Cut ``rank``'s lowered stream into its calls, then the drain. Call n starts at
    the receive (or forward) of micro-batch n*m; from call 1 on every call is call 1
    shifted by m micro-batches (m >= p - 1), so the last call is as long as call 1
    and the drain (what ``flush()`` runs) is the rest."""
    program = lowered.programs[rank]
    starts = []
    for n in range(lowered.micro_batches // micro_batches):
        first = next(i for i, a in enumerate(program) if a.kind is Kind.F and a.micro_batch == n * micro_batches)
        starts.append(first - 1 if first and program[first - 1].kind is Kind.RECV_ACT else first)
    bounds = starts + [2 * starts[-1] - starts[-2], len(program)]
    return tuple(program[a:b] for a, b in zip(bounds, bounds[1:]))


def shift(actions: tuple[Action, ...], offset: int) -> tuple[Action, ...]:
    """The same actions ``offset`` micro-batches later (a later call of the stream)."""
    return tuple(replace(a, micro_batch=a.micro_batch + offset) for a in actions)


def _check(name: str, at_least_p: bool):
    def check(stages: int, micro_batches: int, chunks: int) -> None:
        fixed_chunks(name, 1)(stages, micro_batches, chunks)
        need = stages if at_least_p else stages - 1
        require(micro_batches >= need, f"{name} needs micro_batches >= {need} at stages={stages} (got "
                                       f"micro_batches={micro_batches}): use micro_batches={need} or more")
    return check


def _register(name: str, summary: str, source: str, at_least_p: bool = False) -> None:
    @register(name, summary=summary, source=source, placement="loop", check=_check(name, at_least_p),
              synchronous=False,
              constraints=f"chunks = 1; m >= {'p' if at_least_p else 'p-1'}; asynchronous "
                          f"(shown: {SHOWN_STEPS} calls and the drain)")
    def generate(stages: int, micro_batches: int, chunks: int) -> Schedule:
        return stream(name, stages, micro_batches, SHOWN_STEPS)


_register("pipedream", "1F1B without flush, an update per micro-batch, weight stashing",
          "Narayanan et al. 2019 (PipeDream, SOSP)")
_register("pipedream-2bw", "1F1B without flush, double-buffered weights, W(t+1) = W(t) - lr*g(W(t-1))",
          "Narayanan et al. 2021 (PipeDream-2BW, ICML)", at_least_p=True)
_register("pipemare", "1F1B without flush, one weight version, lr rescheduling + discrepancy correction",
          "Yang et al. 2021 (PipeMare, MLSys)")
