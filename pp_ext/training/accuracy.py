"""Exact-match answer accuracy from teacher-forced logits (pure torch).

An *answer* is a maximal run of labelled positions (labels != -100) in a row: one
completion (plus its EOS) of a prompt/completion record, or one assistant turn of a
chat. Runs never touch across records, because the last token of a record has no
label (:mod:`pp_ext.data.batches`), so packed rows hold several answers.

An answer counts as right when the argmax of the logits is its label at every one of
its positions. With teacher forcing each position sees the true previous tokens, so
this holds exactly when greedy decoding from the prompt reproduces the answer token
by token: the metric is greedy exact match, computed from the logits the training
step already has, without generating. On the quickstart task (reverse a random
lowercase string of length L, ``recipes/data/make_reverse.py``) a model that knows
the format but guesses letters is right with probability 26**-L: chance is < 0.2%.
"""

from __future__ import annotations

import torch

from pp_ext.data import IGNORE_INDEX


def answer_counts(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[answers all right, answers]`` (int64) for logits [batch, seq, vocab] and labels [batch, seq].

    Counts rather than a ratio, so micro-batches and ranks can be summed first.
    """
    labelled = labels != IGNORE_INDEX
    wrong = labelled & (logits.argmax(-1) != labels)
    # a run starts at a labelled position whose left neighbour in the row is unlabelled
    before = torch.nn.functional.pad(labelled[:, :-1], (1, 0), value=False)
    starts = labelled & ~before
    run = torch.cumsum(starts.flatten(), 0) - 1  # answer index of every labelled position
    answers = int(starts.sum())
    errors = torch.zeros(answers, dtype=torch.long, device=labels.device)
    errors.index_add_(0, run[labelled.flatten()], wrong.flatten()[labelled.flatten()].long())
    return torch.stack([(errors == 0).sum(), torch.tensor(answers, device=labels.device)])


def answer_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of answers in the batch whose every token is the argmax (nan without answers)."""
    right, total = answer_counts(logits, labels).tolist()
    return right / total if total else float("nan")
