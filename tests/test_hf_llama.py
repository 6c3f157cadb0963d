"""HF Llama-like families (Llama, Mistral, Qwen2/3, Gemma, Gemma2, Gemma3 text, Phi3;
the MoE families Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3) as pipeline layers: chained layers
reproduce HF logits (and the MoE models' router loss).

Single process, no DeepSpeed group: each spec is built and the modules are called
in order, as one pipeline stage after another would; a TiedLayerSpec builds one
module used by the embedding and the head.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hf_checks import (
    EFFECT,
    TOL,
    build,
    check_no_padding,
    check_packed_sequences,
    check_padding,
    ids,
    max_diff,
    pipeline,
)
from hf_models import ALL_CONFIGS, CONFIGS, reference_model
from transformers import AutoModelForCausalLM, BertConfig

from pp_ext.hf import copy_hf_weights, layer_specs, supported
from pp_ext.hf.common import FinalNorm, HFDecoderLayer
from pp_ext.hf.context import ChunkContext


@pytest.fixture(
    scope="module",
    params=[(f, tied) for f in ALL_CONFIGS for tied in (True, False)],
    ids=lambda p: f"{p[0]}-{'tied' if p[1] else 'untied'}",
)
def models(request):
    family, tied = request.param
    torch.manual_seed(0)
    config = ALL_CONFIGS[family](tied)
    hf_model = reference_model(config).eval()  # HF's default attention
    assert (
        hf_model.get_output_embeddings().weight is hf_model.get_input_embeddings().weight
    ) == tied
    if hasattr(hf_model, "model"):  # Llama-like (GPT-2 and GPT-NeoX details: test_hf_gpt.py)
        attn = hf_model.model.layers[0].self_attn
        if family == "qwen2":
            assert attn.q_proj.bias is not None
        if family in ("qwen3", "gemma3_text"):
            assert hasattr(attn, "q_norm")
        if family == "phi3":  # fused projections, rotary on half of each head
            assert hasattr(attn, "qkv_proj") and hasattr(
                hf_model.model.layers[0].mlp, "gate_up_proj"
            )
            assert 2 * hf_model.model.rotary_emb.inv_freq.numel() == attn.head_dim // 2
    run = pipeline(hf_model, config)
    # same attention as HF's default for the family (Gemma2: eager, sdpa cannot soft-cap)
    decoder = next(m for m in run.layers if isinstance(m, HFDecoderLayer))
    assert decoder.config._attn_implementation == hf_model.config._attn_implementation
    return hf_model, run


def test_no_padding(models):
    check_no_padding(*models)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding(models, side):
    check_padding(*models, side)


def test_packed_sequences(models):
    check_packed_sequences(*models)


def test_hf_keys_cover_the_model(models):
    """Together the layers map every HF tensor (tied head: the embedding's only)."""
    hf_model, _ = models
    config = hf_model.config
    chain = build(layer_specs(config))
    keys = {k for m in chain.layers for k in m.hf_keys().values()}
    expected = set(hf_model.state_dict()) - (
        {"lm_head.weight"} if config.tie_word_embeddings else set()
    )
    assert keys == expected


def _full(layers: int) -> list[str]:
    return ["full_attention"] * layers


# Config changes that each drop one family detail: run with HF's weights, the pipeline
# must then miss HF's logits by far more than TOL, so the tiny configs really exercise
# what test_no_padding & co. find reproduced.
ABLATIONS = {
    "gemma2 final softcap": ("gemma2", "final_logit_softcapping", None),
    "gemma2 attention softcap": ("gemma2", "attn_logit_softcapping", None),
    "gemma2 sliding layers": ("gemma2", "layer_types", _full(2)),
    "gemma3 final softcap": ("gemma3_text", "final_logit_softcapping", None),
    "gemma3 sliding layers": ("gemma3_text", "layer_types", _full(2)),
    "gemma3 global rope on local layers": ("gemma3_text", "rope_parameters", "full_attention"),
    "gemma3 local rope on global layers": ("gemma3_text", "rope_parameters", "sliding_attention"),
    "phi3 longrope": (
        "phi3",
        "rope_parameters",
        {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    ),
    "deepseek routed scaling": ("deepseek_v3", "routed_scaling_factor", 1.0),
    "deepseek top-k renormalised": ("deepseek_v3", "norm_topk_prob", False),
    "deepseek group-limited": ("deepseek_v3", "topk_group", 4),
    "deepseek interleaved rope": ("deepseek_v3", "rope_interleave", False),
    "deepseek yarn": (
        "deepseek_v3",
        "rope_parameters",
        {"rope_type": "default", "rope_theta": 1e4},
    ),
}


@torch.no_grad()
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("name", ABLATIONS)
def test_family_details_are_exercised(name, tied):
    family, field, value = ABLATIONS[name]
    torch.manual_seed(0)
    config = ALL_CONFIGS[family](tied)
    hf_model = reference_model(config).eval()
    ablated = copy.deepcopy(config)
    if field == "rope_parameters" and family == "gemma3_text":  # one layer type's rope for both
        value = {
            layer_type: copy.deepcopy(config.rope_parameters[value])
            for layer_type in config.rope_parameters
        }
    setattr(ablated, field, value)
    x = ids()
    assert max_diff(pipeline(hf_model, ablated)(x), hf_model(x).logits) > EFFECT


@torch.no_grad()
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_deepseek_router_bias_is_exercised(tied):
    """DeepSeek-V3's ``e_score_correction_bias`` (nonzero in the tiny model) changes which
    experts the router picks: with it zeroed the pipeline misses HF's logits."""
    torch.manual_seed(0)
    config = ALL_CONFIGS["deepseek_v3"](tied)
    hf_model = reference_model(config).eval()
    run, x = pipeline(hf_model, config), ids()
    biases = [b for n, b in run.named_buffers() if n.endswith("e_score_correction_bias")]
    assert len(biases) == 2 and all(b.abs().min() > 0 for b in biases)
    for bias in biases:
        bias.zero_()
    assert max_diff(run(x), hf_model(x).logits) > EFFECT


@torch.no_grad()
@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3_text"])
def test_gemma_embedding_is_scaled(family):
    """The first stage sends HF's scaled embeddings (sqrt(hidden_size)); without the
    scale the logits would miss HF's."""
    torch.manual_seed(0)
    config = CONFIGS[family](True)
    hf_model = AutoModelForCausalLM.from_config(config).eval()
    run, x = pipeline(hf_model, config), ids()
    hidden = run.funcs[0](x)[0]
    assert max_diff(hidden, hf_model.model.embed_tokens(x)) == 0.0
    assert max_diff(hidden, config.hidden_size**0.5 * hf_model.model.embed_tokens.weight[x]) <= TOL
    run.layers[0].embed_tokens.embed_scale.fill_(1.0)
    assert max_diff(run(x), hf_model(x).logits) > EFFECT


def test_attention_implementation_hf_refuses():
    """Gemma2 has no sdpa in HF (sdpa cannot soft-cap attention logits): asking for it is
    an error naming the fix, not silently different attention."""
    with pytest.raises(
        ValueError, match="gemma2 models do not support attn_implementation 'sdpa'.*use 'eager'"
    ):
        layer_specs(CONFIGS["gemma2"](True), "sdpa")
    with pytest.raises(ValueError, match="attn_implementation must be one of"):
        layer_specs(CONFIGS["llama"](True), "flex")


def test_bidirectional_gemma3_is_refused():
    config = CONFIGS["gemma3_text"](True)
    config.use_bidirectional_attention = True
    with pytest.raises(ValueError, match="use_bidirectional_attention=True .* set it to False"):
        layer_specs(config)


def test_attention_is_causal_without_attn_implementation():
    """A bare config (``_attn_implementation`` None) still gives causal layers, and the
    caller's config is left alone."""
    torch.manual_seed(0)
    config = CONFIGS["llama"](True)
    chain = build(layer_specs(config))
    assert config._attn_implementation is None
    hf_model = AutoModelForCausalLM.from_config(config).eval()
    copy_hf_weights(chain.layers, hf_model.state_dict())
    run = chain
    x = ids()
    with torch.no_grad():
        assert max_diff(run(x)[:, :5], run(x[:, :5])) <= TOL


def test_eager_matches_hf():
    torch.manual_seed(0)
    config = CONFIGS["mistral"](False)
    hf_model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    run = pipeline(hf_model, config, "eager")
    x, mask = ids(), torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        out = run((x, mask))
        assert (
            max_diff(out[mask.bool()], hf_model(x, attention_mask=mask).logits[mask.bool()]) <= TOL
        )


def test_ints_stay_int_and_the_context_is_handed_on():
    """Each layer hands on (hidden, positions, padding mask), and the decoder layers the
    one context the first of them built (a chunk's output drops it: test_hf_stage.py)."""
    chain = build(layer_specs(CONFIGS["qwen3"](True)))
    out = chain.funcs[0](ids())
    contexts = []
    for forward in chain.funcs[1:-2]:
        out = forward(out)
        hidden, positions, mask, *shared = out
        assert hidden.is_floating_point() and positions.dtype == mask.dtype == torch.int64
        assert len(shared) == 1 and isinstance(shared[0], ChunkContext)
        contexts.append(shared[0])
    assert len(contexts) == 2 and contexts[0] is contexts[1]


def test_unsupported_architecture():
    with pytest.raises(ValueError, match="'bert' \\(BertConfig\\)") as error:
        layer_specs(BertConfig(num_hidden_layers=1))
    for model_type in supported():
        assert model_type in str(error.value)
    assert set(supported()) >= {"llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox"}


def test_copy_rejects_missing_keys(models):
    hf_model, _ = models
    chain = build(layer_specs(hf_model.config))
    state = dict(hf_model.state_dict())
    norm_key = next(m for m in chain.layers if isinstance(m, FinalNorm)).hf_keys()["norm.weight"]
    del state[norm_key]
    with pytest.raises(KeyError, match=norm_key):
        copy_hf_weights(chain.layers, state)
