"""NCCL's point-to-point rules (pp_ext.schedules.nccl; FACTS.md, "NCCL point-to-point").

Pure: the dry run on small traces whose outcome is derived by hand; today's-style
crossing lowering of 1f1b refused under both stream models while gloo's buffered model
passes it; the second, independent check of the lowering's invariant (a cycle search
for one global order of transfers) that tests/test_properties.py runs on its grids.
Slow: the engine's calls recorded while training every schedule (p = 2 and 4, pipe 2 x
data 2, pipe 2 x tensor 2 with a Qwen2-MoE case, plain gloo) replay to the end under both stream models, as
DeepSpeed's own engine's do, while a recorded crossing program does not; the emulation
on gloo (PP_EXT_P2P=emulate-nccl) stops the crossing program with the comm-timeout error
within 30 s, which plain gloo runs.
"""

from __future__ import annotations

import time

import pytest
from nccl_recorder import one_global_order

from pp_ext.schedules import (
    REGISTRY,
    Action,
    InvalidScheduleError,
    Placement,
    Schedule,
    lower,
    validate,
)
from pp_ext.schedules.nccl import STREAMS, CrossedMessagesError, Op, Trace, run
from pp_ext.schedules.validate import buffered_dry_run, nccl_dry_run

GROUP = (0, 1, 2)


def send(peer: int, label: str, **kw) -> Op:
    return Op("send", GROUP, peer, label, **kw)


def recv(peer: int, label: str, **kw) -> Op:
    return Op("recv", GROUP, peer, label, **kw)


def traces(*ranks) -> list[Trace]:
    """Each rank: a list of ops (posted one by one) or lists of ops (one batch); then it
    waits for everything it posted, in order."""
    out = []
    for posts in ranks:
        trace = Trace()
        ids = [i for post in posts for i in trace.post(post if isinstance(post, list) else [post])]
        for i in ids:
            trace.wait([i])
        out.append(trace)
    return out


# ---------------------------------------------------------------------- the model


def test_a_send_completes_only_with_its_receive():
    for streams in STREAMS:
        assert run(traces([send(1, "x")], [recv(0, "x")]), streams).finished
        alone = run(traces([send(1, "x")], []), streams)
        assert not alone.finished and alone.blocked == ((0, 1),) and alone.heads == ((0, 0),)


def test_crossing_sends_hang_and_the_same_exchange_fused_in_one_batch_does_not():
    # both ranks send first: each send waits for a receive queued behind the other's send
    crossing = traces([send(1, "a"), recv(1, "b")], [send(0, "b"), recv(0, "a")])
    fused = traces(
        [[send(1, "a", batched=True), recv(1, "b", batched=True)]],
        [[send(0, "b", batched=True), recv(0, "a", batched=True)]],
    )
    for streams in STREAMS:
        stuck = run(crossing, streams)
        assert not stuck.finished and stuck.heads == ((0, 0), (1, 0)), stuck.report
        assert run(fused, streams).finished


def test_one_stream_per_rank_is_stricter_than_one_per_pair():
    """Rank 0 sends to 2, then receives from 1; rank 1 sends to 0, then to 2; rank 2
    receives from 1, then from 0. Per pair each stream's head meets its match in turn
    (0<-1 and 1->2, then 0->2). With one stream per rank every head waits for an op
    behind another head: rank 0's send to 2 for rank 2's second receive, rank 2's first
    receive for rank 1's second send, rank 1's first send for rank 0's second op."""
    three = traces(
        [send(2, "x"), recv(1, "y")], [send(0, "y"), send(2, "z")], [recv(1, "z"), recv(0, "x")]
    )
    assert run(three, "pair").finished
    stuck = run(three, "rank")
    assert not stuck.finished and stuck.heads == ((0, 0), (1, 0), (2, 0)), stuck.report


def test_matched_ops_must_carry_the_same():
    with pytest.raises(
        CrossedMessagesError,
        match="rank 0.s send float32\\[4\\] meets rank 1.s recv float32\\[8\\]",
    ):
        run(traces([send(1, "float32[4]")], [recv(0, "float32[8]")]), "pair")


