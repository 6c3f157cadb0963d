"""Split backward on a LoRA model (issue 23, item 3): peft's ``lora.Linear`` keeps its
frozen base layer inside, so the I pass computes the input gradient through the base
and the adapters, and the W pass computes only the adapters' (and ``modules_to_save``')
weight gradients: per targeted layer two small GEMMs (Hu et al. 2021, "LoRA": lora_B's
``g^T (A x)`` and lora_A's ``(B^T g)^T x``), none for a frozen weight. The reference is
peft's own ``get_peft_model`` on transformers' model, run with the ordinary backward."""

from __future__ import annotations

import copy
import warnings
from collections import Counter

import pytest
import torch
from hf_models import CONFIGS
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from pp_ext.autograd.split_backward import WeightGradStore, enable_split_backward

torch.set_num_threads(1)

GEMMS = {"mm", "addmm", "bmm"}

# (family, LoraConfig keywords): PEFT's default targets, all-linear with dropout, rsLoRA
# and a head trained whole, and a list that leaves most linear layers frozen and plain
CASES = [
    ("llama", dict(r=2, target_modules=None)),
    ("llama", dict(r=4, target_modules="all-linear", lora_dropout=0.1, use_rslora=True)),
    ("qwen2", dict(r=3, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])),
    ("gpt2", dict(r=2, target_modules="all-linear", lora_dropout=0.1, fan_in_fan_out=True)),
    ("gpt_neox", dict(r=2, target_modules=None, modules_to_save=["lm_head"])),
]


class GemmShapes(TorchDispatchMode):
    """The output shape of every matrix product torch runs while active."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in GEMMS:
            self.shapes.append(tuple(out.shape))
        return out


def peft_pair(family: str, keywords: dict):
    """peft's model on transformers' (B random, so every adapter gets a gradient) and a
    copy whose linear layers defer their weight GEMMs."""
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(CONFIGS[family](False)).float()
    lora = LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **keywords)
    with warnings.catch_warnings():
        # peft 0.21's PeftModel reads transformers' deprecated `is_gradient_checkpointing`
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
        ref = get_peft_model(hf, lora).train()  # dropout on where the config asks for it
    model, store = copy.deepcopy(ref), WeightGradStore()
    enable_split_backward(model, store)
    return ref, model, store


def loss_of(model, seed: int = 0):
    ids = torch.randint(1, 100, (2, 10), generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)  # the same dropout masks in both models
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def trainable_weights(model) -> list[tuple[int, ...]]:
    """The weight of each trainable matrix layer, as the model holds it: what a W pass may
    compute, one GEMM each (peft's lora_A / lora_B, a ``modules_to_save`` copy)."""
    return [
        tuple(p.shape)
        for name, p in model.named_parameters()
        if p.requires_grad and p.dim() == 2 and "embed_tokens" not in name and "wte" not in name
    ]


@pytest.mark.parametrize("family,keywords", CASES)
def test_w_pass_runs_only_the_adapters_gemms(family, keywords):
    ref, model, store = peft_pair(family, keywords)
    targets = sum(isinstance(m, BaseTunerLayer) for m in ref.modules())
    whole = 1 if keywords.get("modules_to_save") else 0  # the head trained in full
    loss_of(ref).backward()
    with store.defer(0):
        loss_of(model).backward()
    with GemmShapes() as w_pass:
        store.run(0)
    # per targeted layer lora_A and lora_B, the head's one GEMM: the shapes of the weights
    assert len(w_pass.shapes) == 2 * targets + whole, w_pass.shapes
    assert Counter(w_pass.shapes) == Counter(trainable_weights(ref))
    for (name, a), b in zip(ref.named_parameters(), model.parameters()):
        if not a.requires_grad:
            assert b.grad is None, name  # a frozen weight: no gradient, in I or W
        else:
            assert torch.equal(a.grad, b.grad), name  # I + W is the ordinary backward


def saved_bytes(model, parameters: set[int]) -> int:
    """Bytes autograd keeps from a forward of ``model`` that are not its parameters."""
    kept: dict[tuple[int, torch.dtype], int] = {}

    def pack(tensor):
        if tensor.data_ptr() not in parameters:
            kept[(tensor.data_ptr(), tensor.dtype)] = tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_of(model)
    return sum(kept.values())


@pytest.mark.parametrize("family,keywords", CASES)
def test_frozen_layers_keep_no_more_than_ordinary_autograd(family, keywords):
    """A frozen base layer needs its weight for the input gradient but not its input:
    the deferrable layer keeps what autograd's own linear keeps."""
    ref, model, _ = peft_pair(family, keywords)
    ours = saved_bytes(model, {p.data_ptr() for p in model.parameters()})
    assert ours == saved_bytes(ref, {p.data_ptr() for p in ref.parameters()})
