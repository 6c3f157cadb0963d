"""Simulator: closed forms of SCHEDULES.md, costs, steady state, grids."""

import json
from fractions import Fraction as Fr

import pytest

from pp_ext.schedules import Costs, Placement, Schedule, build, simulate
from pp_ext.schedules.actions import Action
from pp_ext.schedules.grid import time_grid
from pp_ext.schedules.simulate import repeat, steady_state


def test_1f1b_time_grid_matches_the_textbook_figure():
    sim = simulate(build("1f1b", 4, 4))
    # Narayanan et al. 2021, Fig. 4 (top): B = 2F, ranks wait for the first gradient
    assert time_grid(sim).splitlines()[1:] == [
        "r0   F0 F1 F2 F3 .  .  .  .  .  .  B0 =  .  B1 =  .  B2 =  .  B3 =",
        "r1   .  F0 F1 F2 .  .  .  .  B0 =  F3 B1 =  .  B2 =  .  B3 =  .  .",
        "r2   .  .  F0 F1 .  .  B0 =  F2 B1 =  F3 B2 =  .  B3 =  .  .  .  .",
        "r3   .  .  .  F0 B0 =  F1 B1 =  F2 B2 =  F3 B3 =  .  .  .  .  .  .",
    ]
    assert sim.makespan == 3 * (4 + 4 - 1) and sim.bubble_ratio == Fr(3, 7)


@pytest.mark.parametrize("p,m", [(2, 1), (2, 4), (4, 8), (8, 3), (8, 32)])
def test_gpipe_and_1f1b_bubble_and_memory(p, m):
    gpipe, ofob = simulate(build("gpipe", p, m)), simulate(build("1f1b", p, m))
    assert gpipe.bubble_ratio == ofob.bubble_ratio == Fr(p - 1, m + p - 1)
    assert gpipe.peak_activations == m
    assert ofob.peak_activations == min(p, m)
    assert ofob.peak_activations_per_rank == tuple(min(p - r, m) for r in range(p))
    assert gpipe.weight_copies == ofob.weight_copies == 1
    assert ofob.messages == 2 * m * (p - 1)


@pytest.mark.parametrize("p,m,v", [(2, 4, 2), (4, 8, 2), (4, 16, 3), (8, 16, 4), (3, 9, 2)])
def test_interleaved_bubble_and_memory(p, m, v):
    sim = simulate(build("interleaved-1f1b", p, m, v))
    assert sim.bubble_ratio == Fr(p - 1, v * m + p - 1)
    assert sim.peak_activations == p + Fr(p - 1, v)  # m >= 2p: rank 0 has a steady phase


def test_costs_scale_the_makespan_and_comm_delays_messages():
    base = simulate(build("1f1b", 4, 8)).makespan
    assert simulate(build("1f1b", 4, 8), Costs(2, 2, 2)).makespan == 2 * base
    with_comm = simulate(build("1f1b", 2, 1), Costs(comm=Fr(1, 2)))
    # F0 r0, message, F0 r1, B0 r1, message, B0 r0: 1 + 1/2 + 1 + 2 + 1/2 + 2
    assert with_comm.makespan == 7


def test_gpipe_with_unequal_f_and_b():
    # forward wave then backward wave: (m+p-1)(F) + (m+p-1)(I+W)
    sim = simulate(build("gpipe", 3, 5), Costs(Fr(1), Fr(3, 2), Fr(1, 2)))
    assert sim.makespan == 7 * 1 + 7 * 2


def test_per_stage_costs_from_a_file(tmp_path):
    path = tmp_path / "costs.json"
    path.write_text(
        json.dumps(
            {
                "comm": 0,
                "stages": [
                    {"forward": 1, "input_grad": 1, "weight_grad": 1},
                    {"forward": 2, "input_grad": 2, "weight_grad": 2},
                ],
            }
        )
    )
    costs = Costs.from_option(str(path))
    sim = simulate(build("gpipe", 2, 2), costs)
    # the slow stage 1 sets the pace: F 1 + 2 + 2, B 4 + 4 + 2
    assert sim.makespan == 15
    with pytest.raises(ValueError, match="gives 2 stages, the schedule has 4"):
        simulate(build("gpipe", 4, 2), costs)


@pytest.mark.parametrize(
    "text,error",
    [
        ("1,1", "F,I,W"),
        ("a,b,c", "numbers"),
        ("1,1,-1", ">= 0"),
        ("missing.json", "does not exist"),
    ],
)
def test_bad_costs_are_refused(text, error):
    with pytest.raises(ValueError, match=error):
        Costs.from_option(text)


def test_bad_cost_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"stages": [{"forward": 1}]}')
    with pytest.raises(ValueError, match="is not valid"):
        Costs.load(path)


def test_costs_parse_keeps_fractions_exact():
    assert Costs.parse("1,1/2,0.25,0") == Costs(Fr(1), Fr(1, 2), Fr(1, 4), Fr(0))


def test_repeat_renumbers_micro_batches():
    rep = repeat(build("1f1b", 2, 2), 3)
    assert rep.micro_batches == 6
    assert [str(a) for a in rep.programs[1][:6]] == ["F0", "B0", "F1", "B1", "F2", "B2"]


@pytest.mark.parametrize("name,p,m", [("1f1b", 4, 8), ("gpipe", 2, 4), ("interleaved-1f1b", 4, 8)])
def test_steady_state_equals_flushed_where_rank_0_keeps_its_own_bubble(name, p, m):
    sched = build(name, p, m)
    assert steady_state(sched).bubble_ratio == simulate(sched).bubble_ratio


def test_weight_versions_are_counted_from_updates():
    # an asynchronous-style program: rank 0 updates after each backward while a
    # second micro-batch is still in flight, so two versions are alive at once
    programs = tuple(
        tuple(Action.parse(a) for a in p.split())
        for p in ("F0 F1 B0 U0 F2 B1 U0 B2 U0", "F0 B0 F1 B1 F2 B2")
    )
    sched = Schedule("async-like", Placement.loop(2), 3, programs)
    assert simulate(sched).weight_copies == 2


def test_bidirectional_placement_counts_two_weight_copies():
    from pp_ext.schedules.actions import B, F

    sched = Schedule(
        "bidir",
        Placement.bidirectional(2),
        2,
        ((F(0), F(1, 1), B(1, 1), B(0)), (F(1, 1), F(0), B(0), B(1, 1))),
        pipeline_of=(0, 1),
    )
    sim = simulate(sched)
    assert sim.weight_copies == 2
    # each chunk is a whole stage of the model here: 2 micro-batches of 1 unit
    assert sim.peak_activations == 2


def test_replica_reduce_is_paid_once_per_step_by_two_pipelines_only(tmp_path):
    """Chimera sums its two replicas' gradients after the flush (Costs.replica_reduce):
    its makespan grows by exactly that, a one-pipeline schedule's not at all, and a
    cost file keeps it."""
    reduce = Costs(replica_reduce=Fr(7, 2))
    for name, chunks in (("chimera", 2), ("zbv", 2), ("1f1b", 1)):
        schedule = build(name, 4, 8, chunks)
        extra = simulate(schedule, reduce).makespan - simulate(schedule).makespan
        assert extra == (Fr(7, 2) if name == "chimera" else 0), name
    measured = Costs(comm=0.1, per_stage=((1.0, 1.0, 1.0),) * 4, replica_reduce=0.25)
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(measured.to_json()))
    assert Costs.load(path) == measured
