"""A pipeline of one stage: the W-split schedules run 1f1b's work and cost nothing more.

In this process as a world of one rank (gloo), bf16 with BF16_Optimizer accumulating
in fp32 (ZeRO-1), torch AdamW, as the training job's ``zero1-bf16`` base.
"""

from __future__ import annotations

import pytest
import torch

from pp_ext.schedules import lower
from pp_ext.testing.spawn import free_port, init_rank

STEPS, MICRO_BATCHES = 3, 4
BF16 = {
    "bf16": {"enabled": True, "immediate_grad_update": False},
    "data_types": {"grad_accum_dtype": "fp32"},
    "zero_optimization": {"stage": 1},
}


@pytest.fixture(scope="module")
def world():
    from deepspeed import comm as dist

    if not dist.is_initialized():
        init_rank(0, 1, free_port())


def engine(name: str, tied: bool, fuse: bool = True):
    import pp_ext
    from pp_ext.engine import initialize as init_module
    from pp_ext.engine.module import ChunkedPipelineModule
    from pp_ext.schedules import get
    from pp_ext.testing.tiny import TinyConfig, layer_specs, lm_loss

    spec = get(name)
    module = ChunkedPipelineModule(
        layers=layer_specs(TinyConfig(blocks=4, tied=tied)),
        num_stages=1,
        loss_fn=lm_loss,
        chunks=spec.default_chunks,
        placement=spec.placement,
        partition_method="uniform",
        seed_layers=True,
        base_seed=1234,
    )
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": MICRO_BATCHES,
        "train_batch_size": 2 * MICRO_BATCHES,
        "steps_per_print": 10**9,
        "gradient_clipping": 1.0,
        **BF16,
    }
    with pytest.MonkeyPatch.context() as patch:
        if not fuse:  # the program as built, every I and W apart
            patch.setattr(init_module, "fuse_backward", lower)
        return pp_ext.initialize(model=module, optimizer=optimizer, config=config, schedule=name)[0]


def batches(step: int):
    gen = torch.Generator().manual_seed(step)
    ids = [torch.randint(64, (2, 8), generator=gen) for _ in range(MICRO_BATCHES)]
    return [(x, torch.roll(x, -1, dims=1)) for x in ids]


def train(engine) -> tuple[list[float], dict[str, torch.Tensor]]:
    losses = [float(engine.train_batch(iter(batches(step)))) for step in range(STEPS)]
    return losses, {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def deferrable(engine) -> int:
    from pp_ext.autograd.split_backward import Deferrable

    return sum(isinstance(m, Deferrable) for m in engine.module.modules())


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("name", ["zb-h1", "zbv"])
def test_w_split_schedules_equal_1f1b_to_the_bit(world, name, tied):
    """Fused, zb-h1 and zbv run F B per micro-batch with no linear layer patched; run
    split, each parameter still gets its gradient in one pass (the tiny model shares no
    weight between a deferred GEMM and anything else), rounded to bf16 once: the same
    bits as 1f1b either way."""
    reference = train(engine("1f1b" if name == "zb-h1" else "interleaved-1f1b", tied))
    fused, split = engine(name, tied), engine(name, tied, fuse=False)
    assert deferrable(fused) == 0 and deferrable(split) > 0
    for run in (fused, split):
        losses, params = train(run)
        assert losses == reference[0]
        assert all(torch.equal(p, reference[1][n]) for n, p in params.items())


def test_a_w_pass_accumulates_only_the_weights_it_made(world):
    """bf16: after a W, only the deferred weights' bf16 gradients are added to the fp32
    accumulators (the others were dropped before the pass, so it skips them)."""
    from pp_ext.autograd.split_backward import Deferrable

    run = engine("zb-h1", tied=False, fuse=False)
    deferred = {id(m.weight) for m in run.module.modules() if isinstance(m, Deferrable)}
    added, in_w = [], [False]
    store_run, accumulate = run.store.run, run._accumulate_low_precision_grads

    def run_w(key):
        in_w[0] = True
        store_run(key)

    def accumulate_and_record():
        if in_w[0]:
            added.append(
                {id(p) for group in run.optimizer.bf16_groups for p in group if p.grad is not None}
            )
            in_w[0] = False
        accumulate()

    run.store.run, run._accumulate_low_precision_grads = run_w, accumulate_and_record
    run.train_batch(iter(batches(0)))
    assert len(added) == MICRO_BATCHES and all(params == deferred for params in added)
