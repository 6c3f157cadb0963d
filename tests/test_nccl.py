"""NCCL's point-to-point rules (pp_ext.schedules.nccl; FACTS.md, "NCCL point-to-point").

Pure: the dry run on small traces whose outcome is derived by hand; today's-style
crossing lowering of 1f1b refused under both stream models while gloo's buffered model
passes it; the second, independent check of the lowering's invariant (a cycle search
for one global order of transfers) that tests/test_properties.py runs on its grids.
Slow: the engine's calls recorded while training (plain gloo) replay to the end under both
stream models, as DeepSpeed's own engine's do, while a recorded crossing program does not.
Here pipe 2 x tensor 2 with a Qwen2-MoE case; every schedule at p = 2 and 4 and pipe 2 x
data 2 is recorded by the exactness runs themselves (tests/test_engine.py, test_async.py,
through tests/nccl_recorder.launch_recorded), so each case trains once. The emulation
on gloo (PP_EXT_P2P=emulate-nccl) stops the crossing program with the comm-timeout error
within 30 s, which plain gloo runs.

Expert parallelism: hand-made grids whose expert members post their all-to-alls in
crossing orders, or whose hosts wait on a receive that a peer in an all-to-all must send,
are refused; the lowering of every synchronous schedule with MoE chunks finishes on
pipe x data x expert grids (5 exchanges per layer and micro-batch, none in W). Slow: a
pipe 2 x data 2 x expert 2 run's calls (Mixtral, 1f1b and zb-h1) replay to the end and
come in the lowering's order; the emulation names members that post different exchanges,
which plain gloo passes.
"""

from __future__ import annotations

import time

import pytest
from nccl_recorder import launch_recorded, one_global_order, record

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


@pytest.mark.slow
def test_the_engines_recorded_calls_finish_under_nccl_pipe_2_tensor_2(tmp_path):
    cases = [
        ("llama", True, (2, 2, 1), "zbv", False),
        ("qwen2", False, (2, 2, 1), "zb-h1", False),
        ("qwen3", False, (2, 2, 1), "1f1b", False),
        ("llama", False, (2, 2, 1), "chimera", False),
        ("qwen2_moe", False, (2, 2, 1), "zb-h1", False),  # router statistics in the stream
    ]
    for results in launch_recorded(4, "tensor_cases", str(tmp_path), cases):
        for result in results:
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


# ---------------------------------------------------------------------- expert parallelism

# pipe 2 x data 2, global rank = pipeline rank * 2 + data rank: expert groups (0, 1) and
# (2, 3) (one stage's data ranks, DeepSpeed's layout), pipelines (0, 2) and (1, 3)
EXPERTS_0, EXPERTS_1 = (0, 1), (2, 3)


def a2a(group: tuple[int, ...], label: str) -> Op:
    return Op("collective", group, label=label, name="ep_size_2")


def pipe_op(kind: str, pipeline: tuple[int, int], peer: int, label: str) -> Op:
    return Op(kind, pipeline, peer, label, name="pipeline")


def blocking(*steps: Op) -> Trace:
    """Each op posted and waited for at once, in order."""
    trace = Trace()
    for op in steps:
        trace.wait(trace.post([op]))
    return trace


def test_expert_members_posting_their_all_to_alls_in_crossing_orders_are_refused():
    """Hand-made: rank 0 runs F1's exchange then B0's, rank 1 B0's then F1's: their first
    collectives meet carrying different exchanges."""
    crossed = [
        blocking(a2a(EXPERTS_0, "counts F1"), a2a(EXPERTS_0, "back grad B0")),
        blocking(a2a(EXPERTS_0, "back grad B0"), a2a(EXPERTS_0, "counts F1")),
    ]
    for streams in STREAMS:
        with pytest.raises(CrossedMessagesError, match="rank 0.s collective counts F1 meets"):
            run(crossed, streams)


