"""``pp-ext plan`` on mixture-of-experts models (issue 24, item 6): per pipeline rank its
MoE layers, the routed experts of each it holds (``num_experts / E`` under expert
parallelism over E ranks), their parameters and bytes beside the dense ones. The
expected counts are transformers' own model of the same config, built on the meta
device, its parameters sorted by name (``mlp.experts.*`` routed, ``mlp.shared_expert*``
shared), never pp-ext's counting."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hf_checks import hf_layer
from hf_models import MOE_CONFIGS
from recipe_cases import MINIMAL, one_line_error
from transformers import AutoConfig, AutoModelForCausalLM

from pp_ext.config.recipe import load
from pp_ext.planning.search import GIB

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes/qwen3-30b-a3b-pipe4-expert2.yaml"
QWEN3_30B = f"model.path={ROOT / 'configs/models/qwen3-30b-a3b'}"
BF16 = ["model.dtype=bfloat16", "deepspeed.bases=[zero1-bf16]"]


def hf_counts(config) -> tuple[list[int], list[int], list[int]]:
    """(all, routed, shared) parameters of each pipeline layer of transformers' model."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = config.num_hidden_layers + 3
    counts: tuple[list[int], list[int], list[int]] = ([0] * layers, [0] * layers, [0] * layers)
    for name, param in model.named_parameters():
        index = hf_layer(name, config.num_hidden_layers)
        counts[0][index] += param.numel()
        counts[1][index] += param.numel() * (".mlp.experts." in name)
        counts[2][index] += param.numel() * (".mlp.shared_expert" in name)
    return counts


def held_layers(recipe, layout, config) -> list[list[int]]:
    """The pipeline layers each pipeline rank holds, by the recipe's partition."""
    from pp_ext.engine.module import partition
    from pp_ext.hf import layer_specs
    from pp_ext.planning.partition import chunk_layout
    from pp_ext.schedules import Placement

    placement = Placement.named(layout.placement, layout.pipeline, layout.chunks)
    parts = partition(layer_specs(config), placement.stages, recipe.parallel.partition)
    return [
        [i for a, b in chunk_layout(placement, parts, rank) for i in range(a, b)]
        for rank in range(layout.pipeline)
    ]


def check_ranks(recipe, layout, ranks, expert: int) -> None:
    """Each rank's experts and bytes against transformers' counts, at bf16 + ZeRO-1 with
    fp32 accumulation: per routed parameter a rank holds (1/E of its layers'), 2 bytes of
    weight, 2 + 4 of gradient and 12 of fp32 master and AdamW moments split over the
    data / E expert-data ranks; the dense ones as before, over all data ranks."""
    config = AutoConfig.from_pretrained(recipe.model.path)
    total, routed, shared = hf_counts(config)
    # transformers' own keys, not pp-ext's table of them
    experts_key = {"mixtral": "num_local_experts", "gpt_oss": "num_local_experts"}.get(
        config.model_type,
        "n_routed_experts" if config.model_type == "deepseek_v3" else "num_experts",
    )
    expert_data = layout.data // expert
    assert sum(rank.moe.params for rank in ranks) * expert == sum(routed)
    for index, (rank, held) in enumerate(zip(ranks, held_layers(recipe, layout, config))):
        mine, dense = (
            sum(routed[i] for i in held) // expert,
            sum(total[i] - routed[i] for i in held),
        )
        moe = rank.moe
        assert moe.layers == sum(1 for i in held if routed[i]), index
        assert moe.experts == getattr(config, experts_key) // expert, index
        assert (moe.params, moe.shared) == (mine, sum(shared[i] for i in held)), index
        assert (moe.state.base, moe.state.trainable, moe.state.gradients) == (0, 2 * mine, 6 * mine)
        assert moe.state.optimizer == pytest.approx(12 * mine / expert_data), index
        assert (rank.frozen, rank.trainable) == (0, dense), index
        assert rank.state.optimizer == pytest.approx(12 * dense / layout.data), index


@pytest.mark.parametrize("family", sorted(MOE_CONFIGS))
@pytest.mark.parametrize("expert", [1, 2, 4])
def test_experts_per_rank_are_transformers_counts(tmp_path, family, expert):
    """Every MoE family (4 experts; Qwen2-MoE's shared expert, Qwen3-MoE's dense first
    layer), pipeline 2 x data 4, experts over 1, 2 and 4 ranks."""
    from pp_ext.commands.plan import describe, plan_ranks
    from pp_ext.training.preflight import check_before_launch

    MOE_CONFIGS[family](False).save_pretrained(tmp_path / "model")
    (tmp_path / "recipe.yaml").write_text(MINIMAL)
    overrides = [f"model.path={tmp_path / 'model'}", f"parallel.expert={expert}", *BF16]
    recipe = load(tmp_path / "recipe.yaml", overrides)
    layout = check_before_launch(recipe, 8)[0]
    _, ranks = plan_ranks(recipe, layout)
    check_ranks(recipe, layout, ranks, expert)
    text = describe(recipe, layout)
    assert f"experts over {expert} rank" in text and "expert params" in text


def test_expert_degree_must_divide_experts_and_data_ranks(tmp_path):
    from pp_ext.commands.plan import plan_ranks
    from pp_ext.training.preflight import check_before_launch

    MOE_CONFIGS["qwen3_moe"](False).save_pretrained(tmp_path / "model")
    (tmp_path / "recipe.yaml").write_text(MINIMAL)
    recipe = load(tmp_path / "recipe.yaml", [f"model.path={tmp_path / 'model'}"])
    layout = replace(check_before_launch(recipe, 8)[0], expert=8)  # past preflight's check
    assert one_line_error(plan_ranks, recipe, layout) == (
        "expert parallelism over 8 ranks must divide the 4 experts and the 4 data ranks"
    )


@pytest.fixture(scope="module")
def qwen3_30b():
    from pp_ext.training.preflight import check_before_launch

    recipe = load(RECIPE, [QWEN3_30B])
    return recipe, check_before_launch(recipe, 8)[0]


@pytest.mark.parametrize("expert", [1, 2])
def test_qwen3_30b_a3b_recipe_plan_per_rank(qwen3_30b, expert):
    """The shipped recipe, pipeline 4 x data 2: 12 MoE layers of 128 (E=1) or 64 (E=2)
    experts on each rank, 30.5 B parameters in all (Qwen's published total)."""
    from pp_ext.commands.plan import plan_ranks

    recipe, layout = qwen3_30b
    assert layout.expert == 2  # the recipe's
    layout = replace(layout, expert=expert)
    lines, ranks = plan_ranks(recipe, layout)
    assert "30532.1 M parameters" in lines[0]
    assert [rank.moe.layers for rank in ranks] == [12] * 4
    check_ranks(recipe, layout, ranks, expert)
    # halving the experts a rank holds halves their weights and gradients; their
    # optimizer state stays, split over half as many expert-data ranks
    assert max(rank.total for rank in ranks) / GIB > 80


def test_qwen3_30b_a3b_plan_command(capsys):
    from pp_ext.cli import main

    assert main(["plan", "--recipe", str(RECIPE), "--memory-limit", "80", QWEN3_30B]) == 0
    out = capsys.readouterr().out
    assert "48 MoE layers of 128 routed experts (8 per token)" in out
    assert "experts over 2 ranks of a stage: 64 per MoE layer on each" in out  # the recipe's E
    assert "expert w + g" in out
