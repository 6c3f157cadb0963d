"""``auto``: the Zero Bubble paper's heuristic (Qi et al. 2024, Sec. 3) in loop and V
placement against every fixed synchronous schedule that fits its memory, the handmade
ZB-H1/H2 at their memory, and the exact ILP where HiGHS is installed."""

import random
from fractions import Fraction as Fr

import brute_force
import pytest

from pp_ext.schedules import (
    REGISTRY,
    ConstraintError,
    Costs,
    Placement,
    build,
    names,
    simulate,
    validate,
)
from pp_ext.schedules.auto import (
    PATIENCE,
    auto_schedule,
    greedy,
    heuristic,
    memory_limits,
    origin,
    policies,
    ranked,
)

# Per-rank F, I (the paper's B), W and comm in ms, shaped like the Zero Bubble paper's
# profiled GPT models of 1.5B to 28.3B parameters: I about F, W half of it or more,
# comm a few per cent of F; plus the unit costs and two harder shapes.
COSTS = {
    "1.5b": Costs(Fr("18.5"), Fr("18.1"), Fr("9.3"), Fr("0.6")),
    "6.2b": Costs(Fr("29.7"), Fr("29.5"), Fr("17.6"), Fr("0.7")),
    "14.6b": Costs(Fr("45.0"), Fr("44.5"), Fr("20.9"), Fr("0.9")),
    "28.3b": Costs(Fr("58.9"), Fr("57.4"), Fr("34.0"), Fr("1.2")),
    "unit": Costs(),
    "slow-link": Costs(1, 1, 1, Fr(1, 2)),
    "heavy-forward": Costs(Fr(13, 10), 1, Fr(4, 5), Fr(1, 50)),
}
SIZES = [(2, 2), (2, 4), (2, 8), (4, 4), (4, 8), (4, 12), (6, 6), (6, 12), (8, 8)]


def rank_costs(p, seed):
    """Stages of different costs (as measured layers are): F, I in 0.5-1.5, W in 0.2-1."""
    rng = random.Random(seed)
    stages = tuple(
        (Fr(rng.randint(5, 15), 10), Fr(rng.randint(5, 15), 10), Fr(rng.randint(2, 10), 10))
        for _ in range(p)
    )
    return Costs(comm=Fr(rng.randint(0, 3), 10), per_stage=stages)


@pytest.mark.parametrize("name", sorted(COSTS))
def test_the_heuristic_alone_matches_zb_h1_and_zb_h2_at_their_memory(name):
    """The issue's bar, met by the greedy search itself (no handmade schedule offered)."""
    costs = COSTS[name]
    for p, m in SIZES:
        for limit, handmade in ((p, "zb-h1"), (2 * p, "zb-h2")):
            limits = memory_limits(p, m, limit)
            programs, makespan = heuristic(Placement.loop(p), m, costs, limits)
            reference = simulate(build(handmade, p, m), costs)
            assert makespan <= reference.makespan, (
                name,
                p,
                m,
                handmade,
                makespan,
                reference.makespan,
            )
            sim = simulate(auto_schedule(p, m, costs, limit, chunks=1), costs)
            assert sim.makespan <= makespan and sim.bubble_ratio <= reference.bubble_ratio
            assert max(sim.peak_activations_per_rank) <= min(limit, m)


def test_auto_is_never_worse_than_the_handmade_ones_on_uneven_stages():
    worse = 0
    for seed in range(24):
        p = (2, 3, 4, 6)[seed % 4]
        m = (p, p + 2, 2 * p)[seed % 3]
        costs = rank_costs(p, seed)
        for limit, handmade in ((p, "zb-h1"), (2 * p, "zb-h2")):
            reference = simulate(build(handmade, p, m), costs)
            sim = simulate(auto_schedule(p, m, costs, limit, chunks=1), costs)
            assert sim.makespan <= reference.makespan and sim.peak_activations <= limit
            worse += (
                heuristic(Placement.loop(p), m, costs, memory_limits(p, m, limit))[1]
                > reference.makespan
            )
    assert (
        worse <= 3
    )  # the greedy alone loses to the handmade order on a few: measured 3 of 48 (seeds 11, 14, 19)


