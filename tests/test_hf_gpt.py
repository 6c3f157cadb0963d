"""GPT-2 and GPT-NeoX details the shared HF tests (test_hf_llama.py, which also runs
both families) cannot see: each check fails if the pipeline dropped the detail."""

from __future__ import annotations

import copy

import pytest
import torch
from hf_checks import EFFECT, TOL, ids, max_diff, pipeline
from hf_models import CONFIGS
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D


def hf_and_pipeline(family: str, tied: bool, attn_implementation: str | None = None, **changes):
    torch.manual_seed(0)
    config = CONFIGS[family](tied)
    for field, value in changes.items():
        setattr(config, field, value)
    hf_model = AutoModelForCausalLM.from_config(
        config, attn_implementation=attn_implementation
    ).eval()
    return hf_model, pipeline(hf_model, config, attn_implementation)


def test_tiny_configs_have_the_details():
    gpt2, _ = hf_and_pipeline("gpt2", True)
    assert isinstance(gpt2.transformer.h[0].attn.c_attn, Conv1D)  # weights stored (in, out)
    for tied in (True, False):
        neox, _ = hf_and_pipeline("gpt_neox", tied)
        assert neox.gpt_neox.layers[0].use_parallel_residual == tied
        head_size = neox.config.hidden_size // neox.config.num_attention_heads
        assert 2 * neox.gpt_neox.rotary_emb.inv_freq.numel() == head_size // 2  # partial rotary


@torch.no_grad()
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_gpt2_learned_positions_follow_position_ids(tied):
    """Shifted positions read other rows of wpe: HF's logits move, and ours with them."""
    hf_model, run = hf_and_pipeline("gpt2", tied)
    x = ids()
    shifted = torch.arange(5, 15).expand(2, 10)
    theirs = hf_model(x, position_ids=shifted).logits
    assert max_diff(run((x, torch.ones_like(x), shifted)), theirs) <= TOL
    assert max_diff(run(x), theirs) > EFFECT


@torch.no_grad()
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_gpt2_attention_options(attn_implementation):
    """Per-layer attention scaling (by 1/(layer_idx+1)) and the upcast, reordered eager
    path run inside HF's GPT2Attention: each block must know its own layer index. (A
    larger init makes attention scores, and so their scaling, matter.)"""
    hf_model, run = hf_and_pipeline(
        "gpt2",
        False,
        attn_implementation,
        scale_attn_by_inverse_layer_idx=True,
        reorder_and_upcast_attn=True,
        initializer_range=0.5,
    )
    x, mask = ids(), torch.ones(2, 10, dtype=torch.long)
    mask[0, 7:] = 0
    real = mask.bool()
    assert max_diff(run((x, mask))[real], hf_model(x, attention_mask=mask).logits[real]) <= TOL
    unscaled = copy.deepcopy(hf_model.config)
    unscaled.scale_attn_by_inverse_layer_idx = False
    assert (
        max_diff(pipeline(hf_model, unscaled, attn_implementation)(x), hf_model(x).logits) > EFFECT
    )


@torch.no_grad()
@pytest.mark.parametrize("detail", ["residual", "partial rotary"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_neox_details_are_exercised(detail, tied):
    """Run with HF's weights, a pipeline built with the other residual (parallel <->
    sequential) or with rotary on whole heads misses HF's logits by far more than TOL."""
    hf_model, _ = hf_and_pipeline("gpt_neox", tied)
    changed = copy.deepcopy(hf_model.config)
    if detail == "residual":
        changed.use_parallel_residual = not changed.use_parallel_residual
    else:
        changed.rope_parameters = {**changed.rope_parameters, "partial_rotary_factor": 1.0}
    x = ids()
    assert max_diff(pipeline(hf_model, changed)(x), hf_model(x).logits) > EFFECT
