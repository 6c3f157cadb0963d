"""The training job with expert parallelism (issue 24 item 3): a tiny Mixtral at pipe 1 x
data 2, its experts over 2 ranks (``parallel.expert=2``) against the same run at
``expert=1``, in one launch of 2 gloo ranks: the same losses, checkpoints holding every
expert once (one file per layer and global expert, the same rows as the ``expert=1``
checkpoint's fused tensors), resume from step 2 under the same and the other expert
size giving the uninterrupted losses, and the end-of-training export equal to the
``expert=1`` run's, through from_pretrained. Under ZeRO-1 (fp32, equal to the fp32 run
within 1e-6): resume to pipeline 2 and from it back into expert 2 (weights, master
weights and AdamW state moved by expert index); under bf16 (BF16_Optimizer): expert 2
against expert 1 no further apart than bf16 from its fp32 twin, the same-layout resume
bitwise, expert 2 -> 1 within the twin gap. The expert files hold each expert's own
AdamW moments (those of the fp32 run) and, bf16 / ZeRO, its fp32 master weight. LoRA
(attention and the fused experts by target_parameters): expert 2 trains as expert 1
(losses, every exported adapter), resumes 2 -> 1 -> 2 exactly, its expert files hold
the adapters only, and its export loads in PEFT with the trained pipeline's logits."""

from __future__ import annotations

import pytest
import torch
from hf_checks import TOL, ids, max_diff
from hf_models import MOE_CONFIGS
from train_cases import ROOT, train_cases

TIGHT = 1e-6  # fp32: the all-to-all moves rows, the grouped GEMMs see the same rows
RUN = ["train.steps=4", "checkpoint.interval=2", "checkpoint.keep=0"]
AT_2, AT_3 = "checkpoints/step-00000002", "checkpoints/step-00000003"
ZERO, BF16 = "deepspeed.bases=[zero1-fp32]", "deepspeed.bases=[zero1-bf16]"
LORA = [
    "peft.type=lora",
    "peft.r=4",
    "peft.lora_alpha=8",
    "peft.target_modules=[q_proj,v_proj]",
    "peft.target_parameters=[experts.gate_up_proj,experts.down_proj]",
]


def checkpoint_experts(tag_dir) -> dict[str, torch.Tensor]:
    """Every layer's fused expert tensors of a checkpoint, read as saved: whole in the
    layer files (``expert: 1``), or stacked from the per-expert files in index order."""
    from pp_ext.checkpoint.experts import weight_files

    out = {}
    for path in sorted(tag_dir.glob("layer_*-model_states.pt")):
        idx = int(path.name[6:8])
        state = torch.load(path, map_location="cpu", weights_only=True)
        rows = weight_files(tag_dir, idx)
        if rows:
            parts = [torch.load(f, map_location="cpu", weights_only=True) for f in rows]
            state.update({k: torch.cat([p[k] for p in parts]) for k in parts[0]})
        out.update({f"{idx}.{k}": v for k, v in state.items() if ".experts." in k})
    return out


def expert_states(tag_dir) -> dict[tuple[str, int, str], torch.Tensor]:
    """``(name, expert, key)`` -> that expert's row of each saved optimizer state tensor
    (AdamW's moments; the fp32 master under bf16 / ZeRO) in a checkpoint's expert files."""
    from pp_ext.checkpoint.experts import optim_file, weight_files

    out = {}
    for idx in range(100):
        for j in range(len(weight_files(tag_dir, idx))):
            saved = torch.load(optim_file(tag_dir, idx, j), map_location="cpu", weights_only=False)
            for name, state in saved.items():
                out.update(
                    {
                        (f"{idx}.{name}", j, k): v
                        for k, v in state.items()
                        if torch.is_tensor(v) and v.dim()
                    }
                )
    return out


def relative(got: dict, want: dict) -> float:
    """The largest difference of ``got`` from ``want`` (the same keys), in ``want``'s scale."""
    assert got.keys() == want.keys() and got, (sorted(got), sorted(want))
    return max(float((got[k] - want[k]).abs().max() / want[k].abs().max()) for k in want)


def gap(a: dict[int, float], b: dict[int, float]) -> float:
    assert sorted(a) == sorted(b), (a, b)
    return max(abs(a[s] - b[s]) for s in a)


