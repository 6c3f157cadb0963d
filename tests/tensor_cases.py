"""Shared by the tensor-parallel tests: pipeline x tensor x data cases trained beside HF."""

from __future__ import annotations

from pathlib import Path

import torch
from hf_models import ALL_CONFIGS, draw_expert_biases, reference_model

from pp_ext import tp

TOLERANCE = 1e-5


MICRO_BATCHES = 4


CLIP = 0.5  # bites on every step: a norm counting a replicated or tied weight twice would show


def batch(step: int, micro_batch: int):
    ids = torch.randint(
        100, (2, 10), generator=torch.Generator().manual_seed(100 * step + micro_batch)
    )
    return ids, torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)


def reference_step(model, step: int, data: int) -> tuple[float, float]:
    """One step of single-process HF training (SGD, stateless) on every data rank's
    micro-batches (an MoE model's loss with its router loss): the mean loss and the
    gradient norm before clipping."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # no state: one per step
    optimizer.zero_grad()
    total = 0.0
    for k in range(MICRO_BATCHES * data):
        ids, _ = batch(step, k)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss / (MICRO_BATCHES * data)
        loss.backward()
        total += float(loss.detach())
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP))
    optimizer.step()
    return total, norm


def reference_training(model, data: int) -> tuple[list[float], list[float]]:
    """:func:`reference_step` 3 times: the losses and the gradient norms."""
    steps = [reference_step(model, step, data) for step in range(3)]
    return [loss for loss, _ in steps], [norm for _, norm in steps]


def loss_fn(logits, labels, axis):
    return tp.vocab_parallel_cross_entropy(logits, labels, axis)


RESUME_LAYOUT = (2, 1, 2)  # where an MoE case's tensor-parallel checkpoint is resumed


def pipeline_engine(
    model: str,
    layout,
    schedule: str,
    dtype: str = "float32",
    expert: int = 1,
    checkpoint_interval: int = 0,
    zero: bool = False,
):
    """The pp-ext engine of the HF folder ``model`` at ``layout`` (pipe, tensor, data),
    an MoE model's experts over ``expert`` data ranks (in optimizer groups of their own),
    activation checkpointing every ``checkpoint_interval`` layers (0: off), trained by SGD
    with the tests' clipping; its loss adds an MoE model's router loss. ``zero``: ZeRO-1
    (bf16: with fp32 gradient accumulation, the training job's base)."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    import pp_ext
    from pp_ext.hf import build_pipeline_module, router_loss_coef
    from pp_ext.hf.loading import load_config
    from pp_ext.schedules import get
    from pp_ext.training.loss import LanguageModelLoss
    from pp_ext.training.optim import expert_groups

    spec, data = get(schedule), layout[2]
    module = build_pipeline_module(
        model,
        topology=PipeModelDataParallelTopology(*layout),
        chunks=spec.default_chunks,
        placement=spec.placement,
        partition_method="uniform",
        dtype=dtype,
        expert=expert,
        activation_checkpoint_interval=checkpoint_interval,
    )
    module.loss_fn = LanguageModelLoss(router_loss_coef(load_config(model)))
    module.loss_fn.tensor_axis = module.tensor_axis
    engine, *_ = pp_ext.initialize(
        model=module,
        optimizer=torch.optim.SGD(
            expert_groups([{"name": "params", "params": list(module.parameters())}]), lr=0.1
        ),
        config={
            "train_micro_batch_size_per_gpu": 2,
            "gradient_accumulation_steps": MICRO_BATCHES,
            "train_batch_size": 2 * MICRO_BATCHES * data,
            "gradient_clipping": CLIP,
            **(
                {"bf16": {"enabled": True, "immediate_grad_update": False}}
                if dtype == "bfloat16"
                else {}
            ),
            **(
                {
                    "zero_optimization": {"stage": 1},
                    "zero_allow_untested_optimizer": True,  # SGD, the reference's
                    "data_types": {"grad_accum_dtype": "fp32"},
                }
                if zero
                else {}
            ),
        },
        schedule=schedule,
    )
    return engine


def params_vs(module, reference) -> float:
    """Largest difference of ``module``'s parameters (a tensor rank's parts compared with
    their cut of the reference's) from the HF model ``reference``'s."""
    from pp_ext.hf.loading import local_layers
    from pp_ext.hf.weights import hf_keys

    whole = reference.state_dict()
    worst = 0.0
    for layer in local_layers(module):
        cut = tp.splits(layer)
        for name, param in layer.named_parameters():
            want = whole[hf_keys(layer)[name]]
            want = cut[name].take(want) if name in cut else want
            worst = max(worst, float((param.detach() - want).abs().max()))
    return worst


def run_case(tmp, case) -> dict:
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from pp_ext.checkpoint import reshape
    from pp_ext.checkpoint.export import export_checkpoint, save_hf_metadata

    family, tied, (pipe, tensor, data), schedule, export, *rest = case
    dtype = rest[0] if rest else "float32"
    vocab = rest[1] if len(rest) > 1 else None
    expert = rest[2] if len(rest) > 2 else 1
    folder = f"{tmp}/{family}-{tied}-{pipe}{tensor}{data}{expert}-{schedule}-{dtype}-{vocab}"
    config = ALL_CONFIGS[family](tied)
    config.vocab_size = vocab or config.vocab_size  # 103: padded to 104 on 2 tensor ranks
    torch.manual_seed(0)
    model = reference_model(config)  # DeepSeek-V3's routers with a nonzero correction bias
    draw_expert_biases(model, 0.2)  # gpt-oss's, zero in HF's initialisation
    if dist.get_rank() == 0:
        model.save_pretrained(f"{folder}/hf")
    dist.barrier()
    engine = pipeline_engine(f"{folder}/hf", (pipe, tensor, data), schedule, dtype, expert)
    module = engine.module
    axis = module.tensor_axis
    dp = engine.grid.get_data_parallel_rank()
    losses, norms = [], []
    for step in range(3):
        data_iter = iter([batch(step, dp * MICRO_BATCHES + k) for k in range(MICRO_BATCHES)])
        losses.append(float(engine.train_batch(data_iter)))
        # the norm the engine clipped by (BF16_Optimizer's under bf16)
        norms.append(
            float(engine.get_global_grad_norm() if dtype == "bfloat16" else engine._step_grad_norm)
        )
    result = {
        "case": case,
        "losses": losses,
        "norms": norms,
        "optimizer": type(engine.optimizer).__name__,
        "replicas_differ": replicas_differ(module, axis),
    }
    # under a split backward every Conv1D defers its weight GEMM to W; a rank whose every I
    # meets its own W runs B instead (pipeline 1: fuse_backward), with nothing to defer
    if family == "gpt2" and any(
        a.kind.name == "I" for a in engine.schedule.programs[engine.stage_id]
    ):
        from transformers.pytorch_utils import Conv1D

        convs = [m for m in module.modules() if isinstance(m, Conv1D)]
        result["conv1d"] = (
            len(convs),
            sum(getattr(m, "_wgrad_store", None) is engine.store for m in convs),
        )
    result["ref_losses"], result["ref_norms"] = reference_training(model, data)
    result["params_vs_ref"] = params_vs(module, model)
    if export:
        engine.save_checkpoint(f"{folder}/ckpt", tag="t", client_state=reshape.client_state(engine))
        if dist.get_rank() == 0:
            save_hf_metadata(f"{folder}/ckpt/t", model.config)  # no tokenizer needed
            export_checkpoint(f"{folder}/ckpt", f"{folder}/out", tag="t")
        dist.barrier()
        probe, logits = probe_logits(engine)
        if engine.is_last_stage():
            exported = AutoModelForCausalLM.from_pretrained(f"{folder}/out").eval()
            with torch.no_grad():
                want = exported(input_ids=probe).logits
            # a padded vocabulary's columns past the model's own are dropped (they are masked)
            gathered = tp.gather_last_dim(logits, axis)[..., : config.vocab_size]
            result["export_diff"] = float((gathered - want).abs().max())
            # the export equals the trained reference model too: logits and parameters
            with torch.no_grad():
                result["export_vs_ref"] = float(
                    (want - model.eval()(input_ids=probe).logits).abs().max()
                )
            reference = model.state_dict()
            result["export_params_vs_ref"] = max(
                float((tensor - reference[name]).abs().max())
                for name, tensor in exported.state_dict().items()
            )
            result["export_vocab"] = (exported.config.vocab_size, config.vocab_size)
        if getattr(config, "output_router_logits", False):
            # the MoE checkpoint resumed at pipe 2 x data 2 (tensor 2 -> 1), a 4th step
            resumed = pipeline_engine(f"{folder}/hf", RESUME_LAYOUT, schedule)
            reshape.load(resumed, Path(f"{folder}/ckpt/t"), [f"tensor {tensor} -> 1"])
            dp = resumed.grid.get_data_parallel_rank()
            loss = float(
                resumed.train_batch(
                    iter([batch(3, dp * MICRO_BATCHES + k) for k in range(MICRO_BATCHES)])
                )
            )
            want, _ = reference_step(model, 3, RESUME_LAYOUT[2])
            result["resume_diff"] = (abs(loss - want), params_vs(resumed.module, model))
    return result


def probe_logits(engine) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A probe batch's token ids and the pipeline's logits of it (this tensor rank's
    vocabulary block, on the last stage; None elsewhere; an MoE model's without its aux
    loss, nothing averaged)."""
    probe = batch(7, 0)
    logits = engine.eval_batch(
        iter([probe]),
        return_logits=True,
        compute_loss=False,
        reduce_output=None,
        num_micro_batches=1,
    )[1]
    return probe[0], logits[0] if isinstance(logits, tuple) else logits


def replicas_differ(module, axis) -> list[str]:
    """Names of the replicated (not sharded) parameters whose bits differ between the
    tensor ranks of this stage, all-gathered over the axis."""
    import torch.distributed as dist

    differ = []
    for name, param in sorted(module.named_parameters()):
        if axis.size > 1 and not hasattr(param, "tp_split"):
            bits = param.detach().contiguous().view(torch.uint8)
            parts = [torch.empty_like(bits) for _ in range(axis.size)]
            dist.all_gather(parts, bits, group=axis.group)
            if not all(torch.equal(part, parts[0]) for part in parts):
                differ.append(name)
    return differ


def run_cases(rank: int, world: int, tmp: str, cases: list) -> list[dict]:
    return [run_case(tmp, case) for case in cases]
