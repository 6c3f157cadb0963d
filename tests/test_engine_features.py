"""Engine features beyond plain fp32 training, each checked against a single-process
reference or against DeepSpeed's own engine (CPU, gloo, pipeline 2):
eval_batch, activation checkpointing, ZeRO-1, bf16, and checkpoint save/load."""

from __future__ import annotations

import pytest

from pp_ext.schedules import REGISTRY, dry_run, names

EXACT = 1e-6  # fp32, same operations in the same order as the reference
LR, MOMENTUM = 0.05, 0.9
BASELINE = "deepspeed-1f1b"


def batch(step: int, dp_rank: int, micro_batch: int, vocab: int):
    import torch

    gen = torch.Generator().manual_seed(10_000 * step + 100 * dp_rank + micro_batch)
    ids = torch.randint(vocab, (2, 8), generator=gen)
    return ids, torch.roll(ids, -1, dims=1)


def batches(step: int, dp_rank: int, micro_batches: int, vocab: int) -> list:
    return [batch(step, dp_rank, k, vocab) for k in range(micro_batches)]


def build(
    name: str,
    *,
    micro_batches: int = 4,
    chunks: int | None = None,
    pipe: int = 2,
    config=None,
    base_seed: int = 1234,
    tied: bool = True,
    blocks: int | None = None,
):
    """A tiny LM on ``name``'s placement and its engine (SGD with momentum)."""
    import torch
    from deepspeed import comm as dist
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    import pp_ext
    from pp_ext.engine.module import ChunkedPipelineModule
    from pp_ext.testing.tiny import TinyConfig, layer_specs, lm_loss

    data = dist.get_world_size() // pipe
    spec = REGISTRY.get(name)
    chunks = chunks or (spec.default_chunks if spec else 1)
    specs = layer_specs(TinyConfig(blocks=blocks or max(2, pipe * chunks), tied=tied))
    module = ChunkedPipelineModule(
        layers=specs,
        topology=PipeDataParallelTopology(num_pp=pipe, num_dp=data),
        loss_fn=lm_loss,
        chunks=chunks,
        placement=spec.placement if spec else "loop",
        partition_method="uniform",
        seed_layers=True,
        base_seed=base_seed,
    )
    optimizer = torch.optim.SGD(module.parameters(), lr=LR, momentum=MOMENTUM)
    ds_config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": micro_batches,
        "train_batch_size": 2 * micro_batches * data,
        "steps_per_print": 10**9,
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        **(config or {}),
    }
    engine, *_ = pp_ext.initialize(
        model=module, optimizer=optimizer, config=ds_config, schedule=name
    )
    return engine, module, specs


def train(engine, steps, micro_batches: int = 4) -> list[float]:
    from pp_ext.testing.tiny import TinyConfig

    dp_rank = engine.grid.data_parallel_id
    return [
        float(engine.train_batch(iter(batches(step, dp_rank, micro_batches, TinyConfig.vocab))))
        for step in steps
    ]


class Reference:
    """The same model in one process, trained like the pipeline (data parallel
    replicas' micro-batches summed into one step)."""

    def __init__(self, specs, clip: float = 0.0) -> None:
        import torch

        from pp_ext.testing.reference import SequentialReference
        from pp_ext.testing.tiny import lm_loss

        self.model = SequentialReference(specs, lm_loss, base_seed=1234)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=MOMENTUM)
        self.clip = clip  # DeepSpeed's gradient_clipping: the whole model's norm, as torch clips

    def train(self, steps, micro_batches: int = 4, data: int = 1) -> list[float]:
        import torch

        from pp_ext.testing.tiny import TinyConfig

        losses = []
        for step in steps:
            self.optimizer.zero_grad()
            total = 0.0
            for d in range(data):
                for ids, labels in batches(step, d, micro_batches, TinyConfig.vocab):
                    loss = self.model.loss(ids, labels) / (micro_batches * data)
                    loss.backward()
                    total += float(loss.detach())
            if self.clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            self.optimizer.step()
            losses.append(total)
        return losses

    def param_diff(self, module) -> float:
        """Largest difference of the pipeline rank's parameters from the reference's."""
        ref = dict(self.model.named_parameters())
        return max(
            float((p.detach().float() - ref[n].detach()).abs().max())
            for n, p in module.named_parameters()
        )


