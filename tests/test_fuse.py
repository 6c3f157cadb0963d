"""fuse_backward: an I right before its own W becomes one B; nothing else changes."""

from __future__ import annotations

import pytest

from pp_ext.schedules import (
    REGISTRY,
    Action,
    Kind,
    build,
    dry_run,
    fuse_backward,
    get,
    lower,
    simulate,
    validate,
)
from pp_ext.schedules.actions import B, F


def programs(schedule) -> list[str]:
    return [" ".join(map(str, program)) for program in schedule.programs]


def test_one_stage_zb_h1_is_1f1b():
    """At p = 1 every W follows its I: zb-h1 runs 1f1b's program, with no I or W left."""
    fused = fuse_backward(build("zb-h1", 1, 4))
    assert fused.programs == lower(build("1f1b", 1, 4)).programs
    assert programs(fused) == ["F0 B0 F1 B1 F2 B2 F3 B3"]
    assert not fused.split_backward and fused.name == "zb-h1"


@pytest.mark.parametrize("name", ["zb-h2", "zbv", "dualpipev"])
def test_one_stage_w_split_schedules_keep_no_split(name):
    """Nothing to send or receive at p = 1: every pair fuses, also where another I comes
    between (dualpipev ends with I3.c1 I3 W3.c1 W3)."""
    spec = get(name)
    fused = fuse_backward(build(name, 1, 4, spec.default_chunks))
    assert not any(a.kind in (Kind.I, Kind.W) for a in fused.programs[0])
    assert sorted(a.key() for a in fused.programs[0] if a.kind is Kind.B) == sorted(
        (c, mb) for c in range(spec.default_chunks) for mb in range(4)
    )


def test_zb_h1_two_stages_fuses_the_first_stage_only():
    """Rank 0's W follows its I (no gradient to send on); rank 1 sends I's gradient
    between them, so the previous stage gets it before W runs: kept apart."""
    fused = fuse_backward(build("zb-h1", 2, 4))
    first, last = fused.programs
    assert [str(a) for a in first if a.kind.is_compute] == [
        "F0",
        "F1",
        "B0",
        "F2",
        "B1",
        "F3",
        "B2",
        "B3",
    ]
    assert last == lower(build("zb-h1", 2, 4)).programs[1]


def test_a_pair_with_communication_between_stays_split():
    """zb-h1 at p = 2, rank 1: I2 sB2>r0 ... W2; a receive between also keeps a pair apart."""
    schedule = lower(build("zb-h1", 2, 4))
    last = fuse_backward(schedule).programs[1]
    assert last == schedule.programs[1] and sum(a.kind is Kind.I for a in last) == 4
    program = (
        F(0),
        Action(Kind.I, 0),
        Action(Kind.RECV_ACT, 1, peer=0),
        F(1),
        Action(Kind.W, 0),
        B(1),
    )
    split = type(schedule)("x", schedule.placement, 2, (program, ()))
    assert fuse_backward(split).programs[0] == program


@pytest.mark.parametrize("name", [n for n in REGISTRY if n != "auto"])
def test_every_fused_schedule_is_valid_and_no_slower(name):
    """Over a grid: the fused program validates and runs without deadlock, each B replaced
    exactly one adjacent I, W pair, and at I + W = B its simulated step is the same."""
    spec = get(name)
    for p in (1, 2, 3, 4):
        for m in (2 * p, 2 * p + 1):
            try:
                schedule = build(name, p, m, spec.default_chunks)
            except Exception:  # noqa: BLE001 - sizes a schedule refuses
                continue
            fused = fuse_backward(schedule)
            validate(fused)
            dry_run(fused)
            for before, after in zip(lower(schedule).programs, fused.programs):
                gone = [a for a in before if a.kind in (Kind.I, Kind.W) and a not in after]
                new = [a for a in after if a not in before]
                assert sorted((a.micro_batch, a.chunk) for a in new) == sorted(
                    {(a.micro_batch, a.chunk) for a in gone}
                ) and len(gone) == 2 * len(new)
                assert all(a.kind is Kind.B for a in new)
            if not schedule.backward_weights:  # unit costs: B = I + W
                assert simulate(fused).makespan == simulate(schedule).makespan
