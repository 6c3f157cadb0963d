"""DeepSeek-V3's auxiliary-loss-free bias update (issue 24 item 2; pp_ext/moe/bias_update.py)
against transformers' DeepseekV3ForCausalLM trained in one process by a hand-written loop.

The reference counts each router's top-k picks from the ``topk_indices`` HF's router
returns (a forward hook on ``DeepseekV3TopkRouter``) over every micro-batch of every data
rank, takes the SGD step (tensor_cases.reference_step), then moves each bias by
``GAMMA * sign(mean(load) - load)`` in floats. pp-ext trains the same micro-batches at
pipeline 2 (1f1b; zb-h1 with activation checkpointing, whose recompute must not count
again; interleaved-1f1b, two chunks per rank) and at pipeline 1 x data 2 (the counts summed
over the data ranks). Over 3 steps each equals the reference: the losses and every
parameter within 1e-5, the biases within 1e-6 (float32), and each step's per-layer loads
exactly. GAMMA is 10x the paper's so that the update changes the routers' picks within
the steps (a check that they do: the final biases move the picks of the reference's
last batch); an evaluation after training counts nothing. The second test runs the
training job: its bias update, checkpoints, resume and export."""

from __future__ import annotations

import pytest
import torch
from hf_models import MOE_CONFIGS, reference_model
from tensor_cases import MICRO_BATCHES, TOLERANCE, batch, params_vs, pipeline_engine, reference_step

STEPS = 3
GAMMA = 0.01
BIAS_TOLERANCE = 1e-6

# (layout (pipe, tensor, data), schedule, activation checkpoint interval)
CASES = [
    ((2, 1, 1), "1f1b", 0),
    ((2, 1, 1), "zb-h1", 1),
    ((2, 1, 1), "interleaved-1f1b", 1),
    ((1, 1, 2), "1f1b", 0),
]


