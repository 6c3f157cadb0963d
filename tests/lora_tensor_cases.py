"""Tensor- and data-parallel LoRA cases (issue 23), run in the 4-rank launch of
tests/test_tensor_parallel.py: pipe 2 x tensor 2, pipe 2 x data 2 and pipe 2 x data 2 x
expert 2 (a Mixtral's fused experts adapted by target_parameters) LoRA training
against PEFT's own ``get_peft_model`` on transformers' model in one process (fp32, AdamW,
gradient clipping, 3 steps), every adapter weight gathered whole; the PEFT export of a
tensor-parallel run loaded by ``PeftModel.from_pretrained``."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from hf_models import ALL_CONFIGS
from tensor_cases import (
    CLIP,
    MICRO_BATCHES,
    batch,
    probe_logits,
    replicas_differ,
    run_case,
)

LR = 1e-2
TOLERANCE = 1e-5
RESUME_LAYOUT = (2, 1, 2)  # where a tensor-parallel case's checkpoint is resumed


@dataclass(frozen=True)
class LoraCase:
    family: str
    tied: bool
    layout: tuple[int, int, int]  # (pipe, tensor, data)
    schedule: str
    targets: str | tuple[str, ...]
    modules_to_save: tuple[str, ...] | None = None
    dropout: float = 0.0  # > 0: dropout's masks differ from the reference's; replicas checked
    export: bool = False  # also: the PEFT export, and the checkpoint resumed at RESUME_LAYOUT
    expert: int = 1  # an MoE model's experts over this many data ranks
    target_parameters: tuple[str, ...] | None = None  # PEFT's ParamWrapper on fused experts


LORA_CASES = [
    LoraCase("llama", False, (2, 2, 1), "zb-h1", "all-linear", ("lm_head",), export=True),
    LoraCase("gpt2", True, (2, 2, 1), "1f1b", "all-linear", export=True),  # fused c_attn
    # fused query_key_value; a vocabulary-parallel embedding trained whole
    LoraCase("gpt_neox", False, (2, 2, 1), "zbv", "all-linear", ("embed_in",)),
    LoraCase("llama", True, (2, 1, 2), "1f1b", ("q_proj", "v_proj", "down_proj")),
    LoraCase("qwen2", False, (2, 2, 1), "1f1b", "all-linear", dropout=0.2),
    # the fused experts' adapters cut by expert (rows of A, strided columns of B), aux loss on
    LoraCase(
        "mixtral",
        False,
        (2, 1, 2),
        "zb-h1",
        ("q_proj", "v_proj"),
        expert=2,
        target_parameters=("experts.gate_up_proj", "experts.down_proj"),
    ),
]


def lora_config(case: LoraCase):
    from peft import LoraConfig

    targets = case.targets if isinstance(case.targets, str) else list(case.targets)
    return LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=case.dropout,
        target_modules=targets,
        modules_to_save=None if case.modules_to_save is None else list(case.modules_to_save),
        target_parameters=None if case.target_parameters is None else list(case.target_parameters),
        task_type="CAUSAL_LM",
        init_lora_weights=False,  # B random too: the first step moves A as well
        fan_in_fan_out=case.family == "gpt2",  # GPT-2's Conv1D: as pp-ext's lora_config says
    )


class Reference:
    """PEFT's model trained in one process on every data rank's micro-batches."""

    def __init__(self, model) -> None:
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=LR)

    def step(self, step: int, data: int) -> float:
        self.model.train()
        self.optimizer.zero_grad()
        total = 0.0
        for k in range(MICRO_BATCHES * data):
            ids, _ = batch(step, k)
            loss = self.model(input_ids=ids, labels=ids, use_cache=False).loss / (
                MICRO_BATCHES * data
            )
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(self.params, CLIP)
        self.optimizer.step()
        return total


def whole(param: torch.Tensor, axis) -> torch.Tensor:
    """``param`` merged from every tensor rank's part, or expert rank's (itself when not cut)."""
    import torch.distributed as dist
    from deepspeed.utils import groups

    split, group = getattr(param, "tp_split", None), axis.group
    if split is None and hasattr(param, "expert_split"):
        split = getattr(param, "expert_split")
        group = groups._get_expert_parallel_group(getattr(param, "group_name"))
    if split is None:
        return param.detach()
    parts = [torch.empty_like(param) for _ in range(split.size)]
    dist.all_gather(parts, param.detach().contiguous(), group=group)
    return split.merge(parts)


def lora_engine(model: str, layout, schedule: str, lora, adapter: str | None, expert: int = 1):
    """The pipeline engine of ``model`` at ``layout`` (an MoE model's experts over ``expert``
    data ranks) with ``lora``'s adapters, read from the PEFT folder ``adapter`` (None: left
    to a checkpoint), and its adapted layers; its loss adds an MoE model's router loss."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    import pp_ext
    from pp_ext.hf import build_pipeline_module, router_loss_coef
    from pp_ext.hf.loading import indexed_layers, load_config
    from pp_ext.peft import Targets, add_adapters, load_adapter
    from pp_ext.schedules import get
    from pp_ext.training.loss import LanguageModelLoss
    from pp_ext.training.optim import expert_groups

    spec, data = get(schedule), layout[2]
    module = build_pipeline_module(
        model,
        topology=PipeModelDataParallelTopology(*layout),
        chunks=spec.default_chunks,
        placement=spec.placement,
        partition_method="type:layer",  # a decoder layer on each stage: both have adapters
        expert=expert,
    )
    module.loss_fn = LanguageModelLoss(router_loss_coef(load_config(model)))
    module.loss_fn.tensor_axis = module.tensor_axis
    layers = add_adapters(indexed_layers(module), Targets.of(lora, load_config(model)), seed=0)
    if adapter is not None:
        load_adapter(layers, adapter)
    module.parameters_changed()
    trainable = [p for p in module.parameters() if p.requires_grad]
    engine, *_ = pp_ext.initialize(
        model=module,
        optimizer=torch.optim.AdamW(
            expert_groups([{"name": "params", "params": trainable}]), lr=LR
        ),
        config={
            "train_micro_batch_size_per_gpu": 2,
            "gradient_accumulation_steps": MICRO_BATCHES,
            "train_batch_size": 2 * MICRO_BATCHES * data,
            "gradient_clipping": CLIP,
        },
        schedule=schedule,
    )
    return engine, layers


