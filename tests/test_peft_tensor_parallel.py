"""Tensor-parallel LoRA's cuts, without a process group (pp_ext/peft/parallel.py): the
factors of a column- and a row-parallel projection, fused [q; k; v] sections, the initial
adapters of any tensor size equal to one rank's, and dropout of a cut input equal to the
whole input's. Training against PEFT at pipe 2 x tensor 2 is the 4-rank launch of
tests/test_tensor_parallel.py (tests/lora_tensor_cases.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hf_models import CONFIGS
from peft import LoraConfig

from pp_ext import tp
from pp_ext.hf import layer_specs
from pp_ext.peft import Targets, add_adapters
from pp_ext.peft.parallel import CutDropout

SEED = 7


def adapted_layer(family: str, size: int, rank: int):
    """The last decoder layer of ``family`` at ``size`` tensor ranks, this one ``rank``,
    with PEFT's default LoRA (A random, B zero) on every linear module."""
    config = CONFIGS[family](False)
    idx = len(layer_specs(config)) - 3  # before the final norm and the LM head
    with tp.using(tp.TensorAxis(size, rank)):
        layer = layer_specs(config)[idx].build()
    lora = LoraConfig(
        r=4, target_modules="all-linear", task_type="CAUSAL_LM", fan_in_fan_out=family == "gpt2"
    )
    add_adapters([(idx, layer)], Targets.of(lora, config), seed=SEED)
    return layer


def factors(layer) -> dict[str, torch.nn.Module]:
    return {
        n: m for n, m in layer.named_modules() if n.endswith((".lora_A.default", ".lora_B.default"))
    }


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_factors_are_cut_as_their_projection_and_start_as_on_one_rank(family):
    """On a column-parallel projection lora_A is whole and lora_B cut by output rows
    (GPT-2's c_attn section by section), made column-parallel; on a row-parallel one
    lora_A is cut by input columns, made row-parallel, and lora_B whole. The parts of two
    tensor ranks merge into one rank's initial adapters, bit for bit."""
    one = factors(adapted_layer(family, 1, 0))
    assert len(one) == {"llama": 14, "gpt2": 8}[family]
    parts = [factors(adapted_layer(family, 2, rank)) for rank in range(2)]
    column = {"llama": "self_attn.q_proj", "gpt2": "attn.c_attn"}[family]
    row = {"llama": "mlp.down_proj", "gpt2": "mlp.c_proj"}[family]
    for name, whole in one.items():
        mine = [part[name] for part in parts]
        split = getattr(mine[0].weight, "tp_split", None)
        merged = mine[0].weight if split is None else split.merge([m.weight for m in mine])
        assert torch.equal(merged, whole.weight), name
        if split is None:  # a whole factor: the same on both ranks
            assert torch.equal(mine[0].weight, mine[1].weight), name
        if name.endswith("lora_B.default"):
            assert not whole.weight.any(), name  # PEFT's default: B starts at zero
    assert isinstance(parts[1][f"layer.{column}.lora_B.default"], tp.ColumnParallelLinear)
    assert not hasattr(parts[1][f"layer.{column}.lora_A.default"].weight, "tp_split")
    assert isinstance(parts[1][f"layer.{row}.lora_A.default"], tp.RowParallelLinear)
    assert not hasattr(parts[1][f"layer.{row}.lora_B.default"].weight, "tp_split")
    if family == "gpt2":  # [q; k; v] rows, each section cut in two
        cut = parts[1]["layer.attn.c_attn.lora_B.default"].weight.tp_split
        assert cut == tp.Split(0, (32, 32, 32), 2, 1)


def test_dropout_of_a_cut_input_is_the_whole_inputs_dropout_cut():
    """Each tensor rank, its generator in step with the others', keeps its part of the
    mask a single process draws for the whole input; nothing in evaluation."""
    x = torch.randn(3, 5, 8)
    torch.manual_seed(SEED)
    want = F.dropout(x, 0.3, training=True)
    for rank in range(2):
        dropout = CutDropout(0.3, tp.Split(1, (8,), 2, rank))
        torch.manual_seed(SEED)
        assert torch.equal(
            dropout(x[..., rank * 4 : (rank + 1) * 4]), want[..., rank * 4 : (rank + 1) * 4]
        )
        assert torch.equal(dropout.eval()(x[..., :4]), x[..., :4])


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_expert_ranks_hold_their_rows_of_peft_whole_fused_adapter(family):
    """LoRA on fused experts at expert 2 (pp_ext/peft/experts.py): each expert rank's
    lora_A is rows e*r ... e*r+r-1 and its lora_B columns e, e+E, ... of PEFT's own
    adapter built on transformers' decoder layer with all E experts under the layer's
    seed (PEFT's draws replayed in PEFT's order), the dense adapters PEFT's whole; the
    expert factors carry DeepSpeed's expert marks and cut any whole tensor so."""
    from hf_models import MOE_CONFIGS
    from peft import inject_adapter_in_model

    from pp_ext.moe import dispatch
    from pp_ext.moe.experts import DeferrableExperts

    config = MOE_CONFIGS[family](False)
    idx = 2  # the second decoder layer: sparse in both
    lora = LoraConfig(
        r=4,
        target_modules=["q_proj", "v_proj", "down_proj"],  # qwen2_moe: its shared expert's
        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
        task_type="CAUSAL_LM",
    )
    hf_class = type(__import__("transformers").AutoModelForCausalLM.from_config(config))
    reference = hf_class.__module__
    decoder = getattr(
        __import__(reference, fromlist=["x"]),
        hf_class.__name__.replace("ForCausalLM", "DecoderLayer"),
    )(config, idx - 1)
    torch.manual_seed(SEED + idx)
    inject_adapter_in_model(LoraConfig(**lora.to_dict()), decoder)
    whole = {n: p.detach() for n, p in decoder.named_parameters() if "lora_" in n}
    experts, r = config.num_local_experts if family == "mixtral" else config.num_experts, 4
    local = experts // 2
    seen = set()
    for rank in range(2):
        layer = layer_specs(config)[idx].build()
        for sub in list(layer.modules()):
            if isinstance(sub, DeferrableExperts):
                dispatch.shard(sub, dispatch.ExpertAxis(2, rank))
        add_adapters([(idx, layer)], Targets.of(lora, config), seed=SEED)
        for name, param in layer.named_parameters():
            if "lora_" not in name:
                continue
            key = name.removeprefix("layer.")
            want = whole[key]
            if ".experts." in key:  # rows / strided columns of this rank's experts
                mine = [rank * local + i for i in range(local)]
                rows = [e * r + j for e in mine for j in range(r)]
                columns = [j * experts + e for j in range(r) for e in mine]
                pick = (lambda t: t[rows]) if ".lora_A." in key else (lambda t: t[:, columns])
                drawn = torch.randn(want.shape)  # B starts at zero: the cut on any values
                assert torch.equal(param.expert_split.take(drawn), pick(drawn)), name
                want = pick(want)
                assert param.allreduce is False and param.group_name == "ep_size_2", name
            else:
                assert not hasattr(param, "expert_split"), name
            assert torch.equal(param.detach(), want), (rank, name)
            seen.add(key)
    assert seen == set(whole) and any(".experts." in k for k in seen)
