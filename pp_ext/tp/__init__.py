"""Megatron-style tensor parallelism on the pipeline grid's model axis (Shoeybi et al.
2019, Sec. 3), combined with pipeline and data parallelism as in Narayanan et al. 2021
("Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM",
PTD-P): tensor ranks of one pipeline stage run the same program on the same micro-batch
and meet in the all-reduces of their layers."""

from pp_ext.tp.axis import (
    TensorAxis,
    copy_to_region,
    current,
    from_grid,
    gather_last_dim,
    reduce_from_region,
    using,
)
from pp_ext.tp.cross_entropy import vocab_parallel_cross_entropy
from pp_ext.tp.layers import (
    ColumnParallelConv1D,
    ColumnParallelLinear,
    RowParallelConv1D,
    RowParallelLinear,
    axis_of,
    column_parallel,
    load_parts,
    mark_replicated,
    row_parallel,
    splits,
    vocab_parallel_embedding,
    vocab_parallel_head,
    vocab_parallel_logits,
)
from pp_ext.tp.plans import check_tensor_split, describe, local_config, shard_layer
from pp_ext.tp.split import Split
from pp_ext.tp.vocab import mask_padding, padded_vocab_size, vocab_split

__all__ = [
    "TensorAxis",
    "copy_to_region",
    "current",
    "from_grid",
    "gather_last_dim",
    "reduce_from_region",
    "using",
    "vocab_parallel_cross_entropy",
    "ColumnParallelConv1D",
    "ColumnParallelLinear",
    "RowParallelConv1D",
    "RowParallelLinear",
    "axis_of",
    "column_parallel",
    "load_parts",
    "mark_replicated",
    "row_parallel",
    "splits",
    "vocab_parallel_embedding",
    "vocab_parallel_head",
    "vocab_parallel_logits",
    "check_tensor_split",
    "describe",
    "local_config",
    "shard_layer",
    "Split",
    "mask_padding",
    "padded_vocab_size",
    "vocab_split",
]
