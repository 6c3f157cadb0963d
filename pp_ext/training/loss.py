"""The training loss of a causal language model, on the last pipeline stage."""

from __future__ import annotations

from pp_ext import tp
from pp_ext.data import IGNORE_INDEX
from pp_ext.training.accuracy import answer_counts


class LanguageModelLoss:
    """Mean cross-entropy over the labelled tokens of a micro-batch (labels already
    shifted; -100 ignored), as HF's causal-LM loss, on logits sharded by vocabulary over
    ``tensor_axis`` (the module's; whole logits with one tensor rank) without gathering
    them (:func:`pp_ext.tp.vocab_parallel_cross_entropy`). While ``collect`` is on it
    also counts answers right (:func:`pp_ext.training.accuracy.answer_counts`) for evaluation."""

    def __init__(self) -> None:
        self.collect = False
        self.counts = [0.0, 0.0]  # answers right, answers
        self.tensor_axis = tp.TensorAxis()

    def __call__(self, logits, labels):
        loss = tp.vocab_parallel_cross_entropy(logits, labels, self.tensor_axis, IGNORE_INDEX)
        if self.collect:  # evaluation only: arg-max needs the whole vocabulary
            right, total = answer_counts(
                tp.gather_last_dim(logits, self.tensor_axis), labels
            ).tolist()
            self.counts[0] += right
            self.counts[1] += total
        return loss
