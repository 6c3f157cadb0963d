"""Split backward (Qi et al. 2024, "Zero Bubble Pipeline Parallelism", Sec. 2): I defers
the weight GEMMs of linear layers, W does them, and the gradients are those of the
ordinary backward. fp32 comparisons are bit-exact: the deferred GEMM uses the same
operands in the same order as autograd's backward of F.linear / addmm."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from pp_ext.autograd import split_backward
from pp_ext.autograd.split_backward import DeferrableLinear, WeightGradStore, enable_split_backward
from pp_ext.testing import tiny

torch.set_num_threads(1)


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def Block():
    """Llama-like: RMSNorm, causal attention with q/k/v/o Linear, RMSNorm, SwiGLU MLP."""
    return tiny.Block(tiny.TinyConfig(hidden=64, heads=4, intermediate=172))


class LM(nn.Module):
    """Embedding -> Block -> RMSNorm -> biased head: parameters of every kind."""

    def __init__(self, ckpt=None):
        super().__init__()
        self.ckpt = ckpt  # None, or use_reentrant for torch.utils.checkpoint around the block
        self.embed, self.block = nn.Embedding(50, 64), Block()
        self.norm, self.head = RMSNorm(64), nn.Linear(64, 50)

    def forward(self, ids):
        h = self.embed(ids)
        h = (
            self.block(h)
            if self.ckpt is None
            else checkpoint(self.block, h, use_reentrant=self.ckpt)
        )
        return self.head(self.norm(h))


def mlp():
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))


def llama_block():
    return Block()


def ids(seed=0):
    return torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(seed))


def loss_of(model, seed=0):
    logits = model(ids(seed))
    return F.cross_entropy(logits.flatten(0, 1), ids(seed + 100).flatten())


def pair(factory, seed=0):
    """A reference model and a patched copy with the same weights."""
    torch.manual_seed(seed)
    ref = factory()
    model, store = copy.deepcopy(ref), WeightGradStore()
    enable_split_backward(model, store)
    return ref, model, store


def deferred(model):
    return {id(m.weight) for m in model.modules() if isinstance(m, DeferrableLinear)}


def assert_same_grads(ref, model):
    for (name, a), b in zip(ref.named_parameters(), model.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        assert a.grad is None or torch.equal(a.grad, b.grad), name


def test_patch_keeps_parameters_and_state_dict():
    torch.manual_seed(0)
    model = LM()
    ref = copy.deepcopy(model)
    params, keys = [id(p) for p in model.parameters()], list(model.state_dict())
    store = WeightGradStore()
    assert enable_split_backward(model, store) == 8  # q k v o gate up down head
    assert [id(p) for p in model.parameters()] == params
    assert list(model.state_dict()) == keys
    assert type(model.head) is DeferrableLinear and isinstance(model.head, nn.Linear)
    assert type(model.block.attn_norm) is nn.RMSNorm
    assert enable_split_backward(model, store) == 8  # idempotent
    assert [id(p) for p in model.parameters()] == params
    model.load_state_dict(ref.state_dict())
    ref.load_state_dict(model.state_dict())


def test_linear_subclasses_are_left_alone():
    model = nn.Sequential(
        nn.Linear(4, 4), nn.MultiheadAttention(4, 1)
    )  # out_proj subclasses Linear
    assert enable_split_backward(model, WeightGradStore()) == 1
    assert type(model[1].out_proj) is not DeferrableLinear


@pytest.mark.parametrize("factory", [mlp, LM])
def test_outside_defer_is_ordinary_backward(factory):
    ref, model, store = pair(factory)
    x = torch.randn(3, 5, 16) if factory is mlp else ids()
    (ref(x).square().sum() if factory is mlp else loss_of(ref)).backward()
    (model(x).square().sum() if factory is mlp else loss_of(model)).backward()
    assert_same_grads(ref, model)
    assert store.pending() == []


@pytest.mark.parametrize("factory", [mlp, llama_block])
@pytest.mark.parametrize("start", ["loss", "grad_tensors"])
def test_split_equals_ordinary_backward(factory, start):
    ref, model, store = pair(factory)
    dim = 16 if factory is mlp else 64
    x = torch.randn(2, 16, dim, generator=torch.Generator().manual_seed(1))
    x_ref, x_split = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out_split = ref(x_ref), model(x_split)
    dy = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(2))
    if start == "loss":
        (out_ref * dy).sum().backward()
        with store.defer(("chunk", 0)):
            (out_split * dy).sum().backward()
    else:  # the engine's case: a stage output and the gradient received for it
        torch.autograd.backward([out_ref], [dy])
        with store.defer(("chunk", 0)):
            torch.autograd.backward([out_split], [dy])
    # I: what the previous stage waits for, and the fallback's gradients, are final now
    assert torch.equal(x_ref.grad, x_split.grad)
    for (name, a), b in zip(ref.named_parameters(), model.parameters()):
        if id(b) in deferred(model):
            assert b.grad is None, name
        else:
            assert torch.equal(a.grad, b.grad), name
    assert store.pending() == [("chunk", 0)]
    store.run(("chunk", 0))
    assert store.pending() == []
    assert_same_grads(ref, model)


def test_fallback_parameters_get_gradients_in_i():
    """Embedding, norm weights and the head's bias are not deferred."""
    ref, model, store = pair(LM)
    loss_of(ref).backward()
    with store.defer(0):
        loss_of(model).backward()
    early = {n for n, p in model.named_parameters() if p.grad is not None}
    assert early == {
        "embed.weight",
        "block.attn_norm.weight",
        "block.mlp_norm.weight",
        "norm.weight",
        "head.bias",
    }
    store.run(0)
    assert_same_grads(ref, model)


