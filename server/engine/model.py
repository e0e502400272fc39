"""Packed-batch forward over a transformers causal LM.

We reuse transformers' own decoder-layer classes (so norms, RoPE, MLP numerics are exactly the
ones `generate` uses — the parity oracle) but drive the layer loop ourselves: the whole step is
one `[1, T]` packed sequence, attention goes through our registered `peftserve` function, and
logits are computed only for the rows that sample, on a contiguous `[rows, hidden]` tensor
(slicing then applying a frozen lm_head otherwise hits a slow bf16 CPU path).
"""

from __future__ import annotations

import torch
from torch import nn

from . import attention
from .kv_cache import KVCache
from .step_state import StepState

# Families whose decoder is `model.{embed_tokens, layers, norm, rotary_emb}` + `lm_head` and
# whose attention goes through transformers' attention interface.
LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3"}


class UnsupportedModelError(ValueError):
    pass


class PackedCausalLM(nn.Module):
    def __init__(self, hf_model: nn.Module):
        super().__init__()
        cfg = hf_model.config
        if cfg.model_type not in LLAMA_LIKE:
            raise UnsupportedModelError(
                f"model_type {cfg.model_type!r} not supported (supported: {', '.join(sorted(LLAMA_LIKE))})")
        if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
            raise UnsupportedModelError("sliding-window attention is not supported")
        attention.register()
        hf_model.config._attn_implementation = attention.ATTN_IMPL
        self.hf = hf_model
        self.config = cfg
        self.decoder = hf_model.model
        self.lm_head = hf_model.lm_head
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.hidden_size = cfg.hidden_size
        self.vocab_size = cfg.vocab_size

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.embed_tokens(input_ids)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, step: StepState, cache: KVCache) -> torch.Tensor:
        """embeds: [T, hidden], positions: [T] RoPE positions -> final-normed hidden [T, hidden]."""
        hidden = embeds[None]  # [1, T, hidden]
        pos = positions[None]  # [1, T]
        rope = self.decoder.rotary_emb(hidden, pos)
        for layer in self.decoder.layers:
            hidden = layer(hidden, attention_mask=None, position_ids=pos, position_embeddings=rope,
                           peftserve_step=step, peftserve_cache=cache)
            if isinstance(hidden, tuple):  # older transformers return (hidden, ...)
                hidden = hidden[0]
        return self.decoder.norm(hidden)[0]

    def logits(self, hidden_rows: torch.Tensor) -> torch.Tensor:
        """hidden_rows: [R, hidden] (contiguous) -> float32 logits [R, vocab]."""
        return self.lm_head(hidden_rows.contiguous()).float()