def test_greedy_times_are_the_simulators():
    """The search ranks candidates by the greedy's own clock: it must be the simulator's."""
    from pp_ext.schedules import Schedule

    for costs in (COSTS["1.5b"], rank_costs(4, 1), Costs(1.0, 1.3, 0.7, 0.1), rank_costs(6, 2)):
        p, m = len(costs.per_stage or ()) or 3, 7
        placement = Placement.v(p // 2, 2) if costs.per_stage and p == 6 else Placement.loop(p)
        p = placement.ranks
        limits = memory_limits(p, m, p + 1, placement.chunks)
        for policy in policies(limits, patience=PATIENCE)[::7]:
            programs, makespan = greedy(placement, m, costs, limits, policy)
            schedule = Schedule("auto", placement, m, tuple(map(tuple, programs)))
            validate(schedule)
            sim = simulate(schedule, costs)
            assert (
                sim.makespan == pytest.approx(makespan, rel=1e-12) and sim.peak_activations <= p + 1
            )


def model_costs(p, stages, head, fiw):
    """A model of p ranks' worth of equal blocks cut into ``stages`` equal stages (p: one
    chunk per rank; 2p: two), F:I:W per block as ``fiw``; ``head`` adds that share of a
    rank's blocks to the last stage (a large vocabulary's output layer)."""
    share = Fr(p, stages)
    per_stage = [tuple(x * share for x in fiw) for _ in range(stages)]
    per_stage[-1] = tuple(x + head * y for x, y in zip(per_stage[-1], fiw))
    return Costs(comm=Fr(fiw[0]) / 30, per_stage=tuple(per_stage))


SHAPES = {  # (head, F:I:W): equal stages or a heavy last stage; unit costs or the paper's 1.5B model
    "equal-1:1:1": (0, (1, 1, 1)),
    "equal-paper": (0, (Fr("18.5"), Fr("18.1"), Fr("9.3"))),
    "head-1:1:1": (Fr(3, 2), (1, 1, 1)),
    "head-paper": (Fr(3, 2), (Fr("18.5"), Fr("18.1"), Fr("9.3"))),
}
FIXED = [n for n in names(synchronous=True) if n != "auto"]
# of the 24 points of each shape below, where auto is strictly shorter than every fixed
# schedule that fits, as measured (exact costs: deterministic); losing any of them fails
MEASURED_SHORTER = {"equal-1:1:1": 14, "equal-paper": 14, "head-1:1:1": 7, "head-paper": 10}


def fixed_makespans(p, m, cuts, limit, replicas):
    """Makespan of every fixed synchronous schedule of the registry (default chunks) whose
    peak activations per rank fit ``limit`` and whose weight copies fit ``replicas``."""
    found = {}
    for name in FIXED:
        try:
            schedule = build(name, p, m)
        except ConstraintError:
            continue
        sim = simulate(schedule, cuts[schedule.placement.stages])
        if sim.peak_activations <= limit and sim.weight_copies <= replicas:
            found[name] = sim.makespan
    return found


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_auto_is_never_longer_than_a_fixed_schedule_that_fits_its_memory(shape):
    """The issue's bar (issue 8): in simulation, auto under a memory limit is never longer
    than any fixed synchronous schedule (any placement) that fits the same limit."""
    head, fiw = SHAPES[shape]
    shorter = 0
    for p in range(2, 7):
        cuts = {n: model_costs(p, n, head, fiw) for n in (p, 2 * p)}
        for m in (p, 2 * p, 3 * p):
            # 1F1B's memory (zb-h1's, zbv's, chimera's activations); for p <= 4 also 2p (zb-h2's 2p-1,
            # dualpipev's p + 1/2, interleaved-1f1b's p + (p-1)/2)
            for limit in (p, 2 * p) if p <= 4 else (p,):
                schedule = auto_schedule(p, m, list(cuts.values()), limit)
                validate(schedule)
                assert schedule.placement.name in ("loop", "v")
                sim = simulate(schedule, cuts[schedule.placement.stages])
                assert sim.peak_activations <= limit and sim.weight_copies == 1
                fixed = fixed_makespans(p, m, cuts, limit, replicas=1)
                assert sim.makespan <= min(fixed.values()), (
                    shape,
                    p,
                    m,
                    limit,
                    sim.makespan,
                    fixed,
                )
                shorter += sim.makespan < min(fixed.values())
    print(
        shape,
        "auto strictly shorter than every fixed schedule that fits on",
        shorter,
        "of 24 points",
    )
    assert shorter >= MEASURED_SHORTER[shape]


def test_auto_with_two_weight_replicas_weighs_chimera():
    """With ``replicas=2`` the bidirectional placement (Chimera) is a candidate: at p=2 at
    unit costs its two pipelines start together, which no single pipeline can."""
    for shape in ("equal-1:1:1", "head-paper"):
        head, fiw = SHAPES[shape]
        for p, m in ((2, 4), (2, 6), (4, 8)):
            cuts = {n: model_costs(p, n, head, fiw) for n in (p, 2 * p)}
            schedule = auto_schedule(p, m, list(cuts.values()), p, replicas=2)
            validate(schedule)
            sim = simulate(schedule, cuts[schedule.placement.stages])
            fixed = fixed_makespans(p, m, cuts, p, replicas=2)
            assert sim.makespan <= min(fixed.values()) and sim.peak_activations <= p, (
                shape,
                p,
                m,
                fixed,
            )
    assert auto_schedule(2, 4, Costs(), replicas=2).placement.name == "bidirectional"


def test_chunks_choose_the_placement():
    costs = [model_costs(4, n, Fr(3, 2), (1, 1, 1)) for n in (4, 8)]
    assert [
        (s.placement.name, s.chunks)
        for s in (auto_schedule(4, 8, costs, chunks=1), auto_schedule(4, 8, costs, chunks=2))
    ] == [("loop", 1), ("v", 2)]
    assert (
        auto_schedule(4, 8, costs).placement.name == "v"
    )  # the head is balanced against the embedding
    assert (
        auto_schedule(4, 8, costs[:1]).placement.name == "loop"
    )  # only a cut into 4 stages was measured
    assert (build("auto", 4, 8).placement.name, build("auto", 4, 8, 2).placement.name) == (
        "loop",
        "v",
    )
    assert REGISTRY["auto"].default_chunks == 1


def test_memory_limit_trades_memory_for_time():
    costs = COSTS["6.2b"]
    p, m = 4, 12
    times = []
    for limit in (1, 2, 3, 4, 6, 8):
        sim = simulate(auto_schedule(p, m, costs, limit), costs)
        assert sim.peak_activations <= limit
        times.append(sim.makespan)
    assert times == sorted(times, reverse=True) and times[0] > times[-1]


def test_per_rank_limits_and_bad_limits():
    sim = simulate(auto_schedule(3, 6, Costs(), [4, 2, 1]))
    assert all(a <= b for a, b in zip(sim.peak_activations_per_rank, (4, 2, 1)))
    with pytest.raises(
        ConstraintError, match=r"memory limit 0\.5 on rank 0 is below one micro-batch.*>= 1"
    ):
        auto_schedule(2, 4, memory_limit=0.5)
    with pytest.raises(ConstraintError, match="gives 3 ranks, the pipeline has 2"):
        auto_schedule(2, 4, memory_limit=[2, 2, 2])
    with pytest.raises(
        ConstraintError,
        match=r"auto holds 1 chunk per rank \(loop placement\) or 2 \(V placement\) "
        r"\(got chunks=3\)",
    ):
        build("auto", 2, 4, 3)
    with pytest.raises(
        ConstraintError, match="the costs give 3 stages, which fit no placement of 2 ranks"
    ):
        auto_schedule(2, 4, rank_costs(3, 0))


# ---------------------------------------------------------------- the exact ILP


def ilp():
    pytest.importorskip(
        "highspy", reason="the ILP needs the optional highspy (pip install 'pp-ext[tune]')"
    )
    from pp_ext.schedules.auto_ilp import solve_ilp

    return solve_ilp


@pytest.mark.parametrize("name", ["unit", "1.5b", "heavy-forward", "slow-link"])
def test_ilp_and_heuristic_agree_within_the_gap(name):
    solve_ilp = ilp()
    costs = COSTS[name]
    # p=4, m=8 takes HiGHS 1.6-2.7 s per cost model (measured; every other size < 1 s):
    # the quick subset solves it at unit costs, where the optimum is known (below)
    sizes = [(2, 3, 2), (2, 4, 1), (3, 4, 3), (3, 6, 3), (3, 6, 6), (4, 6, 4)] + [(4, 8, 4)] * (
        name == "unit"
    )
    for p, m, limit in sizes:
        result = solve_ilp(p, m, costs, limit, time_limit=30)
        assert result.optimal, (name, p, m, limit)
        sim = simulate(result.ilp, costs)
        assert sim.peak_activations <= limit
        assert result.bound <= result.ilp_makespan <= result.heuristic_makespan
        assert result.heuristic_makespan <= result.bound * (1 + result.gap) + 1e-9
        assert result.gap < 0.02, (name, p, m, limit, result)
        if (
            name == "unit" and m >= p and limit >= p
        ):  # the flushed lower bound 3m+p-1 is the optimum
            assert result.ilp_makespan == 3 * m + p - 1


def test_ilp_beats_the_heuristic_where_it_can():
    """Uneven stages where the greedy order is short of optimal: the ILP finds a shorter
    order, and both makespans are what an independent simulation of their programs
    gives (tests/brute_force.py), above the chain bound of every rank (its first F
    cannot start before the forwards and messages of the stages before it, and then
    it has m (F + I + W) of work)."""
    solve_ilp = ilp()
    stages = (
        (Fr(3, 5), 1, 1),
        (Fr(11, 10), Fr(13, 10), Fr(1, 2)),
        (Fr(9, 10), Fr(9, 10), Fr(9, 10)),
        (Fr(13, 10), Fr(11, 10), Fr(1, 5)),
    )
    costs = Costs(comm=Fr(3, 10), per_stage=stages)
    p, m = 4, 8
    result = solve_ilp(p, m, costs, 4, time_limit=30)
    assert result.optimal and result.bound == result.ilp_makespan
    assert result.ilp_makespan == brute_force.makespan(result.ilp, costs)
    assert result.heuristic_makespan == brute_force.makespan(result.heuristic, costs)
    chain = max(
        sum(stages[s][0] + costs.comm for s in range(r)) + m * sum(stages[r]) for r in range(p)
    )
    assert chain <= result.ilp_makespan < result.heuristic_makespan
    assert result.best is result.ilp and 0 < result.gap < 0.01


def test_costs_by_placement_name_weigh_each_placement_on_its_own():
    """``pp-ext bench`` measures every candidate layout and passes the costs keyed by
    placement name: each placement is then simulated on its own costs (a layout whose
    measured passes are slower loses even where unit costs would pick it)."""
    fast, slow = Costs(), Costs(forward=2, input_grad=2, weight_grad=2)
    for winner in ("loop", "v", "bidirectional"):
        costs = {name: fast if name == winner else slow for name in ("loop", "v", "bidirectional")}
        assert auto_schedule(2, 4, costs, 2, replicas=2).placement.name == winner, winner
    with pytest.raises(
        ConstraintError,
        match="the costs are for placements loop, which give no placement of 2 ranks with chunks=2",
    ):
        auto_schedule(2, 4, {"loop": fast}, 2, chunks=2)


def test_ranked_lists_distinct_programs_shortest_first_and_names_the_fixed_ones():
    """What ``pp-ext bench`` times against each other: the first is auto_schedule's
    choice, makespans ascend, no program twice, and a fixed schedule's program is
    recognised as that schedule (the heuristic's own is not)."""
    for p, m in ((2, 4), (4, 8)):
        cuts = {n: model_costs(p, n, Fr(3, 2), (1, 1, 1)) for n in (p, 2 * p)}
        for replicas in (1, 2):
            found = ranked(p, m, list(cuts.values()), p, replicas=replicas)
            assert found[0][0] == auto_schedule(p, m, list(cuts.values()), p, replicas=replicas)
            assert [mk for _, mk in found] == sorted(mk for _, mk in found)
            keys = [(s.placement.name, s.programs) for s, _ in found]
            assert len(set(keys)) == len(keys)
            for schedule, makespan in found:
                validate(schedule)
                assert simulate(schedule, cuts[schedule.placement.stages]).makespan == makespan
                name = origin(schedule)
                if name is not None:
                    assert build(name, p, m, schedule.chunks).programs == schedule.programs
            fixed = {origin(s) for s, _ in found} - {None}
            assert {"1f1b", "zb-h1", "zbv"} <= fixed and ("chimera" in fixed) == (replicas == 2)
    assert origin(build("auto", 2, 4)) is None  # unit costs: the heuristic's own loop program
