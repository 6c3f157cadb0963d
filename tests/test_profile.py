"""Balanced partitioning (pure) and the profiler (one 2-rank launch on the bench model
with a heavy head: balanced beats 'parameters' in simulation on the measured costs)."""

import dataclasses
import itertools
import json

import pytest

from pp_ext.bench.pipeline import BenchOptions, profile_tiny
from pp_ext.engine.module import partition
from pp_ext.planning.partition import balanced_parts
from pp_ext.schedules import build, simulate
from pp_ext.schedules.auto import auto_schedule
from pp_ext.schedules.cost_model import LayerCost, Profile


def brute_force_max(costs, stages):
    n = len(costs)
    best = None
    for cuts in itertools.combinations(range(1, n), stages - 1):
        parts = [0, *cuts, n]
        worst = max(sum(costs[a:b]) for a, b in zip(parts, parts[1:]))
        best = worst if best is None else min(best, worst)
    return best


def test_balanced_parts_minimises_the_slowest_stage():
    cases = [
        ([1, 1, 1, 1], 2),
        ([1, 4, 4, 4, 4, 9], 2),
        ([5, 1, 1, 1, 1, 1, 1, 8], 3),
        ([3, 2, 2, 2, 2, 7], 4),
        ([1] * 7, 7),
        ([2.5, 0.1, 0.1, 3.0, 0.2], 2),
    ]
    for costs, stages in cases:
        parts = balanced_parts(costs, stages)
        assert parts[0] == 0 and parts[-1] == len(costs) and len(parts) == stages + 1
        assert all(b > a for a, b in zip(parts, parts[1:]))
        assert max(sum(costs[a:b]) for a, b in zip(parts, parts[1:])) == brute_force_max(
            costs, stages
        )
    # a heavy head gets a stage of few layers: uneven first and last stages
    assert balanced_parts([1, 2, 2, 2, 2, 2, 2, 5], 2) == [0, 5, 8]


def test_balanced_needs_a_matching_profile(tmp_path):
    layers = [None] * 4
    with pytest.raises(
        ValueError, match="needs measured layer costs: give 'balanced:PROFILE.json'"
    ):
        partition(layers, 2, "balanced")
    with pytest.raises(ValueError, match="does not exist: write one with pp-ext tune"):
        partition(layers, 2, f"balanced:{tmp_path / 'none.json'}")
    profile = Profile(tuple(LayerCost("L", 1.0, 0.5, 0.4, 0.9, 10) for _ in range(3)), 0.0, 1, 8)
    path = profile.save(tmp_path / "p.json")
    with pytest.raises(ValueError, match="measures 3 layers, the model has 4"):
        partition(layers, 2, f"balanced:{path}")
    assert Profile.load(path) == profile
    assert partition(layers[:3], 2, f"balanced:{path}") in ([0, 1, 3], [0, 2, 3])