def test_a_host_waiting_on_a_receive_that_a_peer_in_the_all_to_all_must_send_is_stuck():
    """Hand-made: rank 0 is in an all-to-all with rank 1 before it sends to rank 2; rank 1
    waits for rank 3's message first, rank 3 is in an all-to-all with rank 2, which waits
    for rank 0's message: a cycle through both expert groups and both pipelines, every
    host at its first wait (event 1). With the stage-1 ranks entering the all-to-all
    before their receive, as every data rank runs one program, it finishes."""

    def grid(stage_1_receives_first: bool) -> list[Trace]:
        x, y = a2a(EXPERTS_0, "x"), a2a(EXPERTS_1, "y")
        to_2, from_0 = pipe_op("send", (0, 2), 2, "F0"), pipe_op("recv", (0, 2), 0, "F0")
        to_1, from_3 = pipe_op("send", (1, 3), 1, "B0"), pipe_op("recv", (1, 3), 3, "B0")
        rank_1 = (from_3, x) if stage_1_receives_first else (x, from_3)
        rank_2 = (from_0, y) if stage_1_receives_first else (y, from_0)
        return [blocking(x, to_2), blocking(*rank_1), blocking(*rank_2), blocking(y, to_1)]

    for streams in STREAMS:
        stuck = run(grid(True), streams)
        assert not stuck.finished and stuck.blocked == ((0, 1), (1, 1), (2, 1), (3, 1)), stuck
        assert "rank 1 waits for recv B0" in stuck.report, stuck.report
        assert run(grid(False), streams).finished


def test_one_queue_for_every_communicator_is_stricter_than_one_per_communicator():
    """Hand-made: ranks 0 and 3 post a send (not waited) before their all-to-all, rank 1
    receives rank 3's send after its all-to-all, rank 2 rank 0's after its. Per
    communicator each all-to-all meets at once and each receive then meets its send. With
    one queue per rank ("device") each head waits for an op behind another head: rank 0's
    send for rank 2's receive (behind y), y for rank 3's y (behind its send to 1), that
    send for rank 1's receive (behind x), x for rank 0's x (behind its send)."""
    x, y = a2a(EXPERTS_0, "x"), a2a(EXPERTS_1, "y")
    to_2, from_0 = pipe_op("send", (0, 2), 2, "F0"), pipe_op("recv", (0, 2), 0, "F0")
    to_1, from_3 = pipe_op("send", (1, 3), 1, "B0"), pipe_op("recv", (1, 3), 3, "B0")
    zero, three = Trace(), Trace()
    sent_0, sent_3 = zero.post([to_2]), three.post([to_1])
    zero.wait(zero.post([x]))
    three.wait(three.post([y]))
    zero.wait(sent_0)
    three.wait(sent_3)
    grid = [zero, blocking(x, from_3), blocking(y, from_0), three]
    for streams in STREAMS:
        assert run(grid, streams).finished
    stuck = run(grid, "device")
    assert not stuck.finished and stuck.heads == ((0, 0), (1, 0), (2, 0), (3, 0)), stuck
    assert "rank 0's stream on the device" in stuck.report, stuck.report


@pytest.mark.parametrize("name", [n for n, spec in REGISTRY.items() if spec.synchronous])
def test_every_synchronous_schedule_with_experts_finishes_on_the_grid(name):
    """The lowering posts each MoE layer's 3 forward and 2 backward exchanges (none in W):
    5 per layer for each micro-batch whose pipeline the chunk is on (all of them; half
    of them for Chimera's two), on every rank; the grid finishes (expert_dry_run), also
    with every communicator of a rank on one queue ("device")."""
    from pp_ext.schedules.nccl import grid_traces
    from pp_ext.schedules.validate import expert_dry_run

    for p, data, expert in ((2, 2, 2), (2, 4, 2), (4, 2, 2)):
        schedule = lower(REGISTRY[name].build(p, 2 * p))
        layers = {(r, c): 1 + (r + c) % 2 for r in range(p) for c in range(schedule.chunks)}
        expert_dry_run(schedule, data, expert, layers)
        traces = grid_traces(schedule, data, expert, layers)
        for rank, trace in enumerate(traces):
            count = sum(op.kind == "collective" for op in trace.ops)
            stage_rank = rank // data
            runs = [
                sum(
                    schedule.pipeline(mb) == schedule.placement.holds(stage_rank, c)[0]
                    for mb in range(2 * p)
                )
                for c in range(schedule.chunks)
            ]
            want = sum(5 * n * layers[(stage_rank, c)] for c, n in enumerate(runs))
            assert count == want, (name, p, data, rank)