def test_a_collective_queued_behind_a_receive_in_flight_hangs_unless_p2p_has_its_own_group():
    """An asynchronous engine leaves a receive posted across calls; DeepSpeed then
    broadcasts the loss on its pipe group. On one communicator the broadcast queues
    behind the receive, whose send rank 1 posts after the broadcast: why pp-ext's p2p
    has a group of its own (pp_ext.engine.p2p)."""

    def program(p2p_name: str) -> list[Trace]:
        pair = (0, 1)
        zero, one = Trace(), Trace()
        pending = zero.post([Op("recv", pair, 1, "g", name=p2p_name)])
        zero.wait(zero.post([Op("collective", pair, label="loss", name="pipe")]))
        one.wait(one.post([Op("collective", pair, label="loss", name="pipe")]))
        one.wait(one.post([Op("send", pair, 0, "g", name=p2p_name)]))
        zero.wait(pending)
        return [zero, one]

    assert not run(program("pipe"), "rank").finished
    assert run(program("pp-ext p2p"), "rank").finished


# ---------------------------------------------------------------------- lowered programs

CROSSING_1F1B = (  # 1f1b at p=2, m=4 lowered with each receive right before its use, as before
    "F0 sF0>r1 F1 sF1>r1 rB0<r1 B0 F2 sF2>r1 rB1<r1 B1 F3 sF3>r1 rB2<r1 B2 rB3<r1 B3",
    "rF0<r0 F0 B0 sB0>r0 rF1<r0 F1 B1 sB1>r0 rF2<r0 F2 B2 sB2>r0 rF3<r0 F3 B3 sB3>r0",
)


def crossing_1f1b() -> Schedule:
    return Schedule(
        "1f1b",
        Placement.loop(2),
        4,
        tuple(tuple(Action.parse(a) for a in program.split()) for program in CROSSING_1F1B),
    )


def test_the_crossing_1f1b_lowering_passes_gloo_and_is_refused_under_nccl():
    """Rank 0 posts sF1 then waits for rB0; rank 1 posts sB0 then waits for rF1: both
    sends head their streams and each waits for a receive queued behind the other."""
    crossing = crossing_1f1b()
    buffered_dry_run(crossing)  # gloo buffers the sends: it passes
    for streams in STREAMS:
        with pytest.raises(InvalidScheduleError, match="deadlock under NCCL's rules") as err:
            nccl_dry_run(crossing, streams)
        assert (
            "rank 0 waits at rB0<r1" in err.value.reason
            and "rank 1 waits at rF1<r0" in err.value.reason
        )
        rows = err.value.grid.splitlines()
        assert "!sF1>r1 !rB0<r1" in rows[1] and "!sB0>r0 !rF1<r0" in rows[2], err.value.grid
    with pytest.raises(
        InvalidScheduleError, match="NCCL"
    ):  # what initialize runs on a prebuilt schedule
        validate(crossing)
    assert lower(crossing.compute_only()) != crossing
    validate(crossing.compute_only())


def test_the_cycle_search_tells_one_global_order_from_crossing_orders():
    """The second computation of the lowering's invariant (tests/test_properties.py runs it
    on every program of its grids, next to the dry run that every build runs)."""
    assert not one_global_order(crossing_1f1b())
    assert one_global_order(lower(REGISTRY["1f1b"].build(2, 4)))


# ---------------------------------------------------------------------- the engine, recorded


def record(case_runner, *args):
    """``case_runner(*args)`` with this rank's communication calls recorded."""
    from nccl_recorder import recording

    with recording() as trace:
        result = case_runner(*args)
    return result, trace


def run_recorded(rank: int, world: int, kind: str, cases: list, *extra) -> list:
    import os

    os.environ["PP_EXT_P2P"] = ""  # plain gloo: the recorder sees the engine's real calls
    if kind == "engine":
        import engine_cases as harness

        return [record(harness.run_case, name, extra[0], m, v, tied) for name, m, v, tied in cases]
    if kind == "async":
        import async_cases as harness

        return [record(harness.run_case, name, world, m) for name, m in cases]
    import tensor_cases as harness

    return [record(harness.run_case, extra[0], case) for case in cases]


def replay(results_by_rank: list[list]) -> list[str]:
    """Replay each case's recorded traces under both stream models; what did not finish."""
    failures = []
    for i, (result, _) in enumerate(results_by_rank[0]):
        traces_of_case = [results[i][1] for results in results_by_rank]
        assert sum(op.kind != "collective" for t in traces_of_case for op in t.ops), (
            "nothing recorded"
        )
        for streams in STREAMS:
            outcome = run(traces_of_case, streams)
            if not outcome.finished:
                failures.append(f"{result['case']} ({streams} streams): {outcome.report}")
    return failures


def launch_recorded(world: int, kind: str, cases: list, *extra) -> list[list]:
    from pp_ext.testing.spawn import spawn

    results = spawn(run_recorded, world, kind, cases, *extra)
    assert not replay(results), "\n".join(replay(results))
    return results