def test_the_replica_sum_is_priced_per_cut_from_the_all_reduce_fit(tmp_path):
    """Chimera's rank i sums stages i and p-1-i with its partner: the slowest pair's
    latency + bytes / bandwidth; a profile written before these fields prices it at 0."""
    weights = [100, 300, 500, 700, 900, 1100]
    layers = tuple(LayerCost("L", 1.0, 0.5, 0.4, 0.9, 10, w) for w in weights)
    profile = Profile(layers, 0.1, 1, 8, allreduce_latency=0.002, allreduce_bandwidth=1000.0)
    two = profile.stage_costs([0, 3, 6])  # stages of 900 and 2700 bytes: both ranks hold both
    assert two.replica_reduce == pytest.approx(0.002 + 3.6)
    four = profile.stage_costs([0, 1, 2, 4, 6])  # 100, 300, 1200, 2000: pairs (0, 3) and (1, 2)
    assert four.replica_reduce == pytest.approx(0.002 + 2.1)
    sim = {
        name: simulate(build(name, 4, 8, 2 if name == "chimera" else 1), four)
        for name in ("chimera", "1f1b")
    }
    unpriced = dataclasses.replace(four, replica_reduce=0)
    assert (
        sim["chimera"].makespan
        == simulate(build("chimera", 4, 8, 2), unpriced).makespan + four.replica_reduce
    )
    assert sim["1f1b"].makespan == simulate(build("1f1b", 4, 8), unpriced).makespan
    old = json.loads(profile.save(tmp_path / "p.json").read_text())
    for key in ("allreduce_latency", "allreduce_bandwidth"):
        del old[key]
    for layer in old["layers"]:
        del layer["parameter_bytes"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert Profile.load(tmp_path / "old.json").stage_costs([0, 3, 6]).replica_reduce == 0
    unmeasurable = dataclasses.replace(profile, allreduce_bandwidth=float("inf"))
    assert (
        Profile.load(unmeasurable.save(tmp_path / "inf.json")) == unmeasurable
    )  # null in the file


@pytest.mark.slow  # profiles on 2 spawned ranks and times the passes
def test_profile_of_a_heavy_head_and_balanced_stages(tmp_path):
    options = BenchOptions(
        stages=2,
        micro_batches=4,
        hidden=128,
        heads=2,
        intermediate=352,
        vocab=16384,
        blocks_per_rank=2,
        seq=64,
        micro_batch_size=2,
        cost_repeats=5,
    )
    profile = profile_tiny(options)
    names = [layer.name for layer in profile.layers]
    assert names[0] == "Embedding" and names[-1] != "Block" and names.count("Block") == 4
    assert all(
        layer.forward > 0 and layer.input_grad > 0 and layer.backward > 0
        for layer in profile.layers
    )
    assert all(layer.activation_bytes > 0 for layer in profile.layers[1:]) and profile.comm > 0
    head = profile.layers[-1]
    assert head.forward + head.backward > max(x.forward + x.backward for x in profile.layers[1:-2])
    assert profile.allreduce_latency > 0 and profile.allreduce_bandwidth > 0
    # the embedding and head hold vocab x hidden floats each, a norm hidden of them
    assert (
        profile.layers[0].parameter_bytes == 16384 * 128 * 4
        and profile.layers[-1].parameter_bytes > 0
    )
    saved = Profile.load(profile.save(tmp_path / "profile.json"))
    assert saved == profile

    from pp_ext.bench.pipeline import tiny_config
    from pp_ext.engine.module import layer_param_counts
    from pp_ext.testing.tiny import layer_specs

    layers = layer_specs(tiny_config(options))
    by_params = partition(layers, 2, "parameters")
    balanced = partition(layers, 2, f"balanced:{tmp_path / 'profile.json'}")
    assert len(layer_param_counts(layers)) == len(profile.layers)
    results = {}
    for name, parts in (("parameters", by_params), ("balanced", balanced)):
        costs = profile.stage_costs(parts)
        results[name] = {s: simulate(build(s, 2, 4), costs).makespan for s in ("1f1b", "zb-h1")}
        results[name]["auto"] = simulate(auto_schedule(2, 4, costs), costs).makespan
    print("parts", by_params, balanced, "simulated step s", results)
    assert all(results["balanced"][s] <= results["parameters"][s] for s in results["balanced"])
    assert results["balanced"]["auto"] <= results["balanced"]["zb-h1"]


def test_bench_refuses_an_unknown_partition_before_launching(capsys):
    from pp_ext.cli import main

    assert main(["bench", "--schedules", "1f1b", "--partitions", "balanced,sizes"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        err[-1].startswith("pp-ext: error: partition_method must be") and "got 'sizes'" in err[-1]
    )


@pytest.mark.slow
def test_bench_times_auto_from_measured_costs_on_each_partition(capsys):
    import json

    from pp_ext.cli import main

    code = main(
        [
            "bench",
            "--schedules",
            "zb-h1,auto",
            "--partitions",
            "parameters,balanced",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--auto-trials",
            "0",
            "--hidden",
            "64",
            "--seq",
            "16",
            "--micro-batch-size",
            "2",
            "--vocab",
            "4096",
            "--json",
        ]
    )
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["schedule"], r["partition"]) for r in rows] == [
        (s, cut) for cut in ("parameters", "balanced") for s in ("deepspeed-1f1b", "zb-h1", "auto")
    ]
    # each row's costs are those of its own cut and layout, and auto is built from them (its loop
    # candidate from zb-h1's own costs): never longer than zb-h1 there (no trials: the simulated best)
    for cut in ("parameters", "balanced"):
        by_name = {r["schedule"]: r for r in rows if r["partition"] == cut}
        assert (by_name["auto"]["chunks"], by_name["auto"]["placement"]) in ((1, "loop"), (2, "v"))
        assert (by_name["auto"]["costs"] == by_name["zb-h1"]["costs"]) == (
            by_name["auto"]["chunks"] == 1
        )
        assert by_name["auto"]["predicted_step_s"] <= by_name["zb-h1"]["predicted_step_s"]
    assert rows[0]["costs"] != rows[3]["costs"]