@pytest.mark.slow
def test_expert_parallel_job(tmp_path):
    from peft import LoraConfig
    from safetensors.torch import load_file
    from test_peft_job import peft_logits, pipeline_logits
    from transformers import AutoModelForCausalLM

    from pp_ext.peft import Targets
    from pp_ext.testing.spawn import spawn

    config = MOE_CONFIGS["mixtral"](False)
    config.vocab_size = 103  # the quickstart tokenizer's
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).float().save_pretrained(tmp_path / "model")
    model = [
        f"model.path={tmp_path / 'model'}",
        f"model.tokenizer={ROOT}/configs/models/quickstart",
    ]
    e1, e2, b1, b2 = (tmp_path / name for name in ("e1", "e2", "b1", "b2"))
    z2, pz = tmp_path / "z2", tmp_path / "pz"
    data_2 = [*model, *RUN, "parallel.pipeline=1", "parallel.micro_batches=2"]
    pipe_2 = [*model, *RUN, "parallel.pipeline=2", "parallel.micro_batches=4"]  # the same batch
    z_data_2, b_data_2, l_data_2 = [*data_2, ZERO], [*data_2, BF16], [*data_2, *LORA]
    l2, resume = tmp_path / "l2", "checkpoint.resume="
    cases = [
        ("e1", [*data_2, "parallel.expert=1"]),
        ("e2", [*data_2, "parallel.expert=2"]),
        ("e2-e2", [*data_2, "parallel.expert=2", f"checkpoint.resume={e2 / AT_2}"]),
        ("e2-e1", [*data_2, "parallel.expert=1", f"checkpoint.resume={e2 / AT_2}"]),
        ("e1-e2", [*data_2, "parallel.expert=2", f"checkpoint.resume={e1 / AT_2}"]),
        # ZeRO-1 (fp32): expert 2; pipeline 1 x expert 2 -> pipeline 2 (expert 1) at step 2,
        # saving step 3, which pipeline 1 x expert 2 resumes
        ("z2", [*z_data_2, "parallel.expert=2"]),
        ("pz", [*pipe_2, ZERO, "checkpoint.interval=1", f"checkpoint.resume={z2 / AT_2}"]),
        ("pz-z2", [*z_data_2, "parallel.expert=2", f"checkpoint.resume={pz / AT_3}"]),
        # bf16 (BF16_Optimizer): expert 1 (the twin of e1), expert 2, resumed as 2 and 1
        ("b1", [*b_data_2, "parallel.expert=1"]),
        ("b2", [*b_data_2, "parallel.expert=2"]),
        ("b2-b2", [*b_data_2, "parallel.expert=2", f"checkpoint.resume={b2 / AT_2}"]),
        ("b2-b1", [*b_data_2, "parallel.expert=1", f"checkpoint.resume={b2 / AT_2}"]),
        # LoRA (attention and the fused experts): expert 1, expert 2, resumed from step 2 into
        # expert 1 (saving step 3), and from it back into expert 2
        ("l1", [*l_data_2, "parallel.expert=1"]),
        ("l2", [*l_data_2, "parallel.expert=2"]),
        (
            "l2-l1",
            [*l_data_2, "parallel.expert=1", "checkpoint.interval=1", f"{resume}{l2 / AT_2}"],
        ),
        ("l2-l1-l2", [*l_data_2, "parallel.expert=2", f"{resume}{tmp_path / 'l2-l1' / AT_3}"]),
    ]
    results = spawn(train_cases, 2, str(tmp_path), cases, timeout=900)[0]
    codes = {name: code for name, (code, _) in results.items()}
    assert codes == dict.fromkeys(codes, 0), codes
    loss = {name: result[1] for name, result in results.items()}
    whole = loss["e1"]
    assert sorted(whole) == [1, 2, 3, 4]
    for name in ("e2", "z2"):
        assert gap(loss[name], whole) <= TIGHT, (name, results)
    for name, steps in [*((n, [3, 4]) for n in ("e2-e2", "e2-e1", "e1-e2", "pz")), ("pz-z2", [4])]:
        resumed = loss[name]
        assert sorted(resumed) == steps, (name, resumed)
        assert max(abs(resumed[s] - whole[s]) for s in resumed) <= TIGHT, (name, results)
    twin = gap(loss["b1"], whole)  # bf16 against its fp32 twin
    assert 0 < twin and gap(loss["b2"], loss["b1"]) <= twin, results
    assert loss["b2-b2"] == {s: loss["b2"][s] for s in (3, 4)}, results  # every bit restored
    resumed = {s: loss["b2"][s] for s in (3, 4)}
    assert gap(loss["b2-b1"], resumed) <= twin, results
    print(
        f"fp32 ZeRO-1 vs fp32: {gap(loss['z2'], whole):.1e}; bf16 "
        f"expert 2 vs 1: {gap(loss['b2'], loss['b1']):.1e} (twin {twin:.1e}), resumed 2 -> 1: "
        f"{gap(loss['b2-b1'], resumed):.1e}"
    )

    # each expert's AdamW moments (and, bf16 / ZeRO, fp32 master) saved once, by its index
    for step in ("step-00000002", "step-00000004"):
        plain, zero, bf16 = (expert_states(run / "checkpoints" / step) for run in (e2, z2, b2))
        master = {key: zero.pop(key) for key in list(zero) if key[2] == "fp32"}
        assert relative(zero, plain) <= 1e-5, step
        weights = checkpoint_experts(e2 / "checkpoints" / step)
        rows = {(n, j, "fp32"): weights[n][j : j + 1] for n, j, k in plain if k == "exp_avg"}
        assert relative(master, rows) <= 1e-5, step
        # bf16: the weights saved are the fp32 masters saved, rounded
        lp = checkpoint_experts(b2 / "checkpoints" / step)
        hp = {(n, j, k): v.bfloat16() for (n, j, k), v in bf16.items() if k == "fp32"}
        assert len(hp) == 2 * 2 * config.num_local_experts and all(
            torch.equal(lp[n][j : j + 1], v) for (n, j, _), v in hp.items()
        ), step

    # every expert once, by global index: 4 experts x 2 MoE layers, as the expert=1 rows
    for step in ("step-00000002", "step-00000004"):
        for run in (e2, z2, b2):
            sharded = sorted((run / "checkpoints" / step).glob("layer_*_expert_*_model_states.pt"))
            assert len(sharded) == 2 * config.num_local_experts
        want, *got = (checkpoint_experts(run / "checkpoints" / step) for run in (e1, e2, z2))
        for each in got:
            assert want.keys() == each.keys() and len(want) == 2 * 2
            assert max(float((want[k] - each[k]).abs().max()) for k in want) <= TIGHT

    exported = {
        run.name: AutoModelForCausalLM.from_pretrained(run / "hf").state_dict()
        for run in (e1, e2, z2, b1, b2)
    }

    def apart(a: str, b: str) -> float:
        assert exported[a].keys() == exported[b].keys()
        return max(float((exported[a][k] - exported[b][k]).abs().max()) for k in exported[a])

    assert apart("e2", "e1") <= TIGHT and apart("z2", "e1") <= TIGHT
    assert apart("b2", "b1") <= apart("b1", "e1")

    # LoRA: expert 2 trains as expert 1 (losses; every adapter, the experts' merged from
    # the ranks' rows and strided columns, exported in PEFT's layout) and resumes across
    for name, steps in (("l2", [1, 2, 3, 4]), ("l2-l1", [3, 4]), ("l2-l1-l2", [4])):
        assert sorted(loss[name]) == steps, (name, results)
        assert gap(loss[name], {s: loss["l1"][s] for s in steps}) <= TIGHT, (name, results)
    adapters = {
        run: load_file(tmp_path / run / "hf/adapter_model.safetensors")
        for run in ("l1", "l2", "l2-l1", "l2-l1-l2")
    }
    trained = {k: v for k, v in adapters["l1"].items() if ".experts." in k and ".lora_B." in k}
    assert len(trained) == 2 * 2 and all(v.abs().max() > 1e-3 for v in trained.values())
    adapter_gaps = {
        run: max(float((adapters[run][k] - v).abs().max()) for k, v in adapters["l1"].items())
        for run in adapters
        if adapters[run].keys() == adapters["l1"].keys()
    }
    assert len(adapter_gaps) == 4 and max(adapter_gaps.values()) <= TIGHT, adapter_gaps
    # an expert file holds that expert's adapters only (the frozen experts are the base's)
    saved = torch.load(l2 / AT_2 / "layer_01_expert_3_model_states.pt", weights_only=True)
    assert sorted(saved) == sorted(
        f"layer.mlp.experts.{inner}lora_{f}.default.weight"
        for inner in ("", "base_layer.")
        for f in "AB"
    ), sorted(saved)
    # PEFT loads expert 2's export on the HF model: the trained pipeline's logits (expert 1's
    # checkpoint, its layer files chained in one process)
    lora_config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
        task_type="CAUSAL_LM",
    )
    config.output_router_logits = False  # the chained layers give the logits alone
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "model").state_dict()
    x = ids()
    expected = pipeline_logits(
        tmp_path / "l1" / "checkpoints/step-00000004",
        base,
        config,
        Targets.of(lora_config, config),
        x,
    )
    for run in ("l2", "l2-l1-l2"):
        got, _ = peft_logits(tmp_path / run / "hf", x)
        assert max_diff(got, expected) <= TOL, run
    print(
        f"LoRA expert 2 vs 1: losses {gap(loss['l2'], loss['l1']):.1e}, adapters "
        + ", ".join(f"{run} {value:.1e}" for run, value in adapter_gaps.items())
    )