def test_interleaved_micro_batches_sum_like_ordinary_backwards():
    """I of micro-batch 0, I of 1, W of 1, W of 0."""
    ref, model, store = pair(LM)
    loss_of(ref, 0).backward()
    loss_of(ref, 1).backward()
    with store.defer((0, 0)):
        loss_of(model, 0).backward()
    with store.defer((0, 1)):
        loss_of(model, 1).backward()
    assert sorted(store.pending()) == [(0, 0), (0, 1)]
    store.run((0, 1))
    store.run((0, 0))
    assert store.pending() == []
    assert_same_grads(ref, model)  # a + b == b + a: still bit-exact


def test_accumulates_onto_existing_grad():
    ref, model, store = pair(LM)
    for p, q in zip(ref.parameters(), model.parameters()):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    loss_of(ref).backward()
    with store.defer(0):
        loss_of(model).backward()
    store.run(0)
    assert_same_grads(ref, model)


def test_bf16_and_frozen_parameters_get_no_grad():
    ref, model, store = pair(LM)
    for m in (ref, model):
        m.to(torch.bfloat16)
        for p in (m.block.q.weight, m.head.bias, m.block.mlp_norm.weight, m.embed.weight):
            p.requires_grad_(False)
    loss_of(ref).backward()
    with store.defer(0):
        loss_of(model).backward()
    store.run(0)
    for p in (
        model.block.q.weight,
        model.head.bias,
        model.block.mlp_norm.weight,
        model.embed.weight,
    ):
        assert p.grad is None
    for (name, a), b in zip(ref.named_parameters(), model.parameters()):
        if a.requires_grad:
            assert b.grad.dtype == torch.bfloat16
            torch.testing.assert_close(b.grad, a.grad, msg=name)  # bf16 tolerances


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_recomputed_inside_defer(reentrant):
    torch.manual_seed(0)
    ref = LM()
    model, store = copy.deepcopy(ref), WeightGradStore()
    model.ckpt = reentrant
    enable_split_backward(model, store)
    loss_of(ref).backward()  # no checkpointing: recomputation must not change a bit
    with store.defer(0):
        loss_of(model).backward()
    assert model.block.q.weight.grad is None
    store.run(0)
    assert_same_grads(ref, model)


def weight_gemm_flops(model, tokens):
    return sum(
        2 * tokens * m.in_features * m.out_features
        for m in model.modules()
        if isinstance(m, nn.Linear)
    )