def loss_diff(a, b) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def check(results_by_rank: list[list[dict]], tolerance: float) -> None:
    """Every rank's measured differences of every case are within ``tolerance``."""
    worst = {}
    for results in results_by_rank:
        for r in results:
            for what, diff in r["diffs"].items():
                worst[(r["case"], what)] = max(diff, worst.get((r["case"], what), 0.0))
    print("\n".join(f"{case} {what}: {diff:.2e}" for (case, what), diff in worst.items()))
    failures = [
        f"{case} {what}: {diff:.2e} > {tolerance:.0e}"
        for (case, what), diff in worst.items()
        if not diff <= tolerance
    ]
    assert not failures, "\n".join(failures)


def launch(fn, world: int, *args) -> list:
    from pp_ext.testing.spawn import spawn

    return spawn(fn, world, *args)


# --------------------------------------------------------------------------- eval_batch


def test_forward_only_programs_run_to_the_end():
    from pp_ext.engine.engine import forward_only
    from pp_ext.schedules import Kind
    from pp_ext.schedules import build as build_schedule

    for name, chunks in (("1f1b", 1), ("interleaved-1f1b", 2), ("interleaved-1f1b", 3), ("zbv", 2)):
        for p in (1, 2, 3, 4):
            schedule = build_schedule(name, p, 2 * p, chunks)
            for m in (1, 2, 5):
                program = forward_only(schedule, m)
                dry_run(program)
                forwards = sorted(
                    (rank, a.chunk, a.micro_batch)
                    for rank, actions in enumerate(program.programs)
                    for a in actions
                    if a.kind is Kind.F
                )
                assert forwards == sorted(
                    (rank, chunk, mb)
                    for rank in range(p)
                    for chunk in range(chunks)
                    for mb in range(m)
                ), (name, p, m)


def eval_cases(rank: int, world: int, cases: list[tuple[str, int | None]]) -> list[dict]:
    import torch

    from pp_ext.testing.tiny import TinyConfig

    results = []
    for name, chunks in cases:
        engine, module, specs = build(name, chunks=chunks)
        reference = Reference(specs)
        data = batches(100, 0, 4, TinyConfig.vocab)
        # an evaluation before any training (as a training job's step-0 eval) must not
        # leave the pipeline expecting activations without gradients
        before = engine.eval_batch(iter(data))
        with torch.no_grad():
            ref_before = sum(reference.model.loss(*b) for b in data) / 4
        losses = train(engine, [0])
        ref_losses = reference.train([0])
        loss = engine.eval_batch(iter(data))
        was_training = module.training
        # 3 micro-batches (not the training 4), logits back on the loss rank, no broadcast
        short = engine.eval_batch(
            iter(data[:3]), return_logits=True, bcast_loss=False, num_micro_batches=3
        )
        with torch.no_grad():
            ref_eval = [reference.model.loss(*b) for b in data]
            ref_logits = reference.model(data[2][0])
        losses += train(engine, [1])
        ref_losses += reference.train([1])
        diffs = {
            "eval loss before training": abs(float(before) - float(ref_before)),
            "eval loss": abs(float(loss) - float(sum(ref_eval) / 4)),
            "train losses around eval": loss_diff(losses, ref_losses),
            "params after": reference.param_diff(module),
            "train mode kept": float(not was_training),
        }
        if engine.is_last_stage():
            eval_loss, logits = short
            diffs["eval loss, 3 micro-batches"] = abs(
                float(eval_loss) - float(sum(ref_eval[:3]) / 3)
            )
            diffs["eval logits"] = float((logits - ref_logits).abs().max())
        else:
            diffs["no loss without broadcast"] = float(short[0] is not None)
        results.append({"case": (name, chunks), "diffs": diffs})
    return results