def train_step(engine, step: int) -> float:
    dp = engine.grid.get_data_parallel_rank()
    return float(
        engine.train_batch(
            iter([batch(step, dp * MICRO_BATCHES + k) for k in range(MICRO_BATCHES)])
        )
    )


def adapter_diff(layers, axis, reference) -> float:
    """Largest difference of this rank's adapters (gathered whole) from ``reference``'s."""
    from peft import get_peft_model_state_dict

    from pp_ext.peft import peft_keys

    trained = get_peft_model_state_dict(reference)
    ours = {
        key: whole(dict(layer.named_parameters())[name], axis)
        for layer in layers
        for name, key in peft_keys(layer).items()
    }
    return max(float((ours[k] - trained[k]).detach().abs().max()) for k in ours)


def run_lora_case(tmp: str, case: LoraCase) -> dict:
    import torch.distributed as dist
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from pp_ext import tp
    from pp_ext.checkpoint import reshape
    from pp_ext.checkpoint.export import export_checkpoint, save_hf_metadata
    from pp_ext.peft import Targets, peft_keys

    pipe, tensor, data = case.layout
    folder = f"{tmp}/lora-{case.family}-{pipe}{tensor}{data}-{case.schedule}"
    torch.manual_seed(0)
    config = ALL_CONFIGS[case.family](case.tied)
    hf = AutoModelForCausalLM.from_config(config).float()
    lora = lora_config(case)
    torch.manual_seed(1)  # the same reference adapter on every rank
    reference = get_peft_model(copy.deepcopy(hf), LoraConfig(**lora.to_dict()))
    if dist.get_rank() == 0:
        hf.save_pretrained(f"{folder}/hf")
        reference.save_pretrained(f"{folder}/adapter")
    dist.barrier()

    model = f"{folder}/hf"
    engine, layers = lora_engine(
        model, case.layout, case.schedule, lora, f"{folder}/adapter", case.expert
    )
    axis = engine.module.tensor_axis
    losses = [train_step(engine, step) for step in range(3)]
    ref = Reference(reference)
    ref_losses = [ref.step(step, data) for step in range(3)]
    named = engine.module.named_parameters()
    result = {
        "case": case,
        "losses": losses,
        "ref_losses": ref_losses,
        "adapter_diff": adapter_diff(layers, axis, reference),
        "adapters": sum(len(peft_keys(layer)) for layer in layers),
        "cut": sum(hasattr(p, "tp_split") and ".lora_" in n for n, p in named),
        "replicas_differ": replicas_differ(engine.module, axis),
    }
    if case.export:
        engine.save_checkpoint(
            f"{folder}/ckpt",
            tag="t",
            exclude_frozen_parameters=True,
            client_state=reshape.client_state(engine),
        )
        if dist.get_rank() == 0:
            save_hf_metadata(f"{folder}/ckpt/t", config, adapter=lora)  # no tokenizer
            export_checkpoint(f"{folder}/ckpt", f"{folder}/out", tag="t")
        dist.barrier()
        probe, logits = probe_logits(engine)
        if engine.is_last_stage():
            base = AutoModelForCausalLM.from_pretrained(model)
            exported = PeftModel.from_pretrained(base, f"{folder}/out").eval()
            with torch.no_grad():
                want = exported(input_ids=probe).logits
                trained = reference.eval()(input_ids=probe).logits
            result["export_diff"] = float(
                (tp.gather_last_dim(logits, axis) - want).detach().abs().max()
            )
            result["export_vs_ref"] = float((want - trained).abs().max())
        # the checkpoint resumed at pipe 2 x data 2 (its lora factors merged whole), a 4th step
        resumed, layers = lora_engine(model, RESUME_LAYOUT, case.schedule, lora, None)
        adapters = Targets.of(lora, config)
        reshape.load(resumed, Path(f"{folder}/ckpt/t"), ["tensor 2 -> 1"], adapters)
        loss = train_step(resumed, 3)
        result["resume_diff"] = (
            abs(loss - ref.step(3, RESUME_LAYOUT[2])),
            adapter_diff(layers, resumed.module.tensor_axis, reference),
        )
    return result


