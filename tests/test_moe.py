"""MoE families through the pipeline (issue 24, step 1), in one process against
transformers' own models: the training loss with the router loss (none for DeepSeek-V3,
whose HF model adds none), its gradients, the zero-bubble W pass holding the experts'
weight gradients, the router loss off, and the parts metrics.jsonl reports. Logits and router losses of chained and per-stage loaded
layers are test_hf_llama's and test_hf_loading's checks (every MoE family runs there);
2-stage training equal to HF's is test_hf_training's."""

from __future__ import annotations

import types

import pytest
import torch
from hf_checks import TOL, build, ids, max_diff
from hf_models import EXPERT_BIASES, MOE_CONFIGS, draw_expert_biases, reference_model

from pp_ext.autograd.split_backward import WeightGradStore, enable_split_backward
from pp_ext.hf import copy_hf_weights, layer_specs, router_loss_coef
from pp_ext.training.loss import LanguageModelLoss
from pp_ext.training.trainer import Trainer

FAMILIES = sorted(MOE_CONFIGS)
WITH_AUX_LOSS = [f for f in FAMILIES if f != "deepseek_v3"]
ROUTERS = ("mlp.gate.weight", "mlp.router.weight")  # gpt-oss's is mlp.router


def hf_and_chain(family: str, tied: bool = False, **changes):
    """HF's model (:func:`hf_models.reference_model`) and the chained layers with its weights;
    gpt-oss's expert biases, which HF initialises to zeros, drawn at random so that they count."""
    torch.manual_seed(0)
    config = MOE_CONFIGS[family](tied)
    for key, value in changes.items():
        setattr(config, key, value)
    hf = reference_model(config)
    draw_expert_biases(hf, config.initializer_range)
    chain = build(layer_specs(config))
    copy_hf_weights(chain.layers, hf.state_dict())
    return hf, chain, config


def shifted(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x[:, 1:], torch.full((x.size(0), 1), -100)], dim=1)


def grads(chain) -> dict[str, torch.Tensor]:
    """Each HF tensor's gradient in the chain (zeros where none came)."""
    return {
        hf: torch.zeros_like(param) if param.grad is None else param.grad
        for layer in chain.layers
        for local, hf in layer.hf_keys().items()
        for name, param in layer.named_parameters()
        if name == local
    }


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("split", [False, True], ids=["fused", "split"])
def test_training_loss_and_gradients_are_hfs(family, split):
    """LM loss + router_aux_loss_coef * aux, as HF's model computes it with labels, and
    every parameter's gradient HF's; split: the I pass leaves every expert's weight
    gradient to W (nothing in .grad), and W gives it; gpt-oss's expert biases get theirs
    in I."""
    hf, chain, config = hf_and_chain(family)
    x, mask = ids(), torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0
    unpadded = x.masked_fill(mask == 0, -100)
    theirs = hf(x, attention_mask=mask, labels=unpadded, use_cache=False)
    theirs.loss.backward()
    loss_fn = LanguageModelLoss(router_loss_coef(config))
    store = WeightGradStore()
    if split:
        assert enable_split_backward(chain, store) > 0
    with store.defer("mb"):
        ours = loss_fn(chain((x, mask)), shifted(unpadded))
        ours.backward()
    experts = [
        p
        for layer in chain.layers
        for n, p in layer.named_parameters()
        if n.endswith(("experts.gate_up_proj", "experts.down_proj"))
    ]
    assert experts and all((p.grad is None) == split for p in experts)
    biases = [
        p
        for layer in chain.layers
        for n, p in layer.named_parameters()
        if n.endswith(EXPERT_BIASES)
    ]
    assert (family == "gpt_oss") == bool(biases) and all(p.grad is not None for p in biases)
    store.run("mb")
    assert max_diff(ours, theirs.loss) <= TOL
    reference = {k: p.grad for k, p in hf.named_parameters() if p.grad is not None}
    ours_grads = grads(chain)
    assert reference.keys() <= ours_grads.keys()
    worst = max(max_diff(ours_grads[k], g) for k, g in reference.items())
    assert worst <= TOL, worst
    routers = [k for k in reference if k.endswith(ROUTERS)]
    assert routers and all(reference[k].abs().max() > 0 for k in routers)