@pytest.mark.parametrize(
    "available,count,ranks", [(False, 0, 2), (True, 1, 1), (True, 2, 2), (True, 8, 2)]
)
def test_a_recipe_profile_takes_one_rank_where_one_gpu_is_visible(
    monkeypatch, available, count, ranks
):
    """NCCL takes one rank per GPU: with one GPU the profiler runs alone on it."""
    import torch

    from pp_ext.bench.profiler import profile_ranks

    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    assert profile_ranks() == ranks


def test_the_schedule_bench_says_what_one_gpu_cannot_run(monkeypatch, capsys):
    import torch

    from pp_ext.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["bench", "--stages", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--stages 2 starts 2 local ranks, one GPU each" in err
    assert "bench one GPU with --model DIR" in err


def lora_trainable_bytes(model_path, lora) -> list[int]:
    """fp32 bytes of the trainable parameters of each decoder block of peft's own
    ``get_peft_model`` on the meta model (the quickstart's: 4 blocks)."""
    import warnings

    from peft import get_peft_model
    from transformers import AutoConfig

    from pp_ext.hf.weights import meta_model

    with warnings.catch_warnings():
        # peft 0.21's PeftModel reads transformers' deprecated `is_gradient_checkpointing`
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
        model = get_peft_model(meta_model(AutoConfig.from_pretrained(model_path)), lora)
    per_block = [0] * 4
    for name, param in model.named_parameters():
        if param.requires_grad:
            per_block[int(name.split(".layers.")[1].split(".")[0])] += 4 * param.numel()
    return per_block


@pytest.mark.slow
def test_a_one_rank_profile_measures_the_layers_and_prices_p2p_at_zero(tmp_path):
    """What a one-GPU machine runs (here on the CPU): every layer measured, no peer for
    p2p and the all-reduce, priced at 0 (the file keeps it through a save and load).
    The recipe trains LoRA adapters: the profile measures the model as training runs it,
    adapters on and the base frozen, so only the adapters count as parameter bytes (the
    replica sum's), and a frozen embedding saves nothing for backward."""
    from pathlib import Path

    from pp_ext.bench.profiler import profile_recipe
    from pp_ext.config.recipe import load
    from pp_ext.peft import lora_config

    lora = ["peft.type=lora", "peft.r=4", "peft.target_modules=[q_proj,v_proj,down_proj]"]
    recipe = load(Path(__file__).resolve().parent.parent / "recipes/quickstart.yaml", lora)
    profile = profile_recipe(recipe, (2,), repeats=1, ranks=1)[2]
    assert len(profile.layers) == 7 and all(
        layer.forward > 0 and layer.backward > 0 for layer in profile.layers[1:]
    )
    from transformers import AutoConfig

    expected = lora_trainable_bytes(
        recipe.model.path, lora_config(recipe.peft, AutoConfig.from_pretrained(recipe.model.path))
    )
    assert [layer.parameter_bytes for layer in profile.layers] == [0, *expected, 0, 0]
    assert profile.layers[0].activation_bytes == 0  # ids in, a frozen weight: nothing saved
    assert (profile.comm, profile.allreduce_latency, profile.allreduce_bandwidth) == (
        0.0,
        0.0,
        float("inf"),
    )
    again = Profile.load(profile.save(tmp_path / "profile.json"))
    assert again == profile
