"""Tensor parallelism (Megatron, Shoeybi et al. 2019, Sec. 3) on the pipeline grid's
model axis, combined with pipeline and data parallelism (Narayanan et al. 2021).

Fast tests: the cut and merge of (fused) tensors, from tensors and safetensors
slices; the local configs; one-line errors. The slow test is one launch of 4 gloo
ranks: pipe 2 x tensor 2, tensor 2 x data 2 and pipe 2 x data 2, Llama- and
Qwen-family models (plus Phi3's fused projections and GPT-NeoX), zero-bubble
schedules included, loaded by slices from HF folders, gradients clipped by the
global norm; each matches single-process HF training over 3 steps within 1e-5, and a tensor-parallel checkpoint exported to a HF
folder gives the pipeline's logits.
"""
from __future__ import annotations

import functools

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pp_ext import tp

from hf_models import CONFIGS

TOLERANCE = 1e-5
MICRO_BATCHES = 4
CLIP = 0.5  # bites on every step: a norm counting a replicated or tied weight twice would show


def test_split_take_and_merge_fused_sections(tmp_path):
    whole = torch.arange(8 * 3 * 2.0).reshape(24, 2)  # [q (8 rows); k (8); v (8)]
    parts = [tp.Split(0, (8, 8, 8), 2, rank).take(whole) for rank in range(2)]
    assert torch.equal(parts[0], torch.cat([whole[0:4], whole[8:12], whole[16:20]]))
    assert torch.equal(tp.Split(0, (8, 8, 8), 2, 0).merge(parts), whole)
    save_file({"w": whole}, tmp_path / "w.safetensors")
    with safe_open(tmp_path / "w.safetensors", "pt") as handle:  # a rank reads its part only
        assert torch.equal(tp.Split(0, (8, 8, 8), 2, 1).take(handle.get_slice("w")), parts[1])
    rows = tp.Split(1, (2,), 2, 1)
    assert torch.equal(rows.take(whole), whole[:, 1:]) and rows.whole_shape(torch.Size([24, 1])) == (24, 2)
    with pytest.raises(ValueError, match="cannot cut sections \\[9\\] into 2 equal"):
        tp.Split(0, (9,), 2, 0)


def test_local_config_keeps_head_dim():
    config = CONFIGS["qwen3"](False)
    local = tp.local_config(config, 2)
    assert (local.num_attention_heads, local.num_key_value_heads, local.intermediate_size, local.head_dim) == \
        (2, 1, 32, 8)
    assert tp.local_config(config, 1) is config and config.num_attention_heads == 4
    assert tp.describe(config, 2) == ("each tensor rank holds 2 of 4 heads, 1 of 2 key/value heads, "
                                      "32 of 64 MLP features, 50 of 100 vocabulary rows")


@pytest.mark.parametrize("family,tensor,message", [
    ("llama", 4, "num_key_value_heads=2, which does not divide by tensor=4: choose a tensor size"),
    ("llama", 3, "num_attention_heads=4, which does not divide by tensor=3"),
    ("gpt2", 2, "no sharding plan for 'gpt2' models .*: set parallel.tensor=1"),
])
def test_split_errors(family, tensor, message):
    with pytest.raises(ValueError, match=message) as err:
        tp.check_tensor_split(CONFIGS[family](False), tensor)
    assert "\n" not in str(err.value)


def test_vocabulary_must_divide():
    config = CONFIGS["llama"](False)
    config.vocab_size = 101
    with pytest.raises(ValueError, match="vocab_size=101 does not divide by tensor=2 .*pad_to_multiple_of=2"):
        tp.check_tensor_split(config, 2)


# ---------------------------------------------------------------- 4 ranks, one launch

# (family, tied, (pipe, tensor, data), schedule, export)
CASES = [
    ("llama", True, (2, 2, 1), "zbv", True),
    ("qwen2", False, (2, 2, 1), "zb-h1", False),
    ("qwen3", False, (2, 2, 1), "1f1b", False),
    ("llama", False, (1, 2, 2), "zb-h1", False),
    ("qwen3", True, (1, 2, 2), "1f1b", False),
    ("qwen2", True, (2, 1, 2), "zbv", False),
    ("llama", False, (2, 1, 2), "zb-h1", False),
    ("phi3", False, (2, 2, 1), "zb-h1", False),
    ("gpt_neox", True, (2, 2, 1), "1f1b", False),
]


def batch(step: int, micro_batch: int):
    ids = torch.randint(100, (2, 10), generator=torch.Generator().manual_seed(100 * step + micro_batch))
    return ids, torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)