@pytest.mark.slow
def test_eval_batch_matches_reference_and_leaves_training_alone():
    check(launch(eval_cases, 2, [("1f1b", None), ("interleaved-1f1b", 2), ("zbv", None)]), EXACT)


# --------------------------------------------------------------------------- activation checkpointing


def checkpointing_cases(rank: int, world: int, cases: list[tuple[str, bool]]) -> list[dict]:
    from pp_ext.testing.tiny import Block

    results = []
    for name, reentrant in cases:
        engine, module, specs = build(
            name,
            config={"pipeline": {"activation_checkpoint_interval": 1, "use_reentrant": reentrant}},
        )
        calls = []
        blocks = [m for m in module.modules() if isinstance(m, Block)]
        for block in blocks:
            block.register_forward_pre_hook(lambda *_: calls.append(1))
        reference = Reference(specs)
        diffs = {
            "losses": loss_diff(train(engine, range(2)), reference.train(range(2))),
            "params": reference.param_diff(module),
            # each block runs in F and again when its checkpoint is recomputed
            "block forwards - 2 per micro-batch": abs(len(calls) - 2 * 2 * 4 * len(blocks)),
        }
        results.append(
            {"case": (name, "reentrant" if reentrant else "non-reentrant"), "diffs": diffs}
        )
    return results


@pytest.mark.slow
def test_activation_checkpointing_matches_reference():
    cases = [
        (name, reentrant)
        for name in ("zb-h1", "zbv", "interleaved-1f1b")
        for reentrant in (True, False)
    ]
    check(launch(checkpointing_cases, 2, cases), EXACT)


# --------------------------------------------------------------------------- ZeRO-1


def zero_cases(rank: int, world: int, pipe: int, names: list[str]) -> list[dict]:
    results = []
    for name in names:
        engine, module, specs = build(
            name, pipe=pipe, config={"zero_optimization": {"stage": 1}}, tied=len(results) % 2 == 0
        )
        reference = Reference(specs)
        data = world // pipe
        diffs = {
            "losses": loss_diff(train(engine, range(3)), reference.train(range(3), data=data)),
            "params": reference.param_diff(module),
            "is ZeRO": float(type(engine.optimizer).__name__ != "DeepSpeedZeroOptimizer"),
        }
        results.append({"case": (name, f"pipe {pipe} x data {data}"), "diffs": diffs})
    return results


@pytest.mark.slow
def test_zero1_every_schedule_matches_reference():
    check(launch(zero_cases, 2, 2, names(synchronous=True)), EXACT)


@pytest.mark.slow
def test_zero1_data_parallel_2_split_backward_matches_reference():
    check(launch(zero_cases, 4, 2, ["zb-h1", "zbv"]), EXACT)


# --------------------------------------------------------------------------- bf16

