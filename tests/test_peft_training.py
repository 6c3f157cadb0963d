"""LoRA through the pipeline (issue 23): 2-stage training with PEFT's adapters on the
stages equals PEFT's own ``get_peft_model`` on transformers' model trained in one
process (fp32, AdamW, gradient clipping, 3 steps): every family, every synchronous
schedule, activation checkpointing, ``modules_to_save``. The base weights stay bitwise
as loaded, and the optimizer holds state for the adapters only."""

from __future__ import annotations

import pytest
from hf_checks import batch, shifted_loss

TOLERANCE = 1e-5
STEPS, MICRO_BATCHES, LR, CLIP = 3, 4, 1e-2, 0.5

# (family, schedule, tied, activation_checkpoint_interval, target_modules, modules_to_save)
CASES = [
    ("llama", "1f1b", False, 0, "all-linear", ["lm_head"]),
    ("llama", "zb-h1", True, 1, ["q_proj", "v_proj"], None),  # the checkpointing trap
    ("qwen2", "zbv", False, 0, "all-linear", None),
    ("mistral", "interleaved-1f1b", True, 0, "all-linear", None),
    ("qwen3", "zb-h2", False, 1, ".*mlp.*_proj", None),  # a regex, as PEFT reads one
    ("gemma", "gpipe", True, 0, "all-linear", None),
    ("gemma2", "looped-bfs", True, 0, "all-linear", None),
    ("gemma3_text", "dualpipev", False, 0, "all-linear", None),
    ("phi3", "1f1b", False, 0, "all-linear", None),
    ("qwen2", "deepspeed-1f1b", True, 1, ["q_proj", "o_proj"], None),
    ("gpt2", "zb-h1", True, 0, "all-linear", None),
    ("gpt_neox", "chimera", False, 0, "all-linear", ["lm_head"]),
]
# MoE families (issue 24), aux loss on: peft 0.21 maps all-linear on Mixtral, Qwen3-MoE and
# OLMoE onto the fused experts (gate_up_proj at rank 2r) and the router (gate.weight);
# Qwen2-MoE names its experts in target_parameters, beside its shared expert's linears
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
CASES += [
    ("mixtral", "zb-h1", False, 0, "all-linear", None, None),
    ("qwen2_moe", "1f1b", False, 0, "all-linear", None, EXPERTS),
    ("qwen3_moe", "zb-h1", False, 0, ["q_proj", "v_proj"], None, EXPERTS),
    ("olmoe", "1f1b", False, 1, "all-linear", None, None),
    # DeepSeek-V3 (no router loss, as HF's): peft maps all-linear onto its experts (rank 2r
    # for gate_up_proj) and router, beside the latent attention's linears (and takes its
    # shared experts' and dense layer's gate/up/down_proj for the experts' v4 names: no
    # adapter there, as peft); gpt-oss's transposed, biased experts (biases drawn nonzero)
    # only by target_parameters
    ("deepseek_v3", "zb-h1", False, 0, "all-linear", None, None),
    ("deepseek_v3", "1f1b", True, 1, ["q_b_proj", "kv_b_proj", "o_proj"], None, EXPERTS),
    ("gpt_oss", "1f1b", False, 0, "all-linear", None, EXPERTS),
    ("gpt_oss", "zb-h1", True, 1, ["q_proj", "o_proj"], None, EXPERTS),
]