@pytest.mark.parametrize("factory", [mlp, LM])
def test_weight_gemms_move_from_i_to_w(factory, monkeypatch):
    """I does no weight GEMM, W does them all, and I + W is exactly the fused backward's work."""
    _, model, store = pair(factory)
    calls = []
    real = split_backward._weight_grad
    monkeypatch.setattr(split_backward, "_weight_grad", lambda *a: calls.append(1) or real(*a))

    def loss():
        if factory is mlp:
            return model(torch.randn(2, 16, 16)).square().sum()
        return loss_of(model)

    def flops(fn):
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    fused = flops(loss().backward)
    assert len(calls) == linears  # outside defer: weight grads at once
    calls.clear()
    with store.defer(0):
        i = flops(loss().backward)
    assert calls == []
    w = flops(lambda: store.run(0))
    assert len(calls) == linears
    assert w == weight_gemm_flops(model, tokens=32)
    assert i + w == fused


def test_store_bookkeeping():
    _, model, store = pair(mlp)
    store.run("nothing queued")  # a chunk without linear layers
    with store.defer(None):  # None is a key like any other
        with store.defer("inner"):
            model(torch.randn(4, 16)).sum().backward()
        model(torch.randn(4, 16)).sum().backward()
    assert store.pending() == ["inner", None]
    store.clear()
    assert store.pending() == []
    model(torch.randn(4, 16)).sum().backward()  # not deferring after the contexts
    assert store.pending() == [] and model[0].weight.grad is not None


def test_in_place_change_before_w_is_an_error():
    _, model, store = pair(mlp)
    out = model(torch.randn(4, 16))
    dy = torch.ones_like(out)  # the last layer's grad_output is this very tensor
    with store.defer(0):
        torch.autograd.backward([out], [dy])
    dy.zero_()  # e.g. a receive buffer reused for the next micro-batch
    with pytest.raises(RuntimeError, match="modified in place"):
        store.run(0)


def test_autocast_and_non_leaf_weights_fall_back_to_ordinary_backward():
    ref, model, store = pair(mlp)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref(x).float().sum().backward()
        with store.defer(0):
            model(x).float().sum().backward()
    assert store.pending() == []
    assert_same_grads(ref, model)

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    ref, model, store = pair(mlp)
    for m in (ref, model):
        torch.nn.utils.parametrize.register_parametrization(m[0], "weight", Double())
    ref(x).sum().backward()
    with store.defer(0):
        model(x).sum().backward()
    store.run(0)
    assert_same_grads(ref, model)


def test_transformers_llama_decoder_layer():
    modeling = pytest.importorskip("transformers.models.llama.modeling_llama")
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=1,
        vocab_size=50,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = modeling.LlamaDecoderLayer(config, layer_idx=0)
    model, store = copy.deepcopy(ref), WeightGradStore()
    assert enable_split_backward(model, store) == 7
    rope = modeling.LlamaRotaryEmbedding(config)
    x = torch.randn(2, 16, 64)
    positions = torch.arange(16).expand(2, 16)
    rotary = rope(x, positions)
    dy = torch.randn(2, 16, 64)
    torch.autograd.backward([ref(x, position_ids=positions, position_embeddings=rotary)], [dy])
    with store.defer(0):
        torch.autograd.backward(
            [model(x, position_ids=positions, position_embeddings=rotary)], [dy]
        )
    assert model.mlp.down_proj.weight.grad is None
    store.run(0)
    assert_same_grads(ref, model)


def test_transformers_gpt2_conv1d():
    modeling = pytest.importorskip("transformers.models.gpt2.modeling_gpt2")
    from transformers import GPT2Config

    config = GPT2Config(n_embd=64, n_head=4, n_layer=1, vocab_size=50)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = modeling.GPT2Block(config, layer_idx=0).eval()  # no dropout
    model, store = copy.deepcopy(ref), WeightGradStore()
    assert enable_split_backward(model, store) == 4  # c_attn, attn c_proj, c_fc, mlp c_proj
    assert type(model.mlp.c_fc) is split_backward.DeferrableConv1D
    assert list(model.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 16, 64)
    ref(x).square().sum().backward()
    with store.defer(0):
        model(x).square().sum().backward()
    assert model.mlp.c_fc.weight.grad is None and model.mlp.c_fc.bias.grad is not None
    store.run(0)
    assert_same_grads(ref, model)
    copy_ = pickle.loads(pickle.dumps(model))  # the lazily built class resolves by name
    assert type(copy_.mlp.c_fc) is split_backward.DeferrableConv1D
