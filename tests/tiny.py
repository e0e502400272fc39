"""Tiny, deterministic base models for fast adapter tests (built in-process, no downloads)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

TINY_LLAMA_DEFAULTS = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA: prefix tuning must use kv heads, not query heads
    intermediate_size=128,
    vocab_size=256,
    max_position_embeddings=256,
)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A 2-layer Llama with random (seeded) weights, float32, in eval mode."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**TINY_LLAMA_DEFAULTS, **overrides})
    model = LlamaForCausalLM(cfg).to(torch.float32)
    return model.eval()