def test_the_launch_checks_the_expert_order_of_its_grid(tmp_path, monkeypatch):
    """check_before_launch (pp-ext plan, tune, the job) runs the expert dry run on the
    pipelines of one expert group of the recipe's grid (pipe 2 x data 4 x expert 2 here:
    pipe 2 x data 2), and turns a refusal into one line."""
    from hf_models import MOE_CONFIGS
    from recipe_cases import MINIMAL, one_line_error

    from pp_ext.config.recipe import load
    from pp_ext.schedules.validate import expert_dry_run
    from pp_ext.training import preflight

    MOE_CONFIGS["mixtral"](False).save_pretrained(tmp_path / "model")
    (tmp_path / "recipe.yaml").write_text(MINIMAL)
    model = f"model.path={tmp_path / 'model'}"
    checked = []

    def refuse(schedule, data, expert):
        checked.append((schedule.name, schedule.lowered, data, expert))
        expert_dry_run(schedule, data, expert)  # the real one passes
        raise InvalidScheduleError("deadlock under NCCL's rules (stub)")

    monkeypatch.setattr(preflight, "expert_dry_run", refuse)
    for name in ("zbv", "chimera"):
        recipe = load(
            tmp_path / "recipe.yaml", [model, f"parallel.schedule={name}", "parallel.expert=2"]
        )
        assert one_line_error(preflight.check_before_launch, recipe, 8).startswith(
            f"parallel.schedule={name} with parallel.expert=2: deadlock under NCCL's rules (stub)"
        )
    assert checked == [("zbv", True, 2, 2), ("chimera", True, 2, 2)]  # one expert group's
    recipe = load(tmp_path / "recipe.yaml", [model, "parallel.expert=1"])
    preflight.check_before_launch(recipe, 8)  # no expert parallelism: nothing to check
    assert len(checked) == 2


# the engine, recorded: Mixtral (every layer MoE), 4 layers, at pipe 2 x data 2 x expert 2
EXPERT_CASES = [("1f1b", ""), ("zb-h1", ""), ("zb-h1", "emulate-nccl")]
HEADER = "int64[177]"  # pp_ext.engine.p2p's shape header: 1 + MAX_TENSORS * (3 + MAX_DIMS)


def run_expert_recorded(rank: int, world: int, tmp: str) -> dict:
    import os

    import torch
    import torch.distributed as dist
    from deepspeed.utils import groups
    from hf_models import MOE_CONFIGS
    from tensor_cases import MICRO_BATCHES, batch, pipeline_engine
    from transformers import AutoModelForCausalLM

    from pp_ext.engine import nccl_emulation, p2p
    from pp_ext.moe.dispatch import ShardedExperts

    torch.manual_seed(0)
    config = MOE_CONFIGS["mixtral"](False)
    config.num_hidden_layers = 4  # cut uniformly, both stages hold MoE layers
    model = AutoModelForCausalLM.from_config(config).float()
    if rank == 0:
        model.save_pretrained(f"{tmp}/hf")
    dist.barrier()
    out: dict = {"cases": []}
    for schedule, mode in EXPERT_CASES:
        os.environ["PP_EXT_P2P"] = mode
        p2p._links.clear()  # the pipeline's link is made per mode: new groups, on every rank
        engine = pipeline_engine(f"{tmp}/hf", (2, 1, 2), schedule, expert=2)
        module = engine.module
        dp = engine.grid.get_data_parallel_rank()
        data_iter = iter([batch(0, dp * MICRO_BATCHES + k) for k in range(MICRO_BATCHES)])
        loss, trace = record(engine.train_batch, data_iter)
        layers = {
            (engine.stage_id, c): sum(
                isinstance(m, ShardedExperts)
                for layer in module.chunk_modules(c)
                for m in layer.modules()
            )
            for c in range(module.chunks)
        }
        out["cases"].append(
            {"loss": float(loss), "trace": trace, "layers": layers, "schedule": engine.schedule}
        )
    group = groups._get_expert_parallel_group("ep_size_2")  # every rank's, MoE layers or not
    out["group"] = tuple(dist.get_process_group_ranks(group))
    # the emulation on its own: the members post different exchanges of equal size
    os.environ["PP_EXT_P2P"] = ""
    me = dist.get_rank(group)
    rows = torch.full((2, 3), float(rank))
    received = torch.empty_like(rows)
    dist.all_to_all_single(received, rows, group=group)  # plain gloo: passes, whatever each is
    out["gloo"] = received[:, 0].tolist()
    try:
        what = "counts" if me == 0 else "rows grad"
        nccl_emulation.all_to_all(received, rows, None, None, group, what, None)
        out["emulated"] = "passed"
    except RuntimeError as error:
        out["emulated"] = str(error)
    return out