def hf_training(model, data: int) -> tuple[list[float], list[dict[str, list[int]]]]:
    """transformers' model trained ``STEPS`` steps with the bias update written out: the
    losses and each step's loads by router name."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    routers = {n: m for n, m in model.named_modules() if isinstance(m, DeepseekV3TopkRouter)}
    counts = {n: torch.zeros(r.e_score_correction_bias.numel()) for n, r in routers.items()}

    def counter(name):
        def hook(module, args, output):
            for expert in output[2].reshape(-1).tolist():  # topk_indices
                counts[name][expert] += 1

        return hook

    for name, router in routers.items():
        router.register_forward_hook(counter(name))
    losses, loads = [], []
    for step in range(STEPS):
        for c in counts.values():
            c.zero_()
        losses.append(reference_step(model, step, data)[0])
        with torch.no_grad():
            for name, router in routers.items():
                load = counts[name]
                router.e_score_correction_bias += GAMMA * torch.sign(load.mean() - load)
        loads.append({n: [int(x) for x in c.tolist()] for n, c in counts.items()})
    return losses, loads


def picks(model, step: int) -> list[list[int]]:
    """The experts each router picks for the first micro-batch of ``step``."""
    chosen: list[list[int]] = []
    hooks = [
        m.register_forward_hook(lambda m, a, out: chosen.append(out[2].sort(-1)[0].tolist()))
        for m in model.modules()
        if hasattr(m, "e_score_correction_bias")
    ]
    with torch.no_grad():
        model(input_ids=batch(step, 0)[0], use_cache=False)
    for h in hooks:
        h.remove()
    return chosen


def run_case(tmp: str, case) -> dict:
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from pp_ext.hf.loading import local_layers
    from pp_ext.hf.weights import hf_keys
    from pp_ext.moe.bias_update import BIAS, BiasUpdate

    layout, schedule, interval = case
    folder = f"{tmp}/{'x'.join(map(str, layout))}-{schedule}-{interval}"
    torch.manual_seed(0)
    initial = reference_model(MOE_CONFIGS["deepseek_v3"](False))
    if dist.get_rank() == 0:
        initial.save_pretrained(f"{folder}/hf")
    dist.barrier()
    engine = pipeline_engine(f"{folder}/hf", layout, schedule, checkpoint_interval=interval)
    module, data = engine.module, layout[2]
    update = BiasUpdate(module, GAMMA, engine.grid.get_data_parallel_group())
    names = {}  # router -> its HF name
    for layer in local_layers(module):
        for local, key in hf_keys(layer).items():
            if local.endswith(BIAS):
                names[id(layer.get_submodule(local.rpartition(".")[0]))] = key.rpartition(".")[0]
    router_names = [names[id(r)] for r in update.routers]
    calls = [0]  # every router forward, recomputes included
    for router in update.routers:
        router.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    dp = engine.grid.get_data_parallel_rank()
    losses, loads = [], []
    for step in range(STEPS):
        data_iter = iter([batch(step, dp * MICRO_BATCHES + k) for k in range(MICRO_BATCHES)])
        losses.append(float(engine.train_batch(data_iter)))
        loads.append(dict(zip(router_names, update.step().tolist())))

    # forwards per router and micro-batch: 2 where activation checkpointing recomputes
    runs = calls[0] / (STEPS * MICRO_BATCHES * len(router_names)) if router_names else None
    # evaluation routes tokens too, but counts none
    engine.eval_batch(iter([batch(STEPS, dp * MICRO_BATCHES + k) for k in range(MICRO_BATCHES)]))
    eval_counts = sum(int(c.sum()) for c in update.counts)

    model = AutoModelForCausalLM.from_pretrained(f"{folder}/hf")
    before = picks(model, STEPS - 1)
    ref_losses, ref_loads = hf_training(model, data)
    reference = model.state_dict()
    bias_diff = (
        max(
            float((buffer - reference[hf_keys(layer)[local]]).abs().max())
            for layer in local_layers(module)
            for local, buffer in layer.named_buffers()
            if local.endswith(BIAS)
        )
        if router_names
        else 0.0
    )
    return {
        "case": case,
        "loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses)),
        "param_diff": params_vs(module, model),
        "bias_diff": bias_diff,
        "routers": router_names,
        "loads": loads,
        "ref_loads": [{n: step[n] for n in router_names} for step in ref_loads],
        "eval_counts": eval_counts,
        "picks_moved": picks(model, STEPS - 1) != before,
        "runs": runs,
    }


def run_cases(rank: int, world: int, tmp: str, cases: list) -> list[dict]:
    return [run_case(tmp, case) for case in cases]


@pytest.mark.slow
def test_bias_update_equals_hf_training_with_the_update(tmp_path):
    from pp_ext.testing.spawn import spawn

    ranks = spawn(run_cases, 2, str(tmp_path), CASES, timeout=900)
    for case, results in zip(CASES, zip(*ranks)):
        # both MoE layers (1 and 2) are updated somewhere, each on the ranks of one stage
        assert {n for r in results for n in r["routers"]} == {
            "model.layers.1.mlp.gate",
            "model.layers.2.mlp.gate",
        }, case
        assert all(r["picks_moved"] for r in results), case
        for r in results:
            assert r["runs"] in (None, 2 if case[2] else 1), r
            assert r["loads"] == r["ref_loads"], r
            assert r["eval_counts"] == 0, r
            assert r["loss_diff"] <= TOLERANCE, r
            assert r["param_diff"] <= TOLERANCE, r
            assert r["bias_diff"] <= BIAS_TOLERANCE, r


# the job's runs: pipeline 2, 1f1b with activation checkpointing, a checkpoint every step
JOB = [
    "model.tokenizer=configs/models/quickstart",
    f"moe.bias_update_speed={GAMMA}",
    "parallel.schedule=1f1b",
    "model.activation_checkpoint_interval=1",
    "checkpoint.interval=1",
]


def biases(folder) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    return {k: v for k, v in model.state_dict().items() if k.endswith("e_score_correction_bias")}


@pytest.mark.slow
def test_the_job_updates_saves_resumes_and_exports_the_bias(tmp_path):
    """The training job with moe.bias_update_speed on the tiny DeepSeek-V3 (its vocabulary
    widened to the quickstart tokenizer's): 3 steps whole, and 2 steps then resumed from
    the step-2 checkpoint to 3, give the same step-3 loss and the same exported biases
    (from_pretrained loads them), each moved from the loaded one by a whole number of
    GAMMA steps, at most 3; metrics.jsonl reports each step's max load / mean load."""
    import json

    from train_cases import train_cases

    from pp_ext.testing.spawn import spawn

    config = MOE_CONFIGS["deepseek_v3"](False)
    config.vocab_size = 128
    torch.manual_seed(0)
    reference_model(config).save_pretrained(tmp_path / "model")
    job = [f"model.path={tmp_path / 'model'}", *JOB]
    cases = [("whole", job), ("part", [*job, "train.steps=2"]), ("part:resumed", job)]
    results = spawn(train_cases, 2, str(tmp_path), cases, timeout=600)[0]
    assert all(code == 0 for code, _ in results.values()), results
    assert abs(results["whole"][1][3] - results["part:resumed"][1][3]) <= TOLERANCE, results
    loaded, whole, resumed = (biases(tmp_path / d) for d in ("model", "whole/hf", "part/hf"))
    assert len(whole) == 2 and all(torch.equal(whole[k], resumed[k]) for k in whole)
    for key, bias in whole.items():
        moves = (bias - loaded[key]) / GAMMA
        assert (moves - moves.round()).abs().max() < 1e-3 and moves.round().abs().max() <= 3, moves
        assert moves.abs().max() >= 1, key  # the update ran
    entries = [
        json.loads(line) for line in (tmp_path / "whole/metrics.jsonl").read_text().splitlines()
    ]
    imbalance = [e["moe_max_imbalance"] for e in entries if "loss" in e]
    assert len(imbalance) == 3 and all(1 <= x <= 8 for x in imbalance), imbalance
