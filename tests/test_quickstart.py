"""The quickstart's figure (issue 25, point 6): recipes/quickstart.yaml ends on the
plateau of its answer accuracy, not in the middle of the loss's sharp drop, so the
figure a newcomer reads does not hang on the seed or on the last bits of rounding."""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import pytest
from train_cases import RECIPE, ROOT

# The lowest of the 6 step-200 accuracies measured (README: train.seed 1234, 1, 2 x the
# fused and the unfused loss) was 0.9970 (seed 2, unfused); the old recipe (lr 3e-3 to 3e-4, warm-up 20)
# gave 0.8825 at seed 2 with the unfused log-sum-exp: still in the middle of the drop.
PLATEAU = 0.99


def log_sum_exp_loss(logits, labels, axis, ignore_index):
    """Mean cross-entropy unfused, as Megatron's vocabulary-parallel loss computes it on
    one rank: ``log(sum(exp(logits - max))) - (logits[label] - max)`` over the labelled
    tokens. The same loss as torch's fused ``cross_entropy`` within 1e-5, rounded
    otherwise (pp-ext uses it with more than one tensor rank)."""
    logits = logits.reshape(-1, logits.size(-1)).float()
    labels = labels.reshape(-1)
    labelled = labels != ignore_index
    shifted = logits - logits.detach().max(dim=-1, keepdim=True).values
    target = shifted.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1)
    losses = shifted.exp().sum(dim=-1).log() - target
    return losses.masked_fill(~labelled, 0.0).sum() / labelled.sum().clamp(min=1)


def last_accuracy(rank: int, world: int, out: str, overrides: list[str]) -> float | None:
    """The quickstart recipe trained with :func:`log_sum_exp_loss`; rank 0 returns the
    last answer accuracy in metrics.jsonl (what ``pp-ext report`` prints)."""
    os.chdir(ROOT)  # the recipe's paths are relative to the repository
    import pp_ext.tp
    from pp_ext.commands.report import read_metrics
    from pp_ext.training.entry import main

    with mock.patch.object(pp_ext.tp, "vocab_parallel_cross_entropy", log_sum_exp_loss):
        code = main(["--recipe", str(RECIPE), *overrides, f"output_dir={out}"])
    assert code == 0, code
    return read_metrics(Path(out))[1][-1]["eval_accuracy"] if rank == 0 else None


@pytest.mark.slow
def test_the_quickstart_ends_on_its_plateau_under_another_rounding(tmp_path):
    from pp_ext.testing.spawn import spawn

    overrides = ["train.seed=2", "logging.progress=false"]
    accuracy = spawn(last_accuracy, 2, str(tmp_path), overrides, timeout=600)[0]
    assert accuracy >= PLATEAU, accuracy