@pytest.mark.parametrize("family", WITH_AUX_LOSS)
def test_router_loss_moves_the_router_gradients(family):
    """The tiny configs' router loss matters: without it HF's router gradients differ by far
    more than the tolerance (so the checks above and the 2-stage training see it)."""
    hf, _, _ = hf_and_chain(family)
    x = ids()
    hf(x, labels=x, use_cache=False).loss.backward()
    with_aux = {k: p.grad.clone() for k, p in hf.named_parameters() if k.endswith(ROUTERS)}
    hf.zero_grad()
    hf(x, labels=x, use_cache=False, output_router_logits=False).loss.backward()
    assert min(max_diff(g, hf.get_parameter(k).grad) for k, g in with_aux.items()) > 1e-3


def test_deepseek_hf_adds_no_router_loss_and_keeps_the_bias():
    """``DeepseekV3ForCausalLM``'s loss is the LM loss alone, even with
    ``output_router_logits`` on (the tiny config's), and an optimizer step leaves
    ``e_score_correction_bias`` where it was (a buffer: no gradient, no update). So
    pp-ext adds no router loss to it and sends the dense families' stream."""
    hf, chain, config = hf_and_chain("deepseek_v3")
    assert config.output_router_logits and router_loss_coef(config) is None
    x = ids()
    out = hf(x, labels=x, use_cache=False)
    assert (
        out.aux_loss is None
        and max_diff(out.loss, LanguageModelLoss()(out.logits, shifted(x))) == 0
    )
    biases = {k: b.clone() for k, b in hf.named_buffers() if k.endswith("e_score_correction_bias")}
    assert biases and not any(
        k.endswith("e_score_correction_bias") for k, _ in hf.named_parameters()
    )
    out.loss.backward()
    torch.optim.SGD(hf.parameters(), lr=0.1).step()
    assert all(torch.equal(hf.get_buffer(k), b) for k, b in biases.items())
    assert len(chain.funcs[0](x)) == 3


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_router_loss_off_sends_nothing_more(family):
    """``output_router_logits`` off (HF's default): HF adds no router loss, and the stream
    is the dense families' (hidden, positions, mask), the head's output the logits."""
    hf, chain, config = hf_and_chain(family, output_router_logits=False)
    assert router_loss_coef(config) is None
    x = ids()
    assert len(chain.funcs[0](x)) == 3
    out = chain(x)
    assert torch.is_tensor(out) and max_diff(out, hf(x).logits) <= TOL
    with pytest.raises(ValueError, match="returns a router loss but LanguageModelLoss has no"):
        LanguageModelLoss()((out, out.sum()), shifted(x))


def test_metrics_parts_are_the_mean_lm_and_aux_losses(world):
    """``lm_loss`` and ``aux_loss`` of metrics.jsonl: the micro-batch means, then cleared."""
    loss = LanguageModelLoss(0.5)
    logits, labels = torch.randn(2, 10, 100), shifted(ids())
    totals = [loss((logits * k, torch.tensor(float(k))), labels) for k in (1, 2)]
    trainer = types.SimpleNamespace(loss=loss)
    parts = Trainer.router_loss_parts(trainer)  # type: ignore[arg-type]
    lm = [float(t) - 0.5 * k for t, k in zip(totals, (1, 2))]
    assert parts == pytest.approx({"lm_loss": sum(lm) / 2, "aux_loss": 1.5}, abs=1e-6)
    assert (
        loss.parts == []
        and Trainer.router_loss_parts(types.SimpleNamespace(loss=LanguageModelLoss())) == {}
    )