BF16_CONFIGS = {  # label: (config, the optimizer DeepSpeed builds for it)
    # BF16_Optimizer accumulating micro-batches' gradients in bf16 (with a warning) ...
    "bf16": ({"bf16": {"enabled": True}}, "BF16_Optimizer"),
    # ... or in fp32 ...
    "bf16 zero-1 fp32-accum": (
        {
            "bf16": {"enabled": True},
            "zero_optimization": {"stage": 1},
            "data_types": {"grad_accum_dtype": "fp32"},
        },
        "BF16_Optimizer",
    ),
    # ... and the ZeRO-1 optimizer, accumulating in the bf16 .grad
    "bf16 zero-1": (
        {"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}},
        "DeepSpeedZeroOptimizer",
    ),
}
BF16_SCHEDULES = [BASELINE, "1f1b", "zb-h1", "zbv"]


def bf16_cases(rank: int, world: int) -> list[dict]:
    from deepspeed.utils import safe_get_full_fp32_param

    results = []
    for label, (config, _) in BF16_CONFIGS.items():
        for name in BF16_SCHEDULES:
            engine, module, _ = build(name, config=config, blocks=4)  # one model for every schedule

            def masters() -> dict:  # the optimizer's fp32 weights: the update before bf16 rounds it
                return {
                    n: safe_get_full_fp32_param(p).detach().clone().numpy()
                    for n, p in module.named_parameters()
                }

            before = masters()
            losses = train(engine, range(3))
            results.append(
                {
                    "config": label,
                    "schedule": name,
                    "optimizer": type(engine.optimizer).__name__,
                    "losses": losses,
                    "params": {n: p.detach().float().numpy() for n, p in module.named_parameters()},
                    "updates": {n: end - before[n] for n, end in masters().items()},
                }
            )
    refused = {}
    for label, config in (
        ("fp16", {"fp16": {"enabled": True}}),
        ("immediate_grad_update", {"bf16": {"enabled": True, "immediate_grad_update": True}}),
    ):
        try:
            build("zb-h1", config=config)
        except ValueError as error:
            refused[label] = str(error)
    results.append(refused)
    return results


# bf16 keeps 8 significant bits: neighbouring values are at most 2^-7 of their size
# apart. zbv holds the tied embedding and LM head in one module, so their gradients
# are added in another order than DeepSpeed's (two copies, all-reduced); with bf16
# accumulation a parameter may then round to a neighbouring bf16 value (measured:
# 5.6e-3 of the largest weight, one step; every other case bitwise).
BF16_STEP = 2.0**-7
# The optimizer's fp32 update (after - before) is compared with DeepSpeed's relative to
# its own size, which keeps its margin however small a step is beside the weights
# (measured: 1.8e-2 for zbv, whose gradients are rounded in another order, 0 otherwise;
# a skipped update gives 1, and moves the weights by 0.34 of the largest and the losses
# by 1.5e-2). The losses are bitwise equal in every case (measured): held to 1e-4.
BF16_UPDATE, BF16_LOSS = 5e-2, 1e-4


def relative_diff(mine, theirs) -> float:
    """Largest difference relative to the largest magnitude of ``theirs``."""
    import numpy as np

    mine, theirs = np.asarray(mine), np.asarray(theirs)
    return float(
        np.max(np.abs(mine - theirs)) / max(np.max(np.abs(theirs)), np.finfo(np.float32).tiny)
    )


@pytest.mark.slow
def test_bf16_matches_deepspeed_engine():
    results_by_rank = launch(bf16_cases, 2)
    for results in results_by_rank:
        refused = results.pop()
        # fp16 stays refused on this CPU, with DeepSpeed's one clear error (the engine
        # refuses it on accelerators: it runs no loss scaling)
        assert refused["fp16"] == "Type fp16 is not supported on your device."
        # hooks that move bf16 gradients as autograd makes them miss the W pass's
        assert 'set "bf16": {"immediate_grad_update": false}' in refused["immediate_grad_update"]
    by = {(r["config"], r["schedule"]): r for r in results_by_rank[0]}
    params = {key: {} for key in by}  # each rank holds some of the parameters
    updates = {key: {} for key in by}
    for results in results_by_rank:
        for r in results:
            params[(r["config"], r["schedule"])].update(r["params"])
            updates[(r["config"], r["schedule"])].update(r["updates"])
    diffs = {"losses": [], "params": [], "updates": []}
    for label, (_, optimizer) in BF16_CONFIGS.items():
        baseline = by[(label, BASELINE)]
        for name in BF16_SCHEDULES:
            assert by[(label, name)]["optimizer"] == optimizer, (label, name)
        for name in BF16_SCHEDULES[1:]:
            mine, theirs = params[(label, name)], params[(label, BASELINE)]
            assert mine.keys() == theirs.keys()
            case = (label, optimizer, name)
            diffs["losses"].append(
                {
                    "case": case,
                    "diffs": {
                        "losses vs deepspeed-1f1b (relative)": max(
                            relative_diff(a, b)
                            for a, b in zip(
                                by[(label, name)]["losses"], baseline["losses"], strict=True
                            )
                        )
                    },
                }
            )
            diffs["params"].append(
                {
                    "case": case,
                    "diffs": {
                        "params vs deepspeed-1f1b (relative)": max(
                            relative_diff(mine[n], theirs[n]) for n in mine
                        )
                    },
                }
            )
            diffs["updates"].append(
                {
                    "case": case,
                    "diffs": {
                        "fp32 update vs deepspeed-1f1b's (relative)": max(
                            relative_diff(updates[(label, name)][n], updates[(label, BASELINE)][n])
                            for n in mine
                        )
                    },
                }
            )
    check([diffs["updates"]], BF16_UPDATE)
    check([diffs["params"]], BF16_STEP)
    check([diffs["losses"]], BF16_LOSS)
    # the same placement and, per parameter, the same order of operations as
    # DeepSpeed's TrainSchedule (zb-h1 only moves weight GEMMs later): bitwise
    check([[d for kind in diffs.values() for d in kind if d["case"][2] in ("1f1b", "zb-h1")]], 0.0)


# --------------------------------------------------------------------------- checkpoints


def checkpoint_cases(
    rank: int, world: int, root: str, cases: list[tuple[str, int | None]]
) -> list[dict]:
    results = []
    for name, chunks in cases:
        path = f"{root}/{name}-{chunks}"
        engine, module, _ = build(name, chunks=chunks)
        train(engine, range(2))
        engine.save_checkpoint(path, tag="step2")
        uninterrupted = train(engine, range(2, 4))
        # a fresh engine with other initial weights; loading must restore weights and momentum
        engine, fresh, _ = build(name, chunks=chunks, base_seed=99)
        engine.load_checkpoint(path, tag="step2")
        resumed = train(engine, range(2, 4))
        other = dict(fresh.named_parameters())
        diffs = {
            "losses after loading": loss_diff(resumed, uninterrupted),
            "params after loading": max(
                float((p - other[n]).detach().abs().max()) for n, p in module.named_parameters()
            ),
            "global steps": abs(engine.global_steps - 4),
        }
        results.append({"case": (name, chunks), "diffs": diffs})
    return results


@pytest.mark.slow
def test_checkpoint_round_trip_continues_training_exactly(tmp_path):
    check(
        launch(checkpoint_cases, 2, str(tmp_path), [("interleaved-1f1b", 2), ("zbv", None)]), EXACT
    )


# --------------------------------------------------------------------------- non-finite gradients


def nonfinite_cases(rank: int, world: int, cases: list[tuple[str, dict]]) -> list[dict]:
    """A step whose loss (so every gradient) is NaN changes no weight and is counted
    in ``skipped_steps``; training then goes on as if that step's data never came."""

    from pp_ext.testing.tiny import lm_loss

    results = []
    for name, config in cases:
        engine, module, specs = build(name, config=config)
        reference = Reference(specs, clip=config.get("gradient_clipping", 0.0))
        losses, ref_losses = train(engine, [0]), reference.train([0])
        before = [p.detach().clone() for p in module.parameters()]
        module.loss_fn = lambda logits, labels: lm_loss(logits, labels) * float("nan")
        skipped = engine.skipped_steps
        nan_loss = train(engine, [1])[0]
        module.loss_fn = lm_loss
        unchanged = max(
            float((a.float() - p.detach().float()).abs().max())
            for a, p in zip(before, module.parameters())
        )
        diffs = {
            "weights changed by the NaN step": unchanged,
            "NaN step not counted as skipped": float(engine.skipped_steps != skipped + 1),
            "NaN loss reported": float(nan_loss == nan_loss),
        }
        if "bf16" not in config:  # fp32: the next step equals a reference that never saw step 1
            losses += train(engine, [2])
            ref_losses += reference.train([2])
            diffs["losses"] = loss_diff(losses, ref_losses)
            diffs["params after"] = reference.param_diff(module)
        results.append({"case": (name, tuple(config)), "diffs": diffs})
    return results


@pytest.mark.slow
def test_nonfinite_gradients_skip_the_step():
    check(
        launch(
            nonfinite_cases,
            2,
            [
                ("1f1b", {}),
                ("zbv", {"gradient_clipping": 1.0}),
                ("zb-h1", {"bf16": {"enabled": True}}),
            ],
        ),
        EXACT,
    )
