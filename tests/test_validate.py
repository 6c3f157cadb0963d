"""Validator, lowering and dry run: broken schedules are caught and shown."""

import pytest

from pp_ext.schedules import (
    InvalidScheduleError,
    Placement,
    Schedule,
    build,
    dry_run,
    lower,
    validate,
)
from pp_ext.schedules.actions import Action, B, F, I, Kind, W


def loop2(*programs, m=2):
    return Schedule(
        "t",
        Placement.loop(2),
        m,
        tuple(tuple(Action.parse(a) for a in p.split()) for p in programs),
    )


def test_valid_1f1b_lowers_each_transfer_at_its_producers_end_on_both_ranks():
    """By hand, at unit costs (F = 1, B = 2): rank 0 runs F0 [0,1] F1 [1,2] B0 [4,6]
    F2 [6,7] B1 [7,9] B2 [10,12]; rank 1 F0 [1,2] B0 [2,4] F1 [4,5] B1 [5,7] F2 [7,8]
    B2 [8,10]. Transfers at their producers' ends: F0@1 F1@2 B0@4, F2@7 and B1@7
    (rank 0's first), B2@10; each rank posts its side of them in that order, a
    transfer before the compute starting at the same moment."""
    lowered = lower(build("1f1b", 2, 3))
    assert [str(a) for a in lowered.programs[0]] == [
        "F0",
        "sF0>r1",
        "F1",
        "sF1>r1",
        "rB0<r1",
        "B0",
        "F2",
        "sF2>r1",
        "rB1<r1",
        "B1",
        "rB2<r1",
        "B2",
    ]
    assert [str(a) for a in lowered.programs[1]] == [
        "rF0<r0",
        "F0",
        "rF1<r0",
        "B0",
        "sB0>r0",
        "F1",
        "B1",
        "rF2<r0",
        "sB1>r0",
        "F2",
        "B2",
        "sB2>r0",
    ]
    assert lower(lowered) is lowered
    dry_run(lowered)


def test_missing_weight_gradient_is_reported():
    with pytest.raises(
        InvalidScheduleError, match=r"micro-batch 1 stage 1 \(rank 1 chunk 0\) has no backward W"
    ):
        validate(loop2("F0 F1 I0 W0 I1 W1", "F0 I0 W0 F1 I1", m=2))


def test_duplicate_action_is_marked():
    with pytest.raises(InvalidScheduleError, match="F0 appears twice") as err:
        validate(loop2("F0 F0 B0", "F0 B0", m=1))
    assert "!F0" in err.value.grid


def test_backward_before_forward_on_a_rank_is_marked():
    with pytest.raises(
        InvalidScheduleError, match="rank 1 step 0: B0 needs F0 of the same rank, which comes later"
    ) as err:
        validate(loop2("F0 B0", "B0 F0", m=1))
    assert "!B0" in err.value.grid.splitlines()[2]


def test_weight_before_input_gradient_is_refused():
    with pytest.raises(InvalidScheduleError, match="W0 needs I0"):
        validate(loop2("F0 I0 W0", "F0 W0 I0", m=1))


def test_cross_rank_cycle_is_a_deadlock_with_each_blocked_rank_marked():
    # rank 0 waits for B0's gradient before making F1; rank 1 wants F1 before B0
    bad = loop2("F0 B0 F1 B1", "F0 F1 B0 B1")
    with pytest.raises(
        InvalidScheduleError,
        match=r"deadlock: no rank can go on \(rank 0 at B0 waits for B0 "
        r"of rank 1; rank 1 at F1 waits for F1 of rank 0\)",
    ) as err:
        validate(bad)
    rows = err.value.grid.splitlines()
    assert "!B0" in rows[1] and "!F1" in rows[2]


def test_wrong_pipeline_for_micro_batch_is_refused():
    place = Placement.bidirectional(2)
    sched = Schedule("t", place, 1, ((F(0, 1), B(0, 1)), (F(0), B(0))), pipeline_of=(0,))
    with pytest.raises(InvalidScheduleError, match="takes pipeline 0"):
        validate(sched)


