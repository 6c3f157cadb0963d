"""HF Llama-like families as pipeline layers: chained layers reproduce HF logits.

Single process, no DeepSpeed group: each spec is built and the modules are called
in order, as one pipeline stage after another would; a TiedLayerSpec builds one
module used by the embedding and the head.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from pp_ext.engine.reference import SequentialReference
from pp_ext.hf import copy_hf_weights, layer_specs, supported

from hf_models import CONFIGS

TOL = 1e-5


def build(specs: list) -> SequentialReference:
    """The layers chained in one process, as one stage after another would run them
    (a tied embedding and head share one module)."""
    return SequentialReference(specs, loss_fn=None)


def pipeline(hf_model, config, attn_implementation: str = "sdpa"):
    chain = build(layer_specs(config, attn_implementation))
    copy_hf_weights(chain.layers, hf_model.state_dict())
    return chain


@pytest.fixture(scope="module", params=[(f, tied) for f in CONFIGS for tied in (True, False)],
                ids=lambda p: f"{p[0]}-{'tied' if p[1] else 'untied'}")
def models(request):
    family, tied = request.param
    torch.manual_seed(0)
    config = CONFIGS[family](tied)
    hf_model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().eval()
    assert (hf_model.lm_head.weight is hf_model.model.embed_tokens.weight) == tied
    if family == "qwen2":
        assert hf_model.model.layers[0].self_attn.q_proj.bias is not None
    if family == "qwen3":
        assert hasattr(hf_model.model.layers[0].self_attn, "q_norm")
    return hf_model, pipeline(hf_model, config)


def ids(batch: int = 2, length: int = 10) -> torch.Tensor:
    return torch.randint(1, 100, (batch, length), generator=torch.Generator().manual_seed(1))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@torch.no_grad()
def test_no_padding(models):
    hf_model, run = models
    x = ids()
    assert max_diff(run(x), hf_model(x).logits) <= TOL


@torch.no_grad()
@pytest.mark.parametrize("side", ["right", "left"])
def test_padding(models, side):
    hf_model, run = models
    x, mask = ids(), torch.ones(2, 10, dtype=torch.long)
    pad = slice(7, None) if side == "right" else slice(None, 3)
    mask[1, pad] = 0
    ours, theirs = run((x, mask)), hf_model(x, attention_mask=mask).logits
    real = mask.bool()
    assert max_diff(ours[real], theirs[real]) <= TOL


@torch.no_grad()
def test_packed_sequences(models):
    """Two documents in one row: positions restart, no mask; the second document must
    not see the first (checked against running it alone)."""
    hf_model, run = models
    x = ids(1, 10)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3]])
    ours = run((x, torch.ones_like(x), positions))
    # HF looks for packed documents only without a KV cache (training), hence use_cache=False
    assert max_diff(ours, hf_model(x, position_ids=positions, use_cache=False).logits) <= TOL
    assert max_diff(ours[:, 6:], hf_model(x[:, 6:]).logits) <= TOL


def test_hf_keys_cover_the_model(models):
    """Together the layers map every HF tensor (tied head: the embedding's only)."""
    hf_model, _ = models
    config = hf_model.config
    chain = build(layer_specs(config))
    keys = {k for m in chain.layers for k in m.hf_keys().values()}
    expected = set(hf_model.state_dict()) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    assert keys == expected


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
        assert max_diff(out[mask.bool()], hf_model(x, attention_mask=mask).logits[mask.bool()]) <= TOL


def test_only_tensors_cross_and_ints_stay_int():
    chain = build(layer_specs(CONFIGS["qwen3"](True)))
    out = chain.funcs[0](ids())
    for forward in chain.funcs[1:-2]:
        out = forward(out)
        assert isinstance(out, tuple) and all(torch.is_tensor(t) for t in out)
        assert out[0].is_floating_point() and out[1].dtype == out[2].dtype == torch.int64


def test_unsupported_architecture():
    with pytest.raises(ValueError, match="gpt2") as error:
        layer_specs(GPT2Config(n_layer=1))
    for model_type in supported():
        assert model_type in str(error.value)
    assert set(supported()) >= {"llama", "mistral", "qwen2", "qwen3"}


def test_copy_rejects_missing_keys(models):
    hf_model, _ = models
    chain = build(layer_specs(hf_model.config))
    state = dict(hf_model.state_dict())
    del state["model.norm.weight"]
    with pytest.raises(KeyError, match="model.norm.weight"):
        copy_hf_weights(chain.layers, state)
