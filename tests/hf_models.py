"""Tiny random configs of every supported HF family, shared by the HF tests.

One entry per ``model_type``: ``CONFIGS[model_type](tied)`` gives a config small
enough for CPU tests, with tied or untied input/output embeddings.
"""

from __future__ import annotations

import torch
from transformers import (
    DeepseekV3Config,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    GptOssConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    OlmoeConfig,
    Phi3Config,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

SIZES = dict(
    vocab_size=100,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
GEMMA2_3 = dict(
    head_dim=8,
    query_pre_attn_scalar=8,
    sliding_window=4,
    final_logit_softcapping=2.0,
    initializer_range=0.2,
    layer_types=["sliding_attention", "full_attention"],
)
CONFIGS = {
    "llama": lambda tied: LlamaConfig(**SIZES, tie_word_embeddings=tied),
    "mistral": lambda tied: MistralConfig(**SIZES, sliding_window=4, tie_word_embeddings=tied),
    "qwen2": lambda tied: Qwen2Config(**SIZES, tie_word_embeddings=tied),  # Qwen2 has qkv bias
    "qwen3": lambda tied: Qwen3Config(**SIZES, head_dim=8, tie_word_embeddings=tied),
    "gemma": lambda tied: GemmaConfig(**SIZES, head_dim=8, tie_word_embeddings=tied),
    # Gemma2/3: a window of 4 on 10 tokens, caps and a larger init that make the soft-capping
    # bite; Gemma3 with local rope (base 100) apart from global rope (base 10000, linear x2).
    "gemma2": lambda tied: Gemma2Config(
        **SIZES, **GEMMA2_3, attn_logit_softcapping=2.0, tie_word_embeddings=tied
    ),
    "gemma3_text": lambda tied: Gemma3TextConfig(
        **SIZES,
        **GEMMA2_3,
        rope_theta=10000.0,
        rope_local_base_freq=100.0,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
        tie_word_embeddings=tied,
    ),
    # Phi3 with partial rotary and longrope past 8 positions (10-token inputs use the long factors).
    "phi3": lambda tied: Phi3Config(
        **SIZES,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        original_max_position_embeddings=8,
        rope_parameters={
            "rope_type": "longrope",
            "factor": 8.0,
            "partial_rotary_factor": 0.5,
            "short_factor": [1.0, 1.5],
            "long_factor": [2.0, 4.0],
        },
        tie_word_embeddings=tied,
    ),
    # GPT-2: Conv1D blocks and learned positions; dropout off (on by default) so that
    # training matches HF's exactly.
    "gpt2": lambda tied: GPT2Config(
        vocab_size=100,
        n_embd=32,
        n_inner=64,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=2,
        embd_pdrop=0.0,
        resid_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=tied,
    ),
    # GPT-NeoX: rotary on half of each head; the tied config has the parallel residual
    # (attention and MLP both read the layer input), the untied one the sequential one.
    "gpt_neox": lambda tied: GPTNeoXConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        rotary_pct=0.5,
        use_parallel_residual=tied,
        tie_word_embeddings=tied,
    ),
}

# The MoE families: 4 experts, top 2, the aux loss on (output_router_logits) with a large
# weight so that it moves the training; Qwen2-MoE with its gated shared expert and Qwen3-MoE
# with a dense first layer (mlp_only_layers), Mixtral with a sliding window of 4, Qwen3-MoE's
# and Qwen2-MoE's top-k probabilities renormalised, OLMoE's not. DeepSeek-V3: latent attention
# (query and key-value ranks, rotary and non-rotary head parts, interleaved YaRN rope past 8
# positions; a larger init, as Gemma2/3's, so that the rope details move the logits), one dense
# layer then two sparse ones with a shared expert, 8 experts in 4 groups of which 2 are searched
# for the top 3, scaled by 2.5; HF adds no router loss to it, whatever
# output_router_logits says (on here). Its e_score_correction_bias starts at zero in HF's
# initialisation: :func:`reference_model` makes it nonzero, as in a trained checkpoint.
MOE = dict(num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.5)
MOE_CONFIGS = {
    "mixtral": lambda tied: MixtralConfig(
        **SIZES, **MOE, num_local_experts=4, sliding_window=4, tie_word_embeddings=tied
    ),
    "qwen2_moe": lambda tied: Qwen2MoeConfig(
        **SIZES,
        **MOE,
        num_experts=4,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        norm_topk_prob=True,
        tie_word_embeddings=tied,
    ),
    "qwen3_moe": lambda tied: Qwen3MoeConfig(
        **SIZES | {"num_hidden_layers": 3},
        **MOE,
        num_experts=4,
        moe_intermediate_size=16,
        head_dim=8,
        mlp_only_layers=[0],
        tie_word_embeddings=tied,
    ),
    "olmoe": lambda tied: OlmoeConfig(
        **SIZES, **MOE, num_experts=4, pad_token_id=0, eos_token_id=2, tie_word_embeddings=tied
    ),
    "deepseek_v3": lambda tied: DeepseekV3Config(
        **SIZES | {"num_hidden_layers": 3, "num_key_value_heads": 4},
        output_router_logits=True,
        moe_intermediate_size=16,
        n_routed_experts=8,
        n_shared_experts=1,
        n_group=4,
        topk_group=2,
        num_experts_per_tok=3,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
        q_lora_rank=16,
        kv_lora_rank=8,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=6,
        initializer_range=0.2,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "original_max_position_embeddings": 8,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        tie_word_embeddings=tied,
    ),
    "gpt_oss": lambda tied: GptOssConfig(
        **SIZES,
        **MOE,
        num_local_experts=4,
        head_dim=8,
        sliding_window=4,
        initializer_range=0.2,
        swiglu_limit=1.0,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 8,
        },
        tie_word_embeddings=tied,
    ),
}
ALL_CONFIGS = CONFIGS | MOE_CONFIGS


EXPERT_BIASES = ("experts.gate_up_proj_bias", "experts.down_proj_bias")  # gpt-oss's


@torch.no_grad()
def draw_expert_biases(model, std: float) -> None:
    """gpt-oss's expert biases, which HF initialises to zeros, drawn N(0, std) from torch's
    generator, so that they count."""
    for name, param in model.named_parameters():
        if name.endswith(EXPERT_BIASES):
            param.normal_(0.0, std)


def reference_model(config):
    """transformers' model of ``config`` in float32, with HF's initialisation, except that
    DeepSeek-V3's routers get a nonzero ``e_score_correction_bias`` (HF starts it at zero,
    and a zero bias would leave the expert choice's bias term untested): N(0, 0.05), a
    quarter of the tiny routers' score spread (enough to change their picks:
    test_hf_llama's test_deepseek_router_bias_is_exercised), seeded apart from the weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config).float()
    biases = [b for name, b in model.named_buffers() if name.endswith("e_score_correction_bias")]
    generator = torch.Generator().manual_seed(7)
    for bias in biases:
        bias.copy_(0.05 * torch.randn(bias.shape, generator=generator))
    return model
