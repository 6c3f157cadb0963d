"""Shared by the asynchronous-engine tests: each schedule run on the engine beside its rule."""

from __future__ import annotations

STEPS = 10


TOLERANCE = 1e-5


def batch(g: int, vocab: int):
    import torch

    gen = torch.Generator().manual_seed(1000 + g)
    ids = torch.randint(vocab, (2, 8), generator=gen)
    return ids, torch.roll(ids, -1, dims=1)


def optimizer_for(kind: str, params):
    """SGD with momentum, or AdamW (what the training job uses; its state is per
    parameter, so a stage's updates must reach exactly its own state)."""
    import torch

    if kind == "adamw":
        return torch.optim.AdamW(params, lr=0.01, weight_decay=0.01)
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def run_case(name: str, pipe: int, m: int, kind: str = "sgd") -> dict:
    from torch import nn

    import pp_ext
    from pp_ext.engine.module import ChunkedPipelineModule
    from pp_ext.schedules.async_rules import PipeMareOptions
    from pp_ext.testing.async_reference import AsyncReference
    from pp_ext.testing.reference import SequentialReference
    from pp_ext.testing.tiny import TinyConfig, layer_specs, lm_loss

    config = TinyConfig(blocks=pipe, tied=False)
    specs = layer_specs(config)
    options = PipeMareOptions(lr_warmup=5, decay=0.1)
    module = ChunkedPipelineModule(
        layers=specs,
        num_stages=pipe,
        loss_fn=lm_loss,
        partition_method="uniform",
        seed_layers=True,
        base_seed=1234,
    )
    optimizer = optimizer_for(kind, module.parameters())
    ds_config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": m,
        "train_batch_size": 2 * m,
        "steps_per_print": 10**9,
        "gradient_clipping": 0.0,
    }
    engine, *_ = pp_ext.initialize(
        model=module, optimizer=optimizer, config=ds_config, schedule=name, pipemare=options
    )
    losses = [
        float(engine.train_batch(iter([batch(n * m + k, config.vocab) for k in range(m)])))
        for n in range(STEPS)
    ]
    try:
        engine.save_checkpoint("/nonexistent")
        refused = ""
    except RuntimeError as err:
        refused = str(err)
    engine.flush()

    reference = SequentialReference(specs, lm_loss, base_seed=1234)
    stages = [nn.Sequential(*reference.layers[a:b]) for a, b in zip(module.parts, module.parts[1:])]
    rule = AsyncReference(
        name, stages, lm_loss, [optimizer_for(kind, s.parameters()) for s in stages], m, options
    )
    ref_losses = [
        sum(rule.micro_batch(*batch(n * m + k, config.vocab)) for k in range(m)) / m
        for n in range(STEPS)
    ]
    ref_params = dict(reference.named_parameters())
    mine = dict(module.named_parameters())
    param_diff = max(
        float((p.detach() - ref_params[n].detach()).abs().max()) for n, p in mine.items()
    )
    return {
        "case": (name, pipe, m, kind),
        "losses": losses,
        "ref_losses": ref_losses,
        "param_diff": param_diff,
        "missing": sorted(set(mine) - set(ref_params)),
        "refused": refused,
    }


def run_cases(rank: int, world: int, cases: list[tuple]) -> list[dict]:
    return [run_case(name, world, *case) for name, *case in cases]


def launch(world: int, cases: list[tuple]) -> None:
    """The cases on ``world`` ranks, their calls recorded on plain gloo and replayed under
    NCCL's stream models (tests/nccl_recorder.py), and each equal to its rule."""
    from nccl_recorder import launch_recorded

    failures = []
    for rank, results in enumerate(launch_recorded(world, "async_cases", cases)):
        for r in results:
            loss_diff = max(abs(a - b) for a, b in zip(r["losses"], r["ref_losses"]))
            print(
                rank,
                r["case"],
                f"loss diff {loss_diff:.2e} param diff {r['param_diff']:.2e}",
                f"losses {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}",
            )
            if r["missing"] or loss_diff > TOLERANCE or r["param_diff"] > TOLERANCE:
                failures.append(
                    f"rank {rank} {r['case']}: loss diff {loss_diff:.2e}, param diff "
                    f"{r['param_diff']:.2e}, unnamed {r['missing'][:3]}"
                )
            if "engine.flush()" not in r["refused"]:
                failures.append(f"rank {rank} {r['case']}: save_checkpoint in flight not refused")
    assert not failures, "\n".join(failures)