def run_case(family, schedule, tied, interval, targets, whole, parameters=None) -> dict:
    import copy
    import tempfile

    import torch
    from hf_models import ALL_CONFIGS, CONFIGS, draw_expert_biases, reference_model
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    import pp_ext
    from pp_ext.engine.module import ChunkedPipelineModule
    from pp_ext.hf import copy_hf_weights, layer_specs, router_loss_coef
    from pp_ext.hf.loading import indexed_layers, local_layers
    from pp_ext.peft import Targets, add_adapters, load_adapter, peft_keys
    from pp_ext.peft.adapters import BASE, is_adapter
    from pp_ext.peft.config import peft_model_warnings
    from pp_ext.schedules import get
    from pp_ext.schedules.registry import BASELINE
    from pp_ext.training.loss import LanguageModelLoss

    torch.manual_seed(0)
    config = ALL_CONFIGS[family](tied)
    # an MoE model's last stage returns (logits, aux loss): pp-ext's training loss adds them
    loss_fn = shifted_loss if family in CONFIGS else LanguageModelLoss(router_loss_coef(config))
    hf = reference_model(config)  # DeepSeek-V3's router bias nonzero
    draw_expert_biases(hf, config.initializer_range)
    base = {k: v.clone() for k, v in hf.state_dict().items()}
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=targets,
        modules_to_save=whole,
        target_parameters=parameters,
        task_type="CAUSAL_LM",
        init_lora_weights=False,  # B random too: the first step moves A as well
        fan_in_fan_out=family == "gpt2",  # GPT-2's Conv1D: as pp-ext's lora_config says
    )
    torch.manual_seed(1)  # the same reference adapter on every rank
    with peft_model_warnings():  # peft's own, about its MoE conversion's rank pattern
        reference = get_peft_model(copy.deepcopy(hf), LoraConfig(**lora.to_dict()))
    folder = tempfile.mkdtemp()
    reference.save_pretrained(folder)
    initial = {k: v.clone() for k, v in get_peft_model_state_dict(reference).items()}

    spec = None if schedule == BASELINE else get(schedule)
    module = ChunkedPipelineModule(
        layers=layer_specs(config),
        num_stages=2,
        loss_fn=loss_fn,
        chunks=1 if spec is None else spec.default_chunks,
        placement="loop" if spec is None else spec.placement,
        partition_method="type:layer",  # one decoder layer per stage: both have adapters
        activation_checkpoint_interval=interval,
    )
    copy_hf_weights(local_layers(module), hf.state_dict())
    layers = add_adapters(indexed_layers(module), Targets.of(lora, config), seed=0)
    load_adapter(layers, folder)
    module.parameters_changed()
    trainable = [p for p in module.parameters() if p.requires_grad]
    engine, optimizer, *_ = pp_ext.initialize(
        model=module,
        optimizer=torch.optim.AdamW(trainable, lr=LR),
        config={
            "train_micro_batch_size_per_gpu": 2,
            "gradient_accumulation_steps": MICRO_BATCHES,
            "train_batch_size": 2 * MICRO_BATCHES,
            "gradient_clipping": CLIP,
        },
        schedule=schedule,
    )
    losses = [
        float(engine.train_batch(iter([batch(s, k) for k in range(MICRO_BATCHES)])))
        for s in range(STEPS)
    ]

    params = [p for p in reference.parameters() if p.requires_grad]
    ref_optimizer = torch.optim.AdamW(params, lr=LR)
    ref_losses = []
    for s in range(STEPS):
        ref_optimizer.zero_grad()
        total = 0.0
        for k in range(MICRO_BATCHES):
            ids, _ = batch(s, k)
            loss = reference(input_ids=ids, labels=ids, use_cache=False).loss / MICRO_BATCHES
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        ref_optimizer.step()
        ref_losses.append(total)

    trained = get_peft_model_state_dict(reference)
    ours = {
        key: dict(layer.named_parameters())[n].detach()  # float() of a grad tensor warns
        for layer in layers
        for n, key in peft_keys(layer).items()
    }
    adapter_diff = max(float((ours[k] - trained[k]).abs().max()) for k in ours)
    moved = min(float((trained[k] - initial[k]).abs().max()) for k in ours)
    base_changed = [
        hf_name
        for layer in layers
        for local, hf_name in layer.hf_keys().items()
        if not is_adapter(local)
        and not dict(layer.named_parameters()).get(local, torch.empty(0)).requires_grad
        and not torch.equal(layer.state_dict()[local], base[hf_name.replace(BASE, "")])
    ]
    state_numel = sum(
        t.numel() for state in optimizer.state.values() for t in state.values() if t.dim() > 0
    )
    return {
        "case": (family, schedule, tied, interval),
        "losses": losses,
        "ref_losses": ref_losses,
        "adapter_diff": adapter_diff,
        "adapters": len(ours),
        "keys": sorted(ours),  # over the ranks: every tensor PEFT trains (none dropped)
        "ref_keys": sorted(trained),
        "moved": moved,  # every adapter tensor trained: the comparison is not of two inits
        "base_changed": base_changed,
        # AdamW keeps two moments per trainable element, and nothing for the frozen base
        "state_ok": state_numel == 2 * sum(p.numel() for p in trainable),
        "trainable_share": sum(p.numel() for p in trainable)
        / sum(p.numel() for p in module.parameters()),
    }


def run_cases(rank: int, world: int, cases: list) -> list[dict]:
    return [run_case(*case) for case in cases]


@pytest.mark.slow
def test_two_stage_lora_training_equals_peft():
    from pp_ext.testing.spawn import spawn

    failures = []
    ranks = spawn(run_cases, 2, CASES, timeout=400)
    for case, *results in zip(CASES, *ranks):
        if {k for r in results for k in r["keys"]} != set(results[0]["ref_keys"]):
            failures.append(f"{case}: the stages' adapters are not PEFT's")
    for rank, results in enumerate(ranks):
        for r in results:
            loss_diff = max(abs(a - b) for a, b in zip(r["losses"], r["ref_losses"]))
            problems = [
                f"loss diff {loss_diff:.2e}" if loss_diff > TOLERANCE else "",
                f"adapter diff {r['adapter_diff']:.2e}" if r["adapter_diff"] > TOLERANCE else "",
                "no adapters" if not r["adapters"] else "",
                f"an adapter did not train ({r['moved']:.1e})" if r["moved"] < 1e-4 else "",
                f"base changed: {r['base_changed'][:2]}" if r["base_changed"] else "",
                "optimizer state not sized by the adapters" if not r["state_ok"] else "",
            ]
            if any(problems):
                failures.append(f"rank {rank} {r['case']}: {', '.join(p for p in problems if p)}")
    assert not failures, "\n".join(failures)