def projection(trace: Trace, group: tuple[int, ...]) -> list:
    """What a rank posts, in order: the pipeline's messages (each batch's (kind, peer)s, the
    shape headers left out) and the expert group's all-to-alls."""
    out: list = []
    for event in trace.events:
        if event.kind != "post":
            continue
        ops = [trace.ops[i] for i in event.ops]
        if all(op.kind == "collective" for op in ops):
            # recorded: all_to_all_single on the group (its ranks may also be the data group's);
            # lowered: the expert communicator's
            out += [
                "a2a"
                for op in ops
                if op.group == group
                and (op.label.startswith("all_to_all_single") or op.name.startswith("ep_size"))
            ]
            continue
        if any(op.label == HEADER for op in ops):
            continue
        out.append(tuple(dict.fromkeys((op.kind, op.peer) for op in ops)))
    return out


@pytest.mark.slow
def test_the_engines_expert_all_to_alls_are_recorded_and_replay_under_nccl(tmp_path):
    """One launch of 4 ranks, pipe 2 x data 2 x expert 2 (Mixtral): 1F1B and ZB-H1 recorded
    on plain gloo replay to the end under every stream model ("device" too); each rank's messages and
    all-to-alls come in the order grid_traces lowers them to; ZB-H1 under the emulation
    gives ZB-H1's loss; members posting different exchanges pass plain gloo and fail
    under the emulation, naming both."""
    from pp_ext.schedules.nccl import grid_traces
    from pp_ext.testing.spawn import spawn

    ranks = spawn(run_expert_recorded, 4, str(tmp_path), timeout=900)
    for i, (schedule, mode) in enumerate(EXPERT_CASES):
        cases = [r["cases"][i] for r in ranks]
        if mode:
            assert [c["loss"] for c in cases] == [r["cases"][i - 1]["loss"] for r in ranks]
            continue
        traces = [c["trace"] for c in cases]
        for streams in (*STREAMS, "device"):
            outcome = run(traces, streams)
            assert outcome.finished, (schedule, streams, outcome.report)
        layers = {key: n for c in cases for key, n in c["layers"].items()}
        assert sum(layers.values()) == 4 and all(layers.values()), layers
        lowered = grid_traces(cases[0]["schedule"], 2, 2, layers)
        for rank, (recorded, expected) in enumerate(zip(traces, lowered)):
            group = ranks[rank]["group"]
            want, got = projection(expected, group), projection(recorded, group)
            assert "a2a" in got and got == want, (schedule, rank, layers, got, want)
    for rank, result in enumerate(ranks):
        assert result["gloo"] == [rank - rank % 2, rank - rank % 2 + 1], result
        me = "counts" if rank % 2 == 0 else "rows grad"
        other = "rows grad" if rank % 2 == 0 else "counts"
        assert (
            f"posts the all-to-all {me!r}" in result["emulated"]
            and f"posts {other!r}" in result["emulated"]
        ), result