def lora_failures(rank: int, r: dict) -> list[str]:
    """What is wrong with one rank's result of a :class:`LoraCase`."""
    case, found = r["case"], []
    loss_diff = max(abs(a - b) for a, b in zip(r["losses"], r["ref_losses"]))
    if not case.dropout and max(loss_diff, r["adapter_diff"]) > TOLERANCE:
        found.append(f"loss diff {loss_diff:.2e}, adapter diff {r['adapter_diff']:.2e}")
    if not r["adapters"] or (case.layout[1] > 1) != bool(r["cut"]):
        found.append(f"{r['adapters']} adapter tensors, {r['cut']} cut over tensor ranks")
    if r["replicas_differ"]:
        found.append(f"replicated tensors differ across tensor ranks: {r['replicas_differ']}")
    if "resume_diff" in r and max(r["resume_diff"]) > TOLERANCE:
        found.append(
            "resumed at pipe 2 x data 2, the 4th step's loss and adapters differ by "
            f"{r['resume_diff'][0]:.2e} and {r['resume_diff'][1]:.2e}"
        )
    if "export_diff" in r and max(r["export_diff"], r["export_vs_ref"]) > TOLERANCE:
        found.append(
            f"PEFT export's logits differ by {r['export_diff']:.2e} from the pipeline's, "
            f"{r['export_vs_ref']:.2e} from the reference's"
        )
    return [f"rank {rank} {case}: {f}" for f in found]


def run_every_case(rank: int, world: int, tmp: str, cases: list) -> list[dict]:
    """The launch's cases in order: :class:`LoraCase` here, the others by tensor_cases."""
    return [
        run_lora_case(tmp, case) if isinstance(case, LoraCase) else run_case(tmp, case)
        for case in cases
    ]
