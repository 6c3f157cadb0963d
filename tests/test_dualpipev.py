"""dualpipev: DeepSeek's DualPipeV with the backward split into I and W."""

from dataclasses import replace
from fractions import Fraction

import brute_force
import pytest

from pp_ext.schedules import ConstraintError, Kind, Placement, Schedule, build, get, simulate
from pp_ext.schedules.dualpipev import dualpipev_program
from pp_ext.schedules.simulate import steady_state
from pp_ext.schedules.validate import validate

# every p up to 8 with the smallest m, one more, and m = 3p, 4p
GRID = [(p, m) for p in range(1, 9) for m in sorted({2 * p, 2 * p + 1, 3 * p, 4 * p})]


def lower_bound(p: int, m: int) -> Fraction:
    return Fraction(p - 1, 6 * m + p - 1)


def test_registered_in_v_placement_with_two_chunks():
    spec = get("dualpipev")
    assert spec.placement == "v" and spec.default_chunks == 2
    schedule = build("dualpipev", 4, 8)
    assert schedule.placement.name == "v" and schedule.chunks == 2 and schedule.split_backward
    assert not any(a.kind is Kind.B for program in schedule.programs for a in program)


def test_p2_m4_order_by_hand():
    schedule = build("dualpipev", 2, 4)
    assert [" ".join(map(str, program)) for program in schedule.programs] == [
        # F0 F0 | F0 F1 | I1 W F1 | F0&B1 F1&B0 | B1 F1&B0 | I1 I0 | W I0 | W W
        "F0 F1 F2 F0.c1 I0.c1 W0.c1 F1.c1 F3 I1.c1 W1.c1 F2.c1 I0 W0 I2.c1 W2.c1 F3.c1 I1 W1 "
        "I3.c1 I2 W3.c1 I3 W2 W3",
        # F0 F1 F0 F1 | F0&B1 F1&B0 twice | I1 I0 twice | W W W W
        "F0 F0.c1 F1 F1.c1 F2 I0.c1 W0.c1 F2.c1 I0 W0 F3 I1.c1 W1.c1 F3.c1 I1 W1 "
        "I2.c1 I2 I3.c1 I3 W2.c1 W2 W3.c1 W3",
    ]
    # DualPipeV's own drain defers W from the middle of phase 6 on only
    assert (
        " ".join(map(str, dualpipev_program(2, 4, 0, original_drain=True)[-6:]))
        == "I3.c1 W3.c1 I2 W2 I3 W3"
    )
    assert " ".join(map(str, dualpipev_program(2, 4, 1, original_drain=True)[-8:])) == (
        "I2.c1 W2.c1 I2 W2 I3.c1 I3 W3.c1 W3"
    )


@pytest.mark.parametrize("p, m", GRID)
def test_valid_and_at_the_lower_bound(p, m):
    sim = simulate(build("dualpipev", p, m))  # build validates and dry-runs the lowered program
    assert sim.bubble_ratio == lower_bound(p, m)
    assert sim.makespan == 3 * m + Fraction(p - 1, 2)
    # the bound is tight on every rank: each idles exactly (p-1)/2
    assert all(sim.makespan - busy == Fraction(p - 1, 2) for busy in sim.busy)
    assert sim.peak_activations_per_rank == (p + Fraction(1, 2),) * p


def _original_drain(p, m):
    """DualPipeV's own W placement in phase 6 (W deferred from the middle on)."""
    programs = tuple(dualpipev_program(p, m, r, original_drain=True) for r in range(p))
    return Schedule("dualpipev-original", Placement.v(p, 2), m, programs)


@pytest.mark.parametrize("p, m", [(1, 2), (2, 4), (4, 8), (4, 13), (8, 16)])
def test_steady_state_has_no_bubble(p, m):
    state = steady_state(build("dualpipev", p, m))
    assert state.period == 3 * m and state.bubble_ratio == 0
    # DualPipeV's own drain reaches the flushed bound too, but keeps it back to back
    original = _original_drain(p, m)
    validate(original)
    assert simulate(original).bubble_ratio == lower_bound(p, m)
    assert steady_state(original).bubble_ratio == lower_bound(p, m)


@pytest.mark.parametrize("p, m", [(3, 7), (5, 12), (8, 20)])
def test_phase_structure(p, m):
    for r in range(p):
        program = dualpipev_program(p, m, r)
        first_backward = next(i for i, a in enumerate(program) if a.kind is Kind.I)
        warmup = program[:first_backward]
        # 2(p-r-1) forwards of chunk 0, then r+1 pairs F0 F1 (on the last rank the
        # forward of the first F&B pair comes before the first backward too)
        extra = [0] if r == p - 1 else []
        assert [a.chunk for a in warmup] == [0] * (2 * (p - r - 1)) + [0, 1] * (r + 1) + extra
        # each chunk runs its micro-batches in order, W's in the order of their I's
        for kind in (Kind.F, Kind.I, Kind.W):
            for chunk in (0, 1):
                assert [
                    a.micro_batch for a in program if a.kind is kind and a.chunk == chunk
                ] == list(range(m))
        assert [a.key() for a in program if a.kind is Kind.W] == [
            a.key() for a in program if a.kind is Kind.I
        ]
        # the 2(r+1) deferred W's close the program: two on rank 0, 2p on the last rank
        last_input_grad = max(i for i, a in enumerate(program) if a.kind is not Kind.W)
        assert len(program) - last_input_grad - 1 == 2 * (r + 1)


@pytest.mark.parametrize("p, m", [(2, 4), (4, 8), (8, 16)])
def test_w_inside_every_b_misses_the_bound(p, m):
    """DeepSpeed's port of DualPipeV runs every backward as one B: the split schedule
    reaches the bound 3m + (p-1)/2 (each rank idle only while F0 comes down, half a
    unit per rank), the fused one does not. Its makespan has no closed form here: the
    simulator's is checked against the independent tests/brute_force.py."""
    split = build("dualpipev", p, m)
    fused = replace(
        split,
        programs=tuple(
            tuple(
                replace(a, kind=Kind.B) if a.kind is Kind.I else a
                for a in program
                if a.kind is not Kind.W
            )
            for program in split.programs
        ),
    )
    validate(fused)
    assert simulate(split).makespan == 3 * m + Fraction(p - 1, 2) == brute_force.makespan(split)
    assert simulate(fused).makespan == brute_force.makespan(fused) > simulate(split).makespan


@pytest.mark.parametrize("p, m", [(4, 5), (4, 7), (1, 1), (3, 5)])
def test_too_few_micro_batches_are_refused(p, m):
    with pytest.raises(ConstraintError) as info:
        build("dualpipev", p, m)
    assert str(info.value) == (
        f"dualpipev needs micro_batches >= 2*stages (got m={m}, p={p}): use micro_batches={2 * p}"
    )


@pytest.mark.parametrize("chunks", [1, 3, 4])
def test_chunks_must_be_two(chunks):
    with pytest.raises(
        ConstraintError, match=f"exactly 2 chunks per rank \\(got chunks={chunks}\\): use chunks=2"
    ):
        build("dualpipev", 4, 8, chunks)
