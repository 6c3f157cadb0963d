"""ZB-H1, ZB-H2 (Qi et al. 2024, ICLR) and ZB-V (Qi et al. 2024, controllable memory):
exact bubbles, peak activations and the thresholds where they reach the lower bound."""

from fractions import Fraction as Fr

import brute_force
import pytest

from pp_ext.schedules import REGISTRY, ConstraintError, Costs, build, get, lower, simulate
from pp_ext.schedules.simulate import steady_state

NAMES = ("zb-h1", "zb-h2", "zbv")


def lb(p, m, v=1):
    """Flushed bubble floor at unit costs (SCHEDULES.md)."""
    return Fr(p - 1, 3 * v * m + p - 1)


def generate(name, p, m):
    """Generation only (no validation) for the metric grids; validity is tested below."""
    spec = get(name)
    return spec.generate(p, m, spec.default_chunks)


def sizes(p):
    """Micro-batch counts around every threshold, within 1..4p."""
    return sorted(
        {
            m
            for m in (1, p - 1, p, 3 * p // 2 - 1, 3 * p // 2, 2 * p - 2, 2 * p - 1, 2 * p + 3)
            if 1 <= m <= 4 * p
        }
    )


@pytest.mark.parametrize("name", NAMES)
def test_builds_and_validates_at_every_threshold(name):
    for p in range(1, 9):
        for m in sizes(p):
            sched = build(name, p, m)  # counts, order, lowering and dry run
            assert sched.ranks == p and sched.micro_batches == m


def test_registered_with_their_placements():
    assert (REGISTRY["zb-h1"].placement, REGISTRY["zb-h1"].default_chunks) == ("loop", 1)
    assert (REGISTRY["zb-h2"].placement, REGISTRY["zb-h2"].default_chunks) == ("loop", 1)
    assert (REGISTRY["zbv"].placement, REGISTRY["zbv"].default_chunks) == ("v", 2)
    assert build("zbv", 3, 6).placement.name == "v"


@pytest.mark.parametrize(
    "name,chunks,fix",
    [
        ("zb-h1", 2, "use chunks=1"),
        ("zb-h2", 3, "use chunks=1"),
        ("zbv", 1, "use chunks=2"),
        ("zbv", 4, "use chunks=2"),
    ],
)
def test_chunk_constraint_names_the_valid_value(name, chunks, fix):
    with pytest.raises(ConstraintError, match=f"{name} holds exactly .*got chunks={chunks}.*{fix}"):
        build(name, 4, 8, chunks)


def test_zb_h1_reaches_the_lower_bound_for_m_at_least_p():
    for p in range(2, 9):
        for m in (p, p + 1, 2 * p - 1, 2 * p + 3):
            sim = simulate(generate("zb-h1", p, m))
            assert sim.bubble_ratio == lb(p, m), (p, m)
            assert sim.makespan == 3 * m + p - 1
            assert sim.peak_activations == p


@pytest.mark.parametrize("name", ["zb-h1", "zb-h2"])
def test_below_p_the_makespan_is_the_chain_bound(name):
    # m < p: the last rank's m F and m I end at 2m+p-1 at best, the last gradient
    # then climbs p-1 ranks and rank 0 runs its W: 2m+2p-1 > 3m+p-1
    for p in range(2, 9):
        for m in range(1, p):
            sim = simulate(generate(name, p, m))
            assert sim.makespan == 2 * m + 2 * p - 1, (p, m)
            assert sim.bubble_ratio == 1 - Fr(3 * m, 2 * m + 2 * p - 1) > lb(p, m)
            assert sim.peak_activations == m


@pytest.mark.parametrize(
    "f,i,w", [(1, 1, 1), (2, 1, 1), (1, 2, 1), (3, 2, 1), (2, 2, Fr(1, 2)), (Fr(3, 2), 1, 1)]
)
def test_zb_h1_bubble_time_is_p_minus_1_times_f_plus_i_minus_w(f, i, w):
    # the paper's (p-1)(F+I-W), which needs W <= min(F, I)
    costs = Costs(Fr(f), Fr(i), Fr(w))
    for p in (2, 3, 5):
        for m in (p, 2 * p + 1):
            sim = simulate(generate("zb-h1", p, m), costs)
            assert sim.makespan - m * (f + i + w) == (p - 1) * (f + i - w), (p, m)


def test_zb_h1_bubble_when_w_is_the_slowest_pass():
    # W > min(F, I): the bubble per rank becomes (p-1) max(F+I-W, F, I) flushed and
    # (p-1) max(F+I-W, I) in steady state, not the paper's form; found by simulation,
    # so checked against the independent tests/brute_force.py as well
    for f, i, w in [(1, 1, 2), (1, Fr(1, 2), 1), (2, 1, 3)]:
        p, m = 4, 6
        sched, costs = generate("zb-h1", p, m), Costs(Fr(f), Fr(i), Fr(w))
        flushed, steady = (p - 1) * max(f + i - w, f, i), (p - 1) * max(f + i - w, i)
        assert simulate(sched, costs).makespan - m * (f + i + w) == flushed
        assert brute_force.makespan(sched, costs) - m * (f + i + w) == flushed
        assert steady_state(sched, costs).period - m * (f + i + w) == steady
        assert brute_force.period(sched, costs) - m * (f + i + w) == steady


def test_zb_h1_steady_state_keeps_its_bubble():
    for p, m in [(2, 4), (4, 4), (4, 9)]:
        st = steady_state(generate("zb-h1", p, m))
        assert st.period == 3 * m + p - 1 and st.bubble_ratio == lb(p, m)


def test_zb_h2_flushed_reaches_the_lower_bound_for_m_at_least_p():
    for p in range(2, 9):
        for m in (p, p + 1, 2 * p - 2, 2 * p - 1, 2 * p + 3):
            sim = simulate(generate("zb-h2", p, m))
            assert sim.bubble_ratio == lb(p, m), (p, m)
            assert sim.peak_activations == min(m, 2 * p - 1)


def test_zb_h2_is_zero_bubble_in_steady_state_from_2p_minus_1():
    for p in (2, 3, 5, 8):
        assert steady_state(generate("zb-h2", p, 2 * p - 1)).bubble_ratio == 0, p
        assert steady_state(generate("zb-h2", p, 2 * p - 2)).bubble_ratio > 0, (
            p
        )  # the threshold is tight
    assert steady_state(generate("zb-h2", 4, 13)).period == 3 * 13


def test_zb_h2_steady_state_with_general_costs():
    # the papers' (p-1)(F+I-2W) when I <= F; (p-1) max(0, F+I-2W, I-F) in general, found
    # by simulation, so checked against the independent tests/brute_force.py as well
    p, m = 3, 7
    for f, i, w in [(2, 1, Fr(1, 2)), (1, 1, 2), (Fr(3, 2), 1, 1), (1, 2, 1), (1, 2, 2)]:
        sched, costs = generate("zb-h2", p, m), Costs(Fr(f), Fr(i), Fr(w))
        bubble = (p - 1) * max(0, f + i - 2 * w, i - f)
        assert steady_state(sched, costs).period - m * (f + i + w) == bubble, (f, i, w)
        assert brute_force.period(sched, costs) - m * (f + i + w) == bubble, (f, i, w)


def test_zbv_reaches_the_lower_bound_from_three_halves_p():
    for p in range(2, 9):
        threshold = 3 * p // 2
        for m in {max(1, threshold - 2), threshold - 1, threshold, 2 * p - 1, 2 * p + 3}:
            sim = simulate(generate("zbv", p, m))
            assert (sim.bubble_ratio == lb(p, m, 2)) == (m >= threshold), (p, m, sim.bubble_ratio)
            assert sim.bubble_ratio >= lb(p, m, 2)
            assert sim.peak_activations == min(m, p)  # a chunk's activation is 1/2 unit


def test_zbv_matches_pytorch_reference_point():
    sim = simulate(build("zbv", 4, 8))
    assert sim.bubble_ratio == Fr(3, 51) and sim.peak_activations == 4


def test_zbv_is_zero_bubble_in_steady_state_from_2p_minus_1():
    for p in (2, 3, 5):
        assert steady_state(generate("zbv", p, 2 * p - 1)).bubble_ratio == 0, p
        assert steady_state(generate("zbv", p, 2 * p - 2)).bubble_ratio > 0, p
    assert steady_state(generate("zbv", 4, 16)).period == 3 * 16


def test_zbv_turns_round_on_the_last_rank_without_a_message():
    p, m = 4, 8
    sched = build("zbv", p, m)
    last = sched.programs[p - 1]
    # stage p-1 (chunk 0) hands micro-batch 0 straight to stage p (chunk 1) on rank p-1
    assert [str(a) for a in last[:3]] == ["F0", "F0.c1", "F1"]
    assert (sched.stage(p - 1, last[0]), sched.stage(p - 1, last[1])) == (p - 1, p)
    lowered = lower(sched)
    assert all(a.peer != p - 1 for a in lowered.programs[p - 1] if a.kind.is_comm)
    # 2p stages, 2p-1 boundaries, one of them local: 2p-2 activations and gradients each
    assert simulate(sched).messages == 2 * m * (2 * p - 2)


def zb_h1_rule(p, m, rank):
    """ZB-H1's order by its rule (zero_bubble.py, Qi et al. 2024 Sec. 3), written here
    independently of the generator: 1F1B on F and I (p-1-rank warm-up forwards, then
    one F and one I in turn), W_k right after I_{k+rank}, the remaining W's at the end."""
    warmup = min(p - 1 - rank, m)
    program, forwards = [f"F{k}" for k in range(warmup)], warmup
    for k in range(m):
        if forwards < m:
            program.append(f"F{forwards}")
            forwards += 1
        program.append(f"I{k}")
        if k >= rank:
            program.append(f"W{k - rank}")
    return program + [f"W{k}" for k in range(max(0, m - rank), m)]


def test_zb_h1_orders_follow_the_rule():
    for p in range(1, 8):
        for m in range(1, 3 * p + 2):
            sched = generate("zb-h1", p, m)
            assert [list(map(str, prog)) for prog in sched.programs] == [
                zb_h1_rule(p, m, r) for r in range(p)
            ], (p, m)


def test_hand_checked_zb_h1_p3_m4():
    # str(build("zb-h1", 3, 4)) is zb_h1_rule(3, 4, rank) for ranks 0..2:
    #      0  1  2  3  4  5  6  7  8  9  10 11
    # r0   F0 F1 F2 I0 W0 F3 I1 W1 I2 W2 I3 W3
    # r1   F0 F1 I0 F2 I1 W0 F3 I2 W1 I3 W2 W3
    # r2   F0 I0 F1 I1 F2 I2 W0 F3 I3 W1 W2 W3
    # Simulated (time_grid): rank r waits r for F0 to come down, then never idles until
    # the last gradient climbs: makespan 3m+p-1 = 14, every rank idle p-1 = 2:
    #      0  1  2  3  4  5  6  7  8  9  10 11 12 13
    # r0   F0 F1 F2 .  .  I0 W0 F3 I1 W1 I2 W2 I3 W3
    # r1   .  F0 F1 .  I0 F2 I1 W0 F3 I2 W1 I3 W2 W3
    # r2   .  .  F0 I0 F1 I1 F2 I2 W0 F3 I3 W1 W2 W3
    sim = simulate(build("zb-h1", 3, 4))
    assert sim.makespan == 3 * 4 + 3 - 1 == brute_force.makespan(sim.schedule)
    assert sim.bubble_ratio == Fr(1, 7) == lb(3, 4)
    assert [row[0].start for row in sim.timeline] == [0, 1, 2]


def test_zb_h2_is_a_parallelogram_from_2p_minus_1():
    """From m = 2p-1 every rank is busy without a break from its first action (at r:
    F0 comes down one unit per rank) to its last, 3m units of work later. At m = 2p-1
    the last rank skips W for 2(p-1) = m-1 rounds: F/I pairs, then all m W's."""
    # time_grid(simulate(build("zb-h2", 3, 5))):
    #      0  1  2  3  4  5  6  7  8  9  10 11 12 13 14 15 16
    # r0   F0 F1 F2 F3 F4 I0 W0 I1 W1 I2 W2 I3 W3 I4 W4 .  .
    # r1   .  F0 F1 F2 I0 F3 I1 F4 I2 W0 I3 W1 I4 W2 W3 W4 .
    # r2   .  .  F0 I0 F1 I1 F2 I2 F3 I3 F4 I4 W0 W1 W2 W3 W4
    for p in range(2, 7):
        for m in (2 * p - 1, 2 * p, 3 * p):
            sim = simulate(generate("zb-h2", p, m))
            assert [(row[0].start, row[-1].end) for row in sim.timeline] == [
                (r, r + 3 * m) for r in range(p)
            ], (p, m)
        last = generate("zb-h2", p, 2 * p - 1).programs[p - 1]
        assert list(map(str, last)) == [x for k in range(2 * p - 1) for x in (f"F{k}", f"I{k}")] + [
            f"W{k}" for k in range(2 * p - 1)
        ]


def pytorch_zbv_orders(p, m):
    """PyTorch's ScheduleZBVZeroBubble rank orders (torch.distributed.pipelining), an
    implementation of the same paper independent of pp-ext's, in pp-ext's short form."""
    from torch.distributed.pipelining.schedules import ScheduleZBVZeroBubble

    reference = ScheduleZBVZeroBubble.__new__(
        ScheduleZBVZeroBubble
    )  # its order needs only the sizes
    reference.pp_group_size, reference._n_microbatches, reference.num_stages = p, m, 2 * p
    orders = []
    for rank in range(p):
        actions = [a for a in reference._calculate_single_rank_operations(rank) if a is not None]
        assert all(a.stage_index in (rank, 2 * p - 1 - rank) for a in actions)
        orders.append(
            [
                f"{a.computation_type.value}{a.microbatch_index}{'.c1' if a.stage_index != rank else ''}"
                for a in actions
            ]
        )
    return orders


def test_zbv_orders_are_pytorchs():
    for p in range(1, 7):
        for m in range(1, 3 * p + 2):
            assert [
                list(map(str, prog)) for prog in generate("zbv", p, m).programs
            ] == pytorch_zbv_orders(p, m), (p, m)


def test_hand_checked_zbv_p2_m3():
    # str(build("zbv", 2, 3)) (chunk 1 runs back up the V; rank 1 holds stages 1 and 2):
    #      0     1     2     3     4     5     6     7     8     9     10    11    12    13    14    15    16    17
    # r0   F0    F1    F2    F0.c1 I0.c1 W0.c1 F1.c1 I1.c1 W1.c1 I0    W0    F2.c1 I2.c1 W2.c1 I1    W1    I2    W2
    # r1   F0    F0.c1 F1    F1.c1 I0.c1 W0.c1 F2    I0    W0    F2.c1 I1.c1 W1.c1 I1    I2.c1 I2    W1    W2.c1 W2
    # m >= floor(3p/2): at the bound, each rank idle only (p-1)/2 (F0 coming down in
    # half units), so the makespan is 3m + (p-1)/2 = 19/2
    sched = build("zbv", 2, 3)
    sim = simulate(sched)
    assert sim.makespan == 3 * 3 + Fr(1, 2) == brute_force.makespan(sched)
    assert sim.bubble_ratio == lb(2, 3, 2) == Fr(1, 19)


@pytest.mark.parametrize("name", NAMES)
def test_one_rank_has_no_bubble(name):
    for m in (1, 3):
        sim = simulate(build(name, 1, m))
        assert sim.bubble_ratio == 0 and sim.peak_activations == 1
