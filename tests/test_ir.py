"""The IR: actions, placements, schedules, dependencies."""

import pytest

from pp_ext.schedules import Action, Kind, Placement, Schedule
from pp_ext.schedules.actions import B, F, I, W


@pytest.mark.parametrize(
    "text", ["F3", "I2.c1", "W0", "B12.c3", "U1", "sF3.c1>r2", "rB0<r1", "sB4>r0", "rF7.c1<r3"]
)
def test_short_form_round_trips(text):
    assert str(Action.parse(text)) == text


def test_short_form_fields():
    assert Action.parse("I2.c1") == Action(Kind.I, 2, 1)
    assert Action.parse("sF3.c1>r2") == Action(Kind.SEND_ACT, 3, 1, peer=2)
    assert str(I(2, 1)) == "I2.c1" and str(F(3)) == "F3"


@pytest.mark.parametrize("text", ["X1", "F", "F1.c", "sF1", "sF1<r2", "rB1>r0", "F-1"])
def test_bad_short_forms_are_refused(text):
    with pytest.raises(ValueError, match="not an action"):
        Action.parse(text)


def test_comm_actions_need_a_peer_and_compute_actions_refuse_one():
    with pytest.raises(ValueError):
        Action(Kind.SEND_ACT, 0)
    with pytest.raises(ValueError):
        Action(Kind.F, 0, peer=1)


def test_loop_placement():
    place = Placement.loop(4, 2)
    assert place.stages == 8
    assert [place.locate(0, s) for s in range(8)] == [
        (0, 0),
        (1, 0),
        (2, 0),
        (3, 0),
        (0, 1),
        (1, 1),
        (2, 1),
        (3, 1),
    ]
    assert place.holds(2, 1) == (0, 6)


def test_v_placement_turns_on_the_last_rank():
    place = Placement.v(4, 2)
    assert [place.locate(0, s) for s in range(8)] == [
        (0, 0),
        (1, 0),
        (2, 0),
        (3, 0),
        (3, 1),
        (2, 1),
        (1, 1),
        (0, 1),
    ]
    assert place.holds(0, 1) == (0, 7)


def test_bidirectional_placement_holds_every_stage_twice():
    place = Placement.bidirectional(4)
    assert place.pipelines == 2 and place.stages == 4
    assert place.locate(0, 0) == (0, 0) and place.locate(1, 0) == (3, 1)
    assert {place.holds(r, c)[1] for r in range(4) for c in range(2)} == {0, 1, 2, 3}
    assert place.replicas(2) == 2


def test_placement_by_name_and_unknown_name():
    assert Placement.named("v", 2, 2) == Placement.v(2, 2)
    with pytest.raises(ValueError, match="choose one of loop, v, bidirectional"):
        Placement.named("zigzag", 2, 2)


def test_dependencies_follow_the_route():
    place = Placement.v(2, 2)  # stages: 0 r0c0, 1 r1c0, 2 r1c1, 3 r0c1
    sched = Schedule(
        "t",
        place,
        1,
        (
            (F(0), F(0, 1), I(0, 1), W(0, 1), I(0), W(0)),
            (F(0), F(0, 1), I(0, 1), W(0, 1), I(0), W(0)),
        ),
    )
    assert sched.dependencies(1, F(0, 1)) == [(1, F(0))]  # the turn: local hand-over
    assert sched.dependencies(0, F(0, 1)) == [(1, F(0, 1))]
    assert sched.dependencies(0, I(0, 1)) == [(0, F(0, 1))]  # last stage: from the loss
    assert sched.dependencies(1, I(0, 1)) == [(1, F(0, 1)), (0, I(0, 1))]
    assert sched.dependencies(1, W(0, 1)) == [(1, I(0, 1))]
    assert sched.outgoing(1, F(0)) == []  # same rank, no message
    [msg] = sched.outgoing(1, F(0, 1))
    assert (msg.grad, msg.src, msg.dst, msg.dst_chunk) == (False, 1, 0, 1)
    assert sched.incoming(0, F(0, 1)) == [msg]


def test_gradient_producer_is_b_when_backward_is_fused():
    sched = Schedule("t", Placement.loop(2), 1, ((F(0), B(0)), (F(0), B(0))))
    assert sched.dependencies(0, B(0)) == [(0, F(0)), (1, B(0))]
    assert not sched.split_backward