def test_out_of_range_chunk_and_micro_batch():
    with pytest.raises(InvalidScheduleError, match="names chunk 1"):
        validate(loop2("F0.c1 B0.c1", "F0 B0", m=1))
    with pytest.raises(InvalidScheduleError, match="names micro-batch 2"):
        validate(loop2("F2 B2", "F0 B0", m=1))


def test_receive_order_mismatch_on_a_channel_is_reported():
    good = lower(build("1f1b", 2, 2))
    prog1 = list(good.programs[1])
    # swap the two activation receives of rank 1: F1 arrives first in the channel
    i, j = prog1.index(Action.parse("rF0<r0")), prog1.index(Action.parse("rF1<r0"))
    prog1[i], prog1[j] = prog1[j], prog1[i]
    bad = Schedule(good.name, good.placement, 2, (good.programs[0], tuple(prog1)))
    with pytest.raises(
        InvalidScheduleError, match="next message rank 0 sent on this channel is sF0>r1"
    ):
        dry_run(bad)


def test_send_without_a_producer_is_reported():
    good = lower(build("1f1b", 2, 1))
    prog0 = [a for a in good.programs[0]]
    prog0.insert(0, prog0.pop(1))  # send F0 before computing it
    bad = Schedule(good.name, good.placement, 1, (tuple(prog0), good.programs[1]))
    with pytest.raises(
        InvalidScheduleError, match="sends a tensor no earlier action of rank 0 made"
    ):
        dry_run(bad)


def test_receives_follow_the_senders_order_across_the_v_turn():
    """In V placement a channel carries chunk-0 activations and chunk-1 gradients;
    receives are posted in send order even where they are needed in another order."""
    schedule = build("zbv", 4, 8)
    assert schedule.placement.name == "v"
    lowered = lower(schedule)
    dry_run(lowered)

    def on(
        rank, kinds, peer
    ):  # ("F" activation or "B" gradient, micro-batch) of rank's messages with peer
        return [
            (a.kind.value[1:], a.micro_batch)
            for a in lowered.programs[rank]
            if a.kind in kinds and a.peer == peer
        ]

    reordered = 0
    for src, dst in ((r, r + 1) for r in range(3)):
        sent = on(src, (Kind.SEND_ACT, Kind.SEND_GRAD), dst)
        assert {kind for kind, _ in sent} == {
            "F",
            "B",
        }  # both directions of the V share the channel
        assert on(dst, (Kind.RECV_ACT, Kind.RECV_GRAD), src) == sent
        needed = [
            ("B" if m.grad else "F", m.micro_batch)
            for a in schedule.programs[dst]
            for m in schedule.incoming(dst, a)
            if m.src == src
        ]
        assert sorted(needed) == sorted(sent)
        reordered += needed != sent
    assert (
        reordered
    )  # somewhere a tensor is received before it is needed, to keep the sender's order


def test_hand_written_bidirectional_schedule_validates():
    """The IR holds Chimera-style replicas: two pipelines in opposite directions."""
    place = Placement.bidirectional(2)
    sched = Schedule(
        "bidir",
        place,
        2,
        (
            (F(0), F(1, 1), B(1, 1), B(0)),
            (F(1, 1), F(0), B(0), B(1, 1)),
        ),
        pipeline_of=(0, 1),
    )
    lowered = validate(sched)
    assert any(a.kind.is_comm for a in lowered.programs[0])


def test_optimizer_updates_are_accepted_anywhere():
    sched = loop2("F0 B0 U0", "F0 B0 U0", m=1)
    validate(sched)


def test_w_split_schedule_validates():
    validate(loop2("F0 F1 I0 W0 I1 W1", "F0 I0 F1 I1 W0 W1"))
    assert loop2("F0 I0 W0", "F0 I0 W0", m=1).split_backward
    assert W(0) != I(0)
