"""A small Llama-shaped causal LM as DeepSpeed layer specs, in plain torch.

For tests and ``pp-ext bench`` (no download, no transformers): token embedding,
decoder blocks (RMSNorm, causal self-attention with q/k/v/o projections, SwiGLU
MLP), final norm and an LM head that is either tied to the embedding (a
``TiedLayerSpec``, as in many HF models) or its own linear layer. Every weight
GEMM is an ``nn.Linear``, so the split backward defers them all to W.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, TiedLayerSpec
from torch import nn


@dataclass(frozen=True)
class TinyConfig:
    vocab: int = 64
    hidden: int = 32
    heads: int = 4
    intermediate: int = 64
    blocks: int = 4
    tied: bool = True


class Embedding(nn.Module):
    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(config.vocab, config.hidden) * 0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


def tied_head(embedding: Embedding, hidden: torch.Tensor) -> torch.Tensor:
    return F.linear(hidden, embedding.weight)


class Block(nn.Module):
    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        h, i = config.hidden, config.intermediate
        self.heads = config.heads
        self.attn_norm = nn.RMSNorm(h)
        self.q, self.k, self.v, self.o = (nn.Linear(h, h, bias=False) for _ in range(4))
        self.mlp_norm = nn.RMSNorm(h)
        self.gate, self.up = nn.Linear(h, i, bias=False), nn.Linear(h, i, bias=False)
        self.down = nn.Linear(i, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        y = self.attn_norm(x)
        q, k, v = (
            proj(y).view(b, s, self.heads, h // self.heads).transpose(1, 2)
            for proj in (self.q, self.k, self.v)
        )
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(attn.transpose(1, 2).reshape(b, s, h))
        y = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))


class Norm(nn.RMSNorm):
    def __init__(self, config: TinyConfig) -> None:
        super().__init__(config.hidden)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1))


def layer_specs(config: TinyConfig) -> list:
    """Embedding, ``blocks`` decoder blocks, final norm, LM head (untied: a plain
    ``nn.Linear``, as HF's ``lm_head``, so the split backward defers its weight GEMM
    to W; a subclass would keep it in I)."""
    embed = (
        TiedLayerSpec("embed", Embedding, config, tied_weight_attr=["weight"])
        if config.tied
        else LayerSpec(Embedding, config)
    )
    head = (
        TiedLayerSpec("embed", Embedding, config, forward_fn=tied_head, tied_weight_attr=["weight"])
        if config.tied
        else LayerSpec(nn.Linear, config.hidden, config.vocab, bias=False)
    )
    return [
        embed,
        *[LayerSpec(Block, config) for _ in range(config.blocks)],
        LayerSpec(Norm, config),
        head,
    ]
