"""Engine configuration (one place for the knobs the CLI exposes)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EngineConfig:
    # Defaults chosen for CPU serving (issue 13; README "Serve"): 64 running sequences = 65 KV rows
    # x 45 MiB at max_model_len 1024 for the default model (30 layers x 3 KV heads x 64 dims, K and V,
    # float32 cache) = 2.9 GiB; decode throughput on 2 cores keeps growing up to batch 64.
    max_batch_size: int = 64  # running sequences (= KV cache slots)
    max_model_len: int = 1024  # prompt + virtual prefix + generated tokens
    max_num_batched_tokens: int = 512  # token budget of one step (prefill chunks + decodes)
    max_waiting: int = 1024  # queue bound; beyond it requests get 429
    # device adapter slots (distinct adapters in one step). A slot costs nothing until an adapter is
    # installed in it (entries are the adapter's true shape: server/runtime/layers.py): a slot bounds
    # resident adapter bytes, it reserves nothing. A rank-64 q,k,v,o LoRA of the default model is 29.5 MB
    # of float32 weights (14.7 MB with --adapter-dtype bfloat16), held as A, B, their transposes and the
    # grouped stacks (~3x); 32 LoRAs of ranks 8..64 read 442 MB (fp32) per decode step. 8 slots thrash
    # with 32 adapters in the traffic (issue 13).
    max_adapters_per_batch: int = 32
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
