"""Tiny random configs of every supported HF family, shared by the HF tests.

One entry per ``model_type``: ``CONFIGS[model_type](tied)`` gives a config small
enough for CPU tests, with tied or untied input/output embeddings.
"""
from __future__ import annotations

from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

SIZES = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
CONFIGS = {
    "llama": lambda tied: LlamaConfig(**SIZES, tie_word_embeddings=tied),
    "mistral": lambda tied: MistralConfig(**SIZES, sliding_window=4, tie_word_embeddings=tied),
    "qwen2": lambda tied: Qwen2Config(**SIZES, tie_word_embeddings=tied),  # Qwen2 has qkv bias
    "qwen3": lambda tied: Qwen3Config(**SIZES, head_dim=8, tie_word_embeddings=tied),
}
