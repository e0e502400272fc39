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
# GPT-2: `transformer.{wte, wpe, h, ln_f}`, learned absolute positions, Conv1D projections.
GPT2_LIKE = {"gpt2"}
SUPPORTED = LLAMA_LIKE | GPT2_LIKE


def decoder_parts(hf_model: nn.Module) -> tuple[str, nn.ModuleList, dict[str, str]]:
    """(module-path prefix of the decoder layers, the layers, {"attn"|"mlp": attribute name})."""
    if hf_model.config.model_type in GPT2_LIKE:
        return "transformer.h.", hf_model.transformer.h, {"attn": "attn", "mlp": "mlp"}
    return "model.layers.", hf_model.model.layers, {"attn": "self_attn", "mlp": "mlp"}


class UnsupportedModelError(ValueError):
    pass


class PackedCausalLM(nn.Module):
    def __init__(self, hf_model: nn.Module):
        super().__init__()
        cfg = hf_model.config
        if cfg.model_type not in SUPPORTED:
            raise UnsupportedModelError(
                f"model_type {cfg.model_type!r} not supported (supported: {', '.join(sorted(SUPPORTED))})")
        if cfg.model_type in GPT2_LIKE and (getattr(cfg, "reorder_and_upcast_attn", False)
                                            or getattr(cfg, "add_cross_attention", False)):
            raise UnsupportedModelError("GPT-2 with reorder_and_upcast_attn or cross-attention is not supported")
        if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
            raise UnsupportedModelError("sliding-window attention is not supported")
        attention.register()
        hf_model.config._attn_implementation = attention.ATTN_IMPL
        self.hf = hf_model
        self.config = cfg
        self.gpt2 = cfg.model_type in GPT2_LIKE
        self.decoder = hf_model.transformer if self.gpt2 else hf_model.model
        self.layers = self.decoder.h if self.gpt2 else self.decoder.layers
        self.final_norm = self.decoder.ln_f if self.gpt2 else self.decoder.norm
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
        """Token embeddings only: what PEFT's soft prompts are concatenated with."""
        return self.decoder.wte(input_ids) if self.gpt2 else self.decoder.embed_tokens(input_ids)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, step: StepState, cache: KVCache) -> torch.Tensor:
        """embeds: [T, hidden], positions: [T] RoPE positions -> final-normed hidden [T, hidden]."""
        hidden = embeds[None]  # [1, T, hidden]
        pos = positions[None]  # [1, T]
        if self.gpt2:  # learned absolute positions, added to token (or soft-prompt) embeddings
            hidden = hidden + self.decoder.wpe(pos).to(hidden.dtype)
            extra = {}
        else:
            extra = {"position_ids": pos, "position_embeddings": self.decoder.rotary_emb(hidden, pos)}
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=None, peftserve_step=step, peftserve_cache=cache, **extra)
            if isinstance(hidden, tuple):  # older transformers return (hidden, ...)
                hidden = hidden[0]
        return self.final_norm(hidden)[0]

    def logits(self, hidden_rows: torch.Tensor) -> torch.Tensor:
        """hidden_rows: [R, hidden] (contiguous) -> float32 logits [R, vocab]."""
        return self.lm_head(hidden_rows.contiguous()).float()
