"""Engine configuration (one place for the knobs the CLI exposes)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 32  # running sequences (= KV cache slots)
    max_model_len: int = 1024  # prompt + virtual prefix + generated tokens
    max_num_batched_tokens: int = 512  # token budget of one step (prefill chunks + decodes)
    max_waiting: int = 1024  # queue bound; beyond it requests get 429
    max_adapters_per_batch: int = 8  # device adapter slots (distinct adapters in one step)
    merge_policy: str = "never"  # "single-adapter": fold a lone LoRA into the base weights
    merge_min_steps: int = 4  # consecutive single-adapter steps before merging
    dtype: torch.dtype = torch.float32
    adapter_dtype: torch.dtype = torch.float32  # LoRA weight storage (math stays fp32): float32 = PEFT exactly
    device: str = "cpu"

    def __post_init__(self):
        if self.max_batch_size < 1 or self.max_model_len < 2 or self.max_num_batched_tokens < 1:
            raise ValueError("max_batch_size >= 1, max_model_len >= 2, max_num_batched_tokens >= 1 required")
        if self.max_num_batched_tokens < self.max_batch_size:
            # every running sequence must be able to decode in every step
            raise ValueError("max_num_batched_tokens must be >= max_batch_size")
        if self.adapter_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"adapter_dtype must be float32, bfloat16 or float16 (got {self.adapter_dtype})")
