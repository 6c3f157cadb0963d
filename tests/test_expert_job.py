"""The training job with expert parallelism (issue 24 item 3): a tiny Mixtral at pipe 1 x
data 2, its experts over 2 ranks (``parallel.expert=2``) against the same run at
``expert=1``, in one launch of 2 gloo ranks: the same losses, checkpoints holding every
expert once (one file per layer and global expert, the same rows as the ``expert=1``
checkpoint's fused tensors), resume from step 2 under the same and the other expert
size, and from and to pipeline 2 (weights and AdamW state moved by expert index) giving
the uninterrupted losses,
and the end-of-training export equal to the ``expert=1`` run's, through from_pretrained."""

from __future__ import annotations

import pytest
import torch
from hf_models import MOE_CONFIGS
from train_cases import ROOT, train_cases

TIGHT = 1e-6  # fp32: the all-to-all moves rows, the grouped GEMMs see the same rows
RUN = ["train.steps=4", "checkpoint.interval=2", "checkpoint.keep=0"]
AT_2 = "checkpoints/step-00000002"


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


@pytest.mark.slow
def test_expert_parallel_job(tmp_path):
    from transformers import AutoModelForCausalLM

    from pp_ext.testing.spawn import spawn

    config = MOE_CONFIGS["mixtral"](False)
    config.vocab_size = 103  # the quickstart tokenizer's
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).float().save_pretrained(tmp_path / "model")
    model = [
        f"model.path={tmp_path / 'model'}",
        f"model.tokenizer={ROOT}/configs/models/quickstart",
    ]
    e1, e2, p2 = tmp_path / "e1", tmp_path / "e2", tmp_path / "p2"
    data_2 = [*model, *RUN, "parallel.pipeline=1", "parallel.micro_batches=2"]
    pipe_2 = [*model, *RUN, "parallel.pipeline=2", "parallel.micro_batches=4"]  # the same batch
    cases = [
        ("e1", [*data_2, "parallel.expert=1"]),
        ("e2", [*data_2, "parallel.expert=2"]),
        ("p2", pipe_2),
        ("e2-e2", [*data_2, "parallel.expert=2", f"checkpoint.resume={e2 / AT_2}"]),
        ("e2-e1", [*data_2, "parallel.expert=1", f"checkpoint.resume={e2 / AT_2}"]),
        ("e1-e2", [*data_2, "parallel.expert=2", f"checkpoint.resume={e1 / AT_2}"]),
        ("e2-p2", [*pipe_2, f"checkpoint.resume={e2 / AT_2}"]),  # pipe 1 x expert 2 -> pipe 2
        ("p2-e2", [*data_2, "parallel.expert=2", f"checkpoint.resume={p2 / AT_2}"]),
        ("bf16", [*data_2, "parallel.expert=2", "deepspeed.bases=[zero1-fp32]"]),
    ]
    results = spawn(train_cases, 2, str(tmp_path), cases, timeout=900)[0]
    codes = {name: code for name, (code, _) in results.items()}
    assert codes == {**dict.fromkeys(codes, 0), "bf16": 2}, codes
    whole = results["e1"][1]
    assert sorted(whole) == [1, 2, 3, 4]
    for name in ("e2", "p2"):
        assert max(abs(results[name][1][s] - whole[s]) for s in whole) <= TIGHT, results
    for name in ("e2-e2", "e2-e1", "e1-e2", "e2-p2", "p2-e2"):
        resumed = results[name][1]
        assert sorted(resumed) == [3, 4], (name, resumed)
        assert max(abs(resumed[s] - whole[s]) for s in resumed) <= TIGHT, (name, results)

    # every expert once, by global index: 4 experts x 2 MoE layers, as the expert=1 rows
    for step in ("step-00000002", "step-00000004"):
        sharded = sorted((e2 / "checkpoints" / step).glob("layer_*_expert_*_model_states.pt"))
        assert len(sharded) == 2 * config.num_local_experts
        want, got = (checkpoint_experts(run / "checkpoints" / step) for run in (e1, e2))
        assert want.keys() == got.keys() and len(want) == 2 * 2
        assert max(float((want[k] - got[k]).abs().max()) for k in want) <= TIGHT

    exported = [AutoModelForCausalLM.from_pretrained(run / "hf").state_dict() for run in (e1, e2)]
    assert exported[0].keys() == exported[1].keys()
    assert max(float((exported[0][k] - exported[1][k]).abs().max()) for k in exported[0]) <= TIGHT
