"""The engine runs every registered schedule exactly: per-step losses and final
parameters after 3 optimizer steps equal a single-process reference on the same
data (fp32, CPU, gloo), tied and untied heads, pipeline 2 and 4, data parallel 2.
The same runs are NCCL's test: their calls, recorded on plain gloo, replay to the end
under both of NCCL's stream models (tests/nccl_recorder.py; tests/test_nccl.py)."""

from __future__ import annotations

import pytest
from engine_cases import BASELINE, batch, cases_for, launch
from torch import nn

from pp_ext.schedules import REGISTRY

CHUNKS = {"interleaved-1f1b": [2, 3], "looped-bfs": [2, 3]}  # chunks per rank (others: default)


@pytest.mark.slow
def test_pipeline_2_every_schedule_matches_reference():
    launch(2, 2, cases_for(2, [2, 4], CHUNKS))


@pytest.mark.slow
def test_pipeline_4_every_schedule_matches_reference():
    # chimera takes only multiples of p: its untied case runs one basic unit (m = p)
    launch(4, 4, cases_for(4, [8, 9], CHUNKS) + [("chimera", 4, 2, False)])


@pytest.mark.slow
def test_pipeline_2_data_2_every_schedule_matches_reference():
    launch(4, 2, cases_for(2, [4, 5], CHUNKS))


def test_engine_knows_actions_not_schedule_names():
    """A schedule is a generator alone: no string in the engine's code names one."""
    import ast
    from pathlib import Path

    import pp_ext.engine

    names = set(REGISTRY) | {BASELINE}
    for path in Path(pp_ext.engine.__file__).parent.glob("*.py"):
        if path.name in (
            "initialize.py",
        ):  # initialize picks DeepSpeed's engine for the baseline by name
            continue
        literals = {
            node.value
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
        }
        assert not names & literals, f"{path.name} names schedules {names & literals}"


class Detach(nn.Module):
    def forward(self, x):
        return x.detach()


def run_detached(rank: int, world: int) -> None:
    import torch
    from deepspeed.pipe import LayerSpec

    import pp_ext
    from pp_ext.engine.module import ChunkedPipelineModule
    from pp_ext.testing.tiny import TinyConfig, layer_specs, lm_loss

    specs = layer_specs(TinyConfig(blocks=2, tied=False))
    specs.insert(2, LayerSpec(Detach))
    module = ChunkedPipelineModule(
        layers=specs, num_stages=2, loss_fn=lm_loss, partition_method=[0, 3, 6]
    )
    engine, *_ = pp_ext.initialize(
        model=module,
        optimizer=torch.optim.SGD(module.parameters(), lr=0.1),
        config={
            "train_micro_batch_size_per_gpu": 2,
            "gradient_accumulation_steps": 2,
            "train_batch_size": 4,
        },
        schedule="1f1b",
    )
    engine.train_batch(iter([batch(0, 0, k, 64) for k in range(2)]))


@pytest.mark.slow
def test_a_stage_that_cuts_the_gradient_fails_with_a_clear_error():
    from pp_ext.testing.spawn import RankFailed, spawn

    with pytest.raises(RankFailed, match="stage 0 .* returns no tensor that needs a gradient"):
        spawn(run_detached, 2, timeout=120)


def run_frozen_first_stage(rank: int, world: int) -> list[float]:
    import torch

    import pp_ext
    from pp_ext.engine.module import ChunkedPipelineModule
    from pp_ext.testing.tiny import TinyConfig, layer_specs, lm_loss

    # V placement: rank 0 holds the first stage (frozen, as when fine-tuning only the
    # upper layers) and the last stage (trainable)
    module = ChunkedPipelineModule(
        layers=layer_specs(TinyConfig(blocks=2, tied=False)),
        num_stages=2,
        loss_fn=lm_loss,
        chunks=2,
        placement="v",
        partition_method=[0, 2, 3, 4, 5],
    )
    frozen = {id(p) for p in module.chunk_parameters(0)} if rank == 0 else set()
    for param in module.parameters():
        param.requires_grad_(id(param) not in frozen)
    before = [p.detach().clone() for p in module.parameters() if id(p) in frozen]
    trainable = [p for p in module.parameters() if p.requires_grad]
    engine, *_ = pp_ext.initialize(
        model=module,
        optimizer=torch.optim.SGD(trainable, lr=0.1),
        config={
            "train_micro_batch_size_per_gpu": 2,
            "gradient_accumulation_steps": 4,
            "train_batch_size": 8,
            "gradient_clipping": 0.0,
        },
        schedule="zbv",
    )
    losses = [
        float(engine.train_batch(iter([batch(0, 0, k, 64) for k in range(4)]))) for _ in range(3)
    ]
    assert (
        before
        and all(torch.equal(a, b) for a, b in zip(before, module.chunk_parameters(0)))
        or rank != 0
    )
    return losses


@pytest.mark.slow
def test_a_frozen_first_stage_trains_the_rest():
    from pp_ext.testing.spawn import spawn

    losses = spawn(run_frozen_first_stage, 2, timeout=120)
    assert losses[0] == losses[1] and losses[0][-1] < losses[0][0]