def synchronous_cases(pipe: int, m: int) -> list[tuple]:
    from engine_cases import cases_for

    return cases_for(pipe, [m], {"interleaved-1f1b": [2, 3], "looped-bfs": [2, 3]})


@pytest.mark.slow
@pytest.mark.parametrize("pipe", [2, 4])
def test_the_engines_recorded_calls_finish_under_nccl_every_schedule(pipe):
    """Every registered schedule (and DeepSpeed's own engine, whose blocking send/recv in
    parity order is NCCL-safe): the replay finishes, and training is still exact."""
    import engine_cases

    engine_cases.check(
        [
            [result for result, _ in results]
            for results in launch_recorded(pipe, "engine", synchronous_cases(pipe, 2 * pipe), pipe)
        ]
    )
    launch_recorded(
        pipe, "async", [(name, pipe) for name, spec in REGISTRY.items() if not spec.synchronous]
    )


@pytest.mark.slow
def test_the_engines_recorded_calls_finish_under_nccl_pipe_2_data_2():
    import engine_cases

    engine_cases.check(
        [
            [result for result, _ in results]
            for results in launch_recorded(4, "engine", synchronous_cases(2, 4), 2)
        ]
    )


@pytest.mark.slow
def test_the_engines_recorded_calls_finish_under_nccl_pipe_2_tensor_2(tmp_path):
    cases = [
        ("llama", True, (2, 2, 1), "zbv", False),
        ("qwen2", False, (2, 2, 1), "zb-h1", False),
        ("qwen3", False, (2, 2, 1), "1f1b", False),
        ("llama", False, (2, 2, 1), "chimera", False),
        ("qwen2_moe", False, (2, 2, 1), "zb-h1", False),  # router statistics in the stream
    ]
    for results in launch_recorded(4, "tensor", cases, str(tmp_path)):
        for result, _ in results:
            assert max(abs(a - b) for a, b in zip(result["losses"], result["ref_losses"])) < 1e-5, (
                result["case"]
            )


# ---------------------------------------------------------------------- a crossing engine


def run_crossing(rank: int, world: int, mode: str) -> dict:
    """The crossing 1f1b program of CROSSING_1F1B on the pp-ext engine (bypassing the
    validator), recorded."""
    import os

    os.environ["PP_EXT_P2P"] = mode
    import deepspeed
    import torch
    from deepspeed.runtime.config import DeepSpeedConfig
    from engine_cases import batch

    from pp_ext.engine.engine import ScheduleEngine
    from pp_ext.engine.module import ChunkedPipelineModule
    from pp_ext.testing.tiny import TinyConfig, layer_specs, lm_loss

    module = ChunkedPipelineModule(
        layers=layer_specs(TinyConfig(blocks=2, tied=False)),
        num_stages=2,
        loss_fn=lm_loss,
        partition_method="uniform",
        seed_layers=True,
        base_seed=1234,
    )
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 4,
        "train_batch_size": 8,
    }
    deepspeed.init_distributed()
    engine = ScheduleEngine(
        args=None,
        model=module,
        optimizer=torch.optim.SGD(module.parameters(), lr=0.1),
        mpu=module.mpu(),
        config=config,
        config_class=DeepSpeedConfig(config, module.mpu()),
        schedule=crossing_1f1b(),
    )
    start = time.monotonic()
    try:
        loss, trace = record(engine.train_batch, iter([batch(0, 0, k, 64) for k in range(4)]))
        return {"loss": float(loss), "trace": trace}
    except Exception as error:  # noqa: BLE001 - the failure is the result
        return {"error": str(error), "seconds": time.monotonic() - start}


@pytest.mark.slow
def test_the_emulation_stops_a_crossing_program_that_plain_gloo_runs():
    from pp_ext.testing.spawn import spawn

    plain = spawn(run_crossing, 2, "", comm_timeout_s=5)
    assert all("loss" in r for r in plain), plain  # gloo buffers the crossing sends
    stuck = [run([r["trace"] for r in plain], streams) for streams in STREAMS]
    assert not any(outcome.finished for outcome in stuck)  # the recorded calls replay to a hang

    emulated = spawn(run_crossing, 2, "emulate-nccl", comm_timeout_s=5)
    for rank, result in enumerate(emulated):
        assert "error" in result and result["seconds"] < 30, result
        assert result["error"].startswith(
            f"rank {rank} (pipeline rank {rank}) failed in RecvTensors("
        ), result
    # the first rank to time out stops; its peer may see that instead of its own timeout
    assert any("Timed out waiting 5000ms" in result["error"] for result in emulated), emulated
