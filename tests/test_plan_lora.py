"""``pp-ext plan`` under a LoRA recipe (issue 23, item 6): per pipeline rank the frozen
base (its weights in the model's dtype, nothing else), the trainable parameters (the
adapters and ``modules_to_save``) with their gradients and optimizer state, and the
activations, so that the shipped 70B LoRA recipe shows it fits 8 x 80 GB and the same
model's full fine-tune does not. The expected counts come from peft's own
``get_peft_model`` and transformers' model, both on the meta device."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from hf_checks import hf_layer
from hf_models import CONFIGS
from peft import get_peft_model
from transformers import AutoConfig

from pp_ext.config.recipe import load
from pp_ext.hf import layer_specs
from pp_ext.hf.weights import meta_model
from pp_ext.peft import lora_config, planned_parameters
from pp_ext.planning.search import GIB

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes/llama-70b-lora-pipe8.yaml"
LLAMA_70B = f"model.path={ROOT / 'configs/models/llama-3.1-70b'}"
GPU = 80  # GiB of one GPU of the node the recipe is for


def peft_model(config, lora):
    with warnings.catch_warnings():
        # peft 0.21's PeftModel reads transformers' deprecated `is_gradient_checkpointing`
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
        return get_peft_model(meta_model(config), lora)


def section(recipe_file: Path, *overrides: str):
    return load(recipe_file, [LLAMA_70B, *overrides]).peft


@pytest.mark.parametrize("family", sorted(CONFIGS))
@pytest.mark.parametrize(
    "overrides",
    [
        ["peft.target_modules=all-linear", "peft.modules_to_save=[lm_head]"],
        ["peft.r=3", "peft.target_modules=.*(q_proj|v_proj|c_attn|query_key_value)"],
    ],
)
def test_trainable_parameters_are_peft_s_and_the_rest_frozen(family, overrides):
    """Summed over the pipeline layers: trainable = peft's get_nb_trainable_parameters,
    frozen = the HF model's parameters less those trained whole (peft trains a copy of
    them, pp-ext the module in place)."""
    config = CONFIGS[family](False)
    lora = section(RECIPE, *overrides)
    params = planned_parameters(layer_specs(config), lora, config)
    reference = peft_model(config, lora_config(lora, config))
    trainable, _ = reference.get_nb_trainable_parameters()
    whole = sum(p.numel() for p in meta_model(config).lm_head.parameters())
    hf = sum(p.numel() for p in meta_model(config).parameters())
    assert sum(t for _, t in params) == trainable
    assert sum(f for f, _ in params) == hf - (whole if lora.modules_to_save else 0)


@pytest.fixture(scope="module")
def plans():
    """The 70B recipe's plan, LoRA as shipped and the same with peft.type=none."""
    from pp_ext.commands.plan import plan_ranks
    from pp_ext.training.preflight import check_before_launch

    result = {}
    for kind in ("lora", "none"):
        recipe = load(RECIPE, [LLAMA_70B, f"peft.type={kind}"])
        layout = check_before_launch(recipe, 8)[0]
        result[kind] = recipe, layout, plan_ranks(recipe, layout)
    return result


def test_70b_lora_plan_per_rank(plans):
    from pp_ext.engine.module import partition
    from pp_ext.planning.partition import chunk_layout
    from pp_ext.schedules import Placement

    recipe, layout, (lines, ranks) = plans["lora"]
    config = AutoConfig.from_pretrained(recipe.model.path)
    reference = peft_model(config, lora_config(recipe.peft, config))
    trainable, _ = reference.get_nb_trainable_parameters()
    assert sum(rank.trainable for rank in ranks) == trainable == 207_093_760
    assert f"LoRA r=16 trains {trainable / 1e6:.1f} M" in lines[0]
    # base weights: transformers' parameters of the layers each rank holds, in bf16
    placement = Placement.named(layout.placement, layout.pipeline, layout.chunks)
    parts = partition(layer_specs(config), placement.stages, recipe.parallel.partition)
    per_layer = [0] * (config.num_hidden_layers + 3)
    for name, param in meta_model(config).named_parameters():
        per_layer[hf_layer(name, config.num_hidden_layers)] += param.numel()
    for index, rank in enumerate(ranks):
        held = [i for a, b in chunk_layout(placement, parts, index) for i in range(a, b)]
        assert rank.state.base == 2 * sum(per_layer[i] for i in held), index
        # the trainable ones alone have state: bf16 weight, bf16 + fp32 gradient, and the
        # fp32 master with AdamW's two moments on the one data rank
        assert (rank.state.trainable, rank.state.gradients, rank.state.optimizer) == (
            2 * rank.trainable,
            6 * rank.trainable,
            12 * rank.trainable,
        ), index


def test_70b_lora_fits_8_x_80_gb_and_its_full_fine_tune_does_not(plans, monkeypatch):
    import pp_ext.commands.plan as plan

    assert max(rank.total for rank in plans["lora"][2][1]) < GPU * GIB
    assert min(rank.total for rank in plans["none"][2][1]) > GPU * GIB
    monkeypatch.setattr(plan, "plan_ranks", lambda recipe, layout: plans[recipe.peft.type][2])
    lora = plan.describe(*plans["lora"][:2], memory_limit=GPU).splitlines()
    assert lora[-1].startswith(f"fits --memory-limit {GPU} GiB per rank: the largest, pipeline")
    assert len(lora) == 3 + 1 + 1 + 8 + 1  # header, blank line, table head, 8 ranks, verdict
    full = plan.describe(*plans["none"][:2], memory_limit=GPU).splitlines()
    assert full[-1].startswith(f"does not fit --memory-limit {GPU} GiB per rank: pipeline rank")
    assert "train LoRA adapters (peft.type=lora)" in full[-1]
