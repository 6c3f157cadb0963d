"""The training loss of a causal language model, on the last pipeline stage."""

from __future__ import annotations

import torch

from pp_ext import tp
from pp_ext.data import IGNORE_INDEX
from pp_ext.training.accuracy import answer_counts


class LanguageModelLoss:
    """Mean cross-entropy over the labelled tokens of a micro-batch (labels already
    shifted; -100 ignored), as HF's causal-LM loss, on logits sharded by vocabulary over
    ``tensor_axis`` (the module's; whole logits with one tensor rank) without gathering
    them (:func:`pp_ext.tp.vocab_parallel_cross_entropy`). While ``collect`` is on it
    also counts answers right (:func:`pp_ext.training.accuracy.answer_counts`) for evaluation.

    An MoE model with its router loss on (:func:`pp_ext.hf.moe.router_loss_coef`) ends in
    ``(logits, aux_loss)``: the loss is then ``lm + aux_coef * aux``, as HF's MoE models add
    it, and ``parts`` keeps the two apart, one pair per training micro-batch, for
    ``metrics.jsonl``."""

    def __init__(self, aux_coef: float | None = None) -> None:
        self.collect = False
        self.counts = [0.0, 0.0]  # answers right, answers
        self.tensor_axis = tp.TensorAxis()
        self.aux_coef = aux_coef
        self.parts: list[torch.Tensor] = []  # (LM loss, aux loss) of each micro-batch

    def __call__(self, outputs, labels):
        logits, aux = outputs if isinstance(outputs, tuple) else (outputs, None)
        loss = tp.vocab_parallel_cross_entropy(logits, labels, self.tensor_axis, IGNORE_INDEX)
        if self.collect:  # evaluation only: arg-max needs the whole vocabulary
            right, total = answer_counts(
                tp.gather_last_dim(logits, self.tensor_axis), labels
            ).tolist()
            self.counts[0] += right
            self.counts[1] += total
        if aux is None:
            return loss
        if self.aux_coef is None:
            raise ValueError(
                "the model returns a router loss but LanguageModelLoss has no aux_coef: pass "
                "pp_ext.hf.router_loss_coef(config)"
            )
        if torch.is_grad_enabled():  # a training micro-batch; no host read here
            self.parts.append(torch.stack([loss.detach(), aux.detach()]))
        return loss + self.aux_coef * aux
