"""Shared by the engine tests: the cases every synchronous schedule runs and their data."""

from __future__ import annotations

from torch import nn

from pp_ext.schedules import REGISTRY, ConstraintError

TOLERANCE = 1e-5


BASELINE = "deepspeed-1f1b"


def cases_for(
    pipe: int, sizes: list[int], chunk_choices: dict[str, list[int]] | None = None
) -> list[tuple]:
    """(schedule, micro_batches, chunks, tied) for every synchronous schedule that accepts
    the sizes (the asynchronous ones have their own references: tests/test_async.py)."""
    cases = [(BASELINE, sizes[-1], 1, True), (BASELINE, sizes[0], 1, False)]
    for name, spec in REGISTRY.items():
        if not spec.synchronous:
            continue
        for i, m in enumerate(sizes):
            for chunks in (chunk_choices or {}).get(name, [spec.default_chunks]):
                try:
                    spec.check(pipe, m, chunks)
                except ConstraintError:
                    continue
                cases.append((name, m, chunks, i % 2 == 0))  # tied head first, then untied
    return cases


def batch(step: int, dp_rank: int, micro_batch: int, vocab: int):
    import torch

    gen = torch.Generator().manual_seed(10_000 * step + 100 * dp_rank + micro_batch)
    ids = torch.randint(vocab, (2, 8), generator=gen)
    return ids, torch.roll(ids, -1, dims=1)


STEPS = 3


def carrying_ids(specs: list) -> list:
    """The same model, but every stage passes (hidden, token ids) on: a tuple with an
    integer tensor crosses each boundary (batched p2p, no gradient for the ids)."""
    from deepspeed.pipe import LayerSpec

    return [
        LayerSpec(KeepIds, specs[0]),
        *[LayerSpec(WithIds, spec) for spec in specs[1:-1]],
        LayerSpec(DropIds, specs[-1]),
    ]


class _Wrapper(nn.Module):
    def __init__(self, spec) -> None:
        super().__init__()
        self.inner = spec.build()


class KeepIds(_Wrapper):
    def forward(self, ids):
        return self.inner(ids), ids


class WithIds(_Wrapper):
    def forward(self, inputs):
        hidden, ids = inputs
        return self.inner(hidden), ids


class DropIds(_Wrapper):
    def forward(self, inputs):
        return self.inner(inputs[0])


def run_case(name: str, pipe: int, micro_batches: int, chunks: int, tied: bool) -> dict:
    import torch
    from deepspeed import comm as dist
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    import pp_ext
    from pp_ext.engine.module import ChunkedPipelineModule
    from pp_ext.testing.reference import SequentialReference
    from pp_ext.testing.tiny import TinyConfig, layer_specs, lm_loss

    world = dist.get_world_size()
    data = world // pipe
    config = TinyConfig(blocks=max(2, pipe * chunks), tied=tied)
    # the untied variant also passes the token ids along with the hidden states
    specs = layer_specs(config) if tied else carrying_ids(layer_specs(config))
    placement = "loop" if name == BASELINE else REGISTRY[name].placement
    module = ChunkedPipelineModule(
        layers=specs,
        topology=PipeDataParallelTopology(num_pp=pipe, num_dp=data),
        loss_fn=lm_loss,
        chunks=chunks,
        placement=placement,
        partition_method="uniform",
        seed_layers=True,
        base_seed=1234,
    )
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)
    ds_config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": micro_batches,
        "train_batch_size": 2 * micro_batches * data,
        "steps_per_print": 10**9,
        "gradient_clipping": 0.0,
    }
    engine, *_ = pp_ext.initialize(
        model=module, optimizer=optimizer, config=ds_config, schedule=name
    )
    dp_rank = engine.grid.data_parallel_id
    losses = []
    for step in range(STEPS):
        data_iter = iter([batch(step, dp_rank, k, config.vocab) for k in range(micro_batches)])
        losses.append(float(engine.train_batch(data_iter)))

    reference = SequentialReference(specs, lm_loss, base_seed=1234)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    ref_losses = []
    for step in range(STEPS):
        ref_optimizer.zero_grad()
        total = 0.0
        for d in range(data):
            for k in range(micro_batches):
                loss = reference.loss(*batch(step, d, k, config.vocab)) / (micro_batches * data)
                loss.backward()
                total += float(loss.detach())
        ref_optimizer.step()
        ref_losses.append(total)

    ref_params = dict(reference.named_parameters())
    mine = dict(module.named_parameters())
    missing = sorted(set(mine) - set(ref_params))
    param_diff = max(
        (
            float((p.detach() - ref_params[n].detach()).abs().max())
            for n, p in mine.items()
            if n in ref_params
        ),
        default=0.0,
    )
    return {
        "case": (name, pipe, micro_batches, chunks, tied),
        "losses": losses,
        "ref_losses": ref_losses,
        "param_diff": param_diff,
        "params": sorted(mine),
        "missing": missing,
        "ref_params": sorted(ref_params),
    }


def run_cases(rank: int, world: int, pipe: int, cases: list[tuple]) -> list[dict]:
    return [run_case(name, pipe, m, v, tied) for name, m, v, tied in cases]


def check(results_by_rank: list[list[dict]]) -> None:
    failures = []
    for rank, results in enumerate(results_by_rank):
        for r in results:
            loss_diff = max(abs(a - b) for a, b in zip(r["losses"], r["ref_losses"]))
            if r["missing"] or loss_diff > TOLERANCE or r["param_diff"] > TOLERANCE:
                failures.append(
                    f"rank {rank} {r['case']}: loss diff {loss_diff:.2e}, param diff "
                    f"{r['param_diff']:.2e}, unnamed params {r['missing'][:3]}"
                )
    for i, first in enumerate(results_by_rank[0]):
        held = set().union(*(set(results[i]["params"]) for results in results_by_rank))
        if held != set(first["ref_params"]):
            failures.append(
                f"{first['case']}: ranks together hold {sorted(held)}, the model has "
                f"{first['ref_params']}"
            )
    assert not failures, "\n".join(failures)


def launch(world: int, pipe: int, cases: list[tuple]) -> None:
    """The cases on ``world`` ranks, their calls recorded on plain gloo and replayed under
    NCCL's stream models (tests/nccl_recorder.py), and each exact."""
    from nccl_recorder import launch_recorded

    check(launch_recorded(world, "engine_cases", pipe, cases))
