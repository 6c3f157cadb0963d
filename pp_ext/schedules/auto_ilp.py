"""The exact schedule for ``auto``: an integer linear program, solved by HiGHS.

Qi, Wan, Huang and Lin, "Zero Bubble Pipeline Parallelism", ICLR 2024, Sec. 3
(the ILP formulation): start times of every F, I, W pass on every stage, binary
order variables between passes of one stage, data dependencies with the
communication time, and a memory limit counted at each F; minimise the makespan.
The paper's code switches the ILP off and ships its heuristic; here it runs where
it solves within a time limit, to measure how far :func:`.auto.auto_schedule`'s
heuristic is from the optimum: the heuristic's schedule is the solver's starting
point, so the ILP never does worse, and the solver's proven lower bound gives the
gap.

The model, for p ranks (one chunk each, loop placement) and m micro-batches:

- ``S[r,k,j]`` start of kind k in {F, I, W} of micro-batch j on rank r, ``C`` the makespan;
- passes of one kind run in micro-batch order on a rank (as in every schedule in
  the literature and in the heuristic; it removes the m! relabellings of the
  micro-batches, so the optimum and the bound are over such in-order schedules);
- F of stage r waits for F of stage r-1 plus ``comm``; I waits for F of its stage
  and for I of stage r+1 plus ``comm`` (the last stage's only for its own F); W for I;
- two passes of one rank never overlap: for each pair whose order is not already
  implied (F_j or I_j against I_k or W_k with k < j) a binary chooses it, with the
  heuristic's makespan as the big-M;
- memory: when F_j starts, the micro-batches k < j whose W has not run yet, plus
  j itself, are at most the rank's limit (the simulator's peak activations).

Needs the optional ``highspy`` (``pip install 'pp-ext[tune]'``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .actions import Action, Kind
from .auto import auto_schedule, memory_limits, scaled_costs
from .costs import Costs, Number
from .placement import Placement
from .schedule import Schedule
from .simulate import simulate
from .validate import validate

KINDS = (Kind.F, Kind.I, Kind.W)
INSTALL_HINT = "the exact ILP needs highspy (HiGHS): pip install 'pp-ext[tune]'"


def require_highspy():
    """The ``highspy`` module, or one clear ModuleNotFoundError naming the fix."""
    try:
        import highspy
    except ModuleNotFoundError:
        raise ModuleNotFoundError(INSTALL_HINT) from None
    return highspy


@dataclass(frozen=True)
class IlpResult:
    """The heuristic against the ILP on the same costs and memory limit.

    ``bound`` is the solver's proven lower bound on the makespan of any in-order
    schedule (equal to ``ilp_makespan`` when ``optimal``); ``gap`` is how much
    longer than that bound the heuristic's step may be, as a share of it.
    """

    heuristic: Schedule
    heuristic_makespan: Number
    ilp: Schedule
    ilp_makespan: Number
    bound: Number
    optimal: bool
    seconds: float

    @property
    def gap(self) -> float:
        return max(0.0, float(self.heuristic_makespan / self.bound) - 1) if self.bound > 0 else 0.0

    @property
    def best(self) -> Schedule:
        return self.ilp if self.ilp_makespan < self.heuristic_makespan else self.heuristic


def solve_ilp(
    stages: int,
    micro_batches: int,
    costs: Costs | None = None,
    memory_limit: Number | None = None,
    time_limit: float = 10.0,
) -> IlpResult:
    """Solve the module's ILP within ``time_limit`` seconds, started from the heuristic."""
    highspy = require_highspy()
    costs = costs or Costs()
    p, m = stages, micro_batches
    limits = memory_limits(p, m, memory_limit)
    heuristic = auto_schedule(p, m, costs, memory_limit, chunks=1)
    heuristic_sim = simulate(heuristic, costs)
    # integers where the costs are fractions: the solver's tolerances then cannot blur an order
    cost, comm, scale = scaled_costs(Placement.loop(p), costs)
    big_m = float(heuristic_sim.makespan * scale)

    h = highspy.Highs()
    h.silent()
    h.setOptionValue("time_limit", float(time_limit))
    h.setOptionValue("threads", 1)
    # "optimal" must mean optimal: HiGHS stops at a 0.01% gap by default; where the
    # scaled costs are integers so is every makespan, and a gap below 1 closes it
    integral = all(isinstance(v, int) for c in cost for v in c.values())
    h.setOptionValue("mip_rel_gap", 0.0)
    h.setOptionValue("mip_abs_gap", 0.999 if integral else 1e-9 * big_m)
    start = {
        (r, kind, j): h.addVariable(lb=0, ub=big_m)
        for r in range(p)
        for kind in KINDS
        for j in range(m)
    }
    makespan = h.addVariable(lb=0, ub=big_m)
    d = {(r, kind): float(cost[r][kind]) for r in range(p) for kind in KINDS}

    def end(r: int, kind: Kind, j: int):
        return start[(r, kind, j)] + d[(r, kind)]

    for r in range(p):
        for kind in KINDS:
            for j in range(m - 1):
                h.addConstr(start[(r, kind, j + 1)] >= end(r, kind, j))
        for j in range(m):
            if r > 0:
                h.addConstr(start[(r, Kind.F, j)] >= end(r - 1, Kind.F, j) + float(comm))
            h.addConstr(start[(r, Kind.I, j)] >= end(r, Kind.F, j))
            if r < p - 1:
                h.addConstr(start[(r, Kind.I, j)] >= end(r + 1, Kind.I, j) + float(comm))
            h.addConstr(start[(r, Kind.W, j)] >= end(r, Kind.I, j))
        h.addConstr(makespan >= end(r, Kind.W, m - 1))
        # the rank's passes all follow its first F, and its I's and W's its first I:
        # implied by the order binaries, but the LP relaxation cannot see it, and
        # without these cuts the bound stays far below the optimum
        work = {kind: m * d[(r, kind)] for kind in KINDS}
        h.addConstr(makespan >= start[(r, Kind.F, 0)] + sum(work.values()))
        h.addConstr(makespan >= start[(r, Kind.I, 0)] + work[Kind.I] + work[Kind.W])

    # before[(r, a, j, b, k)] = 1: pass a of micro-batch j runs before pass b of k (k < j)
    before = {}
    for r in range(p):
        for a, b in ((Kind.F, Kind.I), (Kind.F, Kind.W), (Kind.I, Kind.W)):
            for j in range(m):
                for k in range(j):
                    o = before[(r, a, j, b, k)] = h.addBinary()
                    h.addConstr(start[(r, b, k)] >= end(r, a, j) - big_m * (1 - o))
                    h.addConstr(start[(r, a, j)] >= end(r, b, k) - big_m * o)
        for j in range(limits[r], m):
            h.addConstr(1 + sum(before[(r, Kind.F, j, Kind.W, k)] for k in range(j)) <= limits[r])

    # the heuristic as the starting solution: its simulated starts and the orders they imply
    begin = {
        (r, s.action.kind, s.action.micro_batch): float(s.start * scale)
        for r, row in enumerate(heuristic_sim.timeline)
        for s in row
    }
    position = {
        (r, a.kind, a.micro_batch): i
        for r, prog in enumerate(heuristic.programs)
        for i, a in enumerate(prog)
    }
    values = [0.0] * h.getNumCol()
    for key, var in start.items():
        values[var.index] = begin[key]
    values[makespan.index] = big_m
    for (r, a, j, b, k), var in before.items():
        values[var.index] = float(position[(r, a, j)] < position[(r, b, k)])
    solution = highspy.HighsSolution()
    solution.col_value = values
    solution.value_valid = True
    h.setSolution(solution)
    h.minimize(makespan)

    info = h.getInfo()
    optimal = h.getModelStatus() == highspy.HighsModelStatus.kOptimal
    col = h.getSolution().col_value
    programs = []
    for r in range(p):
        # order by start; a zero-length pass ties with the next one and goes first
        keys = sorted(
            (
                (
                    col[start[(r, k, j)].index],
                    col[start[(r, k, j)].index] + d[(r, k)],
                    KINDS.index(k),
                    j,
                ),
                (k, j),
            )
            for k in KINDS
            for j in range(m)
        )
        programs.append(tuple(Action(k, j) for _, (k, j) in keys))
    ilp = Schedule("auto", Placement.loop(p), m, tuple(programs))
    validate(ilp)
    ilp_makespan = simulate(ilp, costs).makespan
    bound = ilp_makespan if optimal else min(ilp_makespan, info.mip_dual_bound / scale)
    return IlpResult(
        heuristic, heuristic_sim.makespan, ilp, ilp_makespan, bound, optimal, h.getRunTime()
    )
