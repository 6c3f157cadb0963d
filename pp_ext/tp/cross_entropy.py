"""Cross-entropy over vocabulary-parallel logits, without gathering them.

Shoeybi et al. 2019 (Sec. 3, "output embedding") keep the LM head's output split by
vocabulary and fuse it with the loss: all-gathering [tokens, vocabulary] logits would
cost far more than reducing three numbers per token. Here, per token: the maximum
logit (all-reduce MAX, a constant for the gradient: the loss does not depend on the
shift), the sum of exp(logit - max) and the target's shifted logit (each all-reduced
by Megatron's ``g``, identity backward), then loss = log(sum) - target. With one
tensor rank the logits are whole, and torch's fused ``cross_entropy`` (log-softmax and
NLL, as HF's loss calls it) computes the same with a third of the passes over them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pp_ext.tp.axis import TensorAxis, reduce_from_region

IGNORE_INDEX = -100  # HF's and torch's default ignore_index


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, axis: TensorAxis, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Mean cross-entropy (in float32) over the tokens whose label is not
    ``ignore_index``; ``logits`` [..., vocab / axis.size] are this rank's block of the
    vocabulary, ``labels`` [...] whole-vocabulary ids. Equals ``F.cross_entropy`` on
    the gathered logits with ``reduction='sum'`` divided by the number of labelled
    tokens (at least 1)."""
    block = logits.size(-1)
    logits = logits.reshape(-1, block).float()
    labels = labels.reshape(-1)
    labelled = labels != ignore_index
    if axis.size == 1:
        return F.cross_entropy(
            logits, labels, ignore_index=ignore_index, reduction="sum"
        ) / labelled.sum().clamp(min=1)
    with torch.no_grad():
        top = axis.all_reduce(logits.max(dim=-1).values, op=dist.ReduceOp.MAX)
    shifted = logits - top.unsqueeze(-1)
    sum_exp = reduce_from_region(shifted.exp().sum(dim=-1), axis)
    local = labels - axis.rank * block
    outside = (local < 0) | (local >= block)
    target = shifted.gather(1, local.masked_fill(outside, 0).unsqueeze(1)).squeeze(1)
    target = reduce_from_region(target.masked_fill(outside, 0.0), axis)
    losses = (sum_exp.log() - target).masked_fill(~labelled, 0.0)
    return losses.sum() / labelled.sum().clamp(min=1)