def reference_training(model, data: int) -> tuple[list[float], list[float]]:
    """Single-process HF training on every data rank's micro-batches: the mean loss and
    the gradient norm (before clipping) of each step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses, norms = [], []
    for step in range(3):
        optimizer.zero_grad()
        total = 0.0
        for k in range(MICRO_BATCHES * data):
            ids, _ = batch(step, k)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss / (MICRO_BATCHES * data)
            loss.backward()
            total += float(loss.detach())
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        optimizer.step()
        losses.append(total)
    return losses, norms


def loss_fn(logits, labels, axis):
    return tp.vocab_parallel_cross_entropy(logits, labels, axis)


def run_case(tmp, case) -> dict:
    import torch.distributed as dist
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    from transformers import AutoModelForCausalLM

    import pp_ext
    from pp_ext.hf import build_pipeline_module, export_checkpoint, save_hf_metadata
    from pp_ext.schedules import get

    family, tied, (pipe, tensor, data), schedule, export = case
    folder = f"{tmp}/{family}-{tied}-{pipe}{tensor}{data}-{schedule}"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[family](tied)).float()
    if dist.get_rank() == 0:
        model.save_pretrained(f"{folder}/hf")
    dist.barrier()
    spec = get(schedule)
    module = build_pipeline_module(f"{folder}/hf", topology=PipeModelDataParallelTopology(pipe, tensor, data),
                                   chunks=spec.default_chunks, placement=spec.placement, partition_method="uniform")
    axis = module.tensor_axis
    module.loss_fn = functools.partial(loss_fn, axis=axis)
    engine, *_ = pp_ext.initialize(
        model=module, optimizer=torch.optim.SGD(module.parameters(), lr=0.1),
        config={"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": MICRO_BATCHES,
                "train_batch_size": 2 * MICRO_BATCHES * data, "gradient_clipping": CLIP}, schedule=schedule)
    dp = engine.grid.get_data_parallel_rank()
    losses, norms = [], []
    for step in range(3):
        data_iter = iter([batch(step, dp * MICRO_BATCHES + k) for k in range(MICRO_BATCHES)])
        losses.append(float(engine.train_batch(data_iter)))
        norms.append(float(engine._step_grad_norm))  # the norm the engine clipped by
    result = {"case": case, "losses": losses, "norms": norms}
    result["ref_losses"], result["ref_norms"] = reference_training(model, data)
    if export:
        engine.save_checkpoint(f"{folder}/ckpt", tag="t")
        if dist.get_rank() == 0:
            save_hf_metadata(f"{folder}/ckpt/t", model.config)  # no tokenizer needed
            export_checkpoint(f"{folder}/ckpt", f"{folder}/out", tag="t")
        dist.barrier()
        probe = batch(7, 0)
        logits = engine.eval_batch(iter([probe]), return_logits=True, compute_loss=False, num_micro_batches=1)[1]
        if engine.is_last_stage():
            exported = AutoModelForCausalLM.from_pretrained(f"{folder}/out").eval()
            with torch.no_grad():
                want = exported(input_ids=probe[0]).logits
            result["export_diff"] = float((tp.gather_last_dim(logits, axis) - want).abs().max())
            # the export equals the trained reference model too
            result["export_vs_ref"] = float((want - model.eval()(input_ids=probe[0]).logits).abs().max())
    return result


def run_cases(rank: int, world: int, tmp: str, cases: list) -> list[dict]:
    return [run_case(tmp, case) for case in cases]


def main() -> None:
    """Print each case's largest loss difference (what the slow test asserts)."""
    import sys
    import tempfile

    from pp_ext.engine.spawn import spawn

    with tempfile.TemporaryDirectory() as tmp:
        for results in spawn(run_cases, 4, tmp, CASES, timeout=900)[:1]:
            for r in results:
                diff = max(abs(a - b) for a, b in zip(r["losses"], r["ref_losses"]))
                norm_diff = max(abs(a - b) for a, b in zip(r["norms"], r["ref_norms"]))
                print(r["case"], f"losses {[round(x, 4) for x in r['losses']]} max diff {diff:.1e}, norms "
                      f"{[round(x, 3) for x in r['norms']]} max diff {norm_diff:.1e}", file=sys.stderr)


if __name__ == "__main__":
    main()


@pytest.mark.slow
def test_pipe_tensor_data_training_equals_hf(tmp_path):
    from pp_ext.engine.spawn import spawn

    failures, exports = [], 0
    for rank, results in enumerate(spawn(run_cases, 4, str(tmp_path), CASES, timeout=900)):
        for r in results:
            diff = max(abs(a - b) for a, b in zip(r["losses"], r["ref_losses"]))
            norm_diff = max(abs(a - b) for a, b in zip(r["norms"], r["ref_norms"]))
            if max(diff, norm_diff) > TOLERANCE:
                failures.append(f"rank {rank} {r['case']}: loss diff {diff:.2e} ({r['losses']} vs {r['ref_losses']}), "
                                f"gradient norm diff {norm_diff:.2e}")
            if "export_diff" in r:
                exports += 1
                if max(r["export_diff"], r["export_vs_ref"]) > TOLERANCE:
                    failures.append(f"rank {rank} {r['case']}: exported logits differ by {r['export_diff']:.2e} "
                                    f"from the pipeline's, {r['export_vs_ref']:.2e} from the reference's")
    assert not failures, "\n".join(failures)
    assert exports == 2  # both tensor ranks of the last stage compared
