"""Engine configuration (one place for the knobs the CLI exposes)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EngineConfig:
    # Defaults chosen for CPU serving (issue 13; README "Serve"): 64 running sequences x 1024 tokens
    # x 45 KiB per token for the default model (30 layers x 3 KV heads x 64 dims, K and V, float32
    # cache) = 2.9 GiB of KV pool; decode throughput on 2 cores keeps growing up to batch 64.
    max_batch_size: int = 64  # running sequences
    max_model_len: int = 1024  # prompt + virtual prefix + generated tokens
    # Paged KV cache (kv_cache.py). The pool's size: None = room for max_batch_size sequences of
    # max_model_len tokens, capped at DEFAULT_KV_CACHE_BYTES (then long contexts share the budget:
    # admission waits, growth preempts). With the defaults the cap is not reached (2.9 GiB).
    kv_cache_bytes: int | None = None
    kv_block_size: int = 64  # tokens per block (decode attention scores a block per matmul)
    max_num_batched_tokens: int = 512  # token budget of one step (prefill chunks + decodes)
    max_waiting: int = 1024  # queue bound; beyond it requests get 429
    # device adapter slots (distinct adapters in one step). A slot costs nothing until an adapter is
    # installed in it (entries are the adapter's true shape: server/runtime/layers.py): a slot bounds
    # resident adapter bytes, it reserves nothing. A rank-64 q,k,v,o LoRA of the default model is 29.5 MB
    # of float32 weights (14.7 MB with --adapter-dtype bfloat16), held once in the matmul layout (A
    # and B are views of it) plus the grouped stacks (~2x); 32 LoRAs of ranks 8..64 read 442 MB
    # (fp32) per decode step. 8 slots thrash with 32 adapters in the traffic (issue 13).
    max_adapters_per_batch: int = 32
    # Device bytes all installed weight adapters may take together (their entries at the storage
    # dtype: a LoRA's weights once, in the matmul layout; not the derived stacks). Bounds the device tier by memory,
    # whatever the slot count: 32 r8-64 q,k,v,o LoRAs of the default model take 442 MB in float32. None = no bound.
    max_adapter_bytes: int | None = 2 << 30
    merge_policy: str = "never"  # "single-adapter": fold a lone LoRA into the base weights
    merge_min_steps: int = 4  # consecutive single-adapter steps before merging
    dtype: torch.dtype = torch.float32
    adapter_dtype: torch.dtype = torch.float32  # LoRA weight storage (math stays fp32): float32 = PEFT exactly
    device: str = "cpu"
    # Decode-only steps on fixed buffers (static_decode.py): "auto" = CUDA graphs on a GPU and the
    # dynamic step on CPU; "dynamic" (--enforce-eager) | "static" (fixed buffers, eager) | "graph"
    decode_mode: str = "auto"
    # When a step's tokens become text and events (engine.EmitTiming): "auto" = "overlapped" on
    # CUDA (detokenize and stop-check during the next step's device work), "immediate" elsewhere
    emit_timing: str = "auto"
    max_lora_rank: int = 64  # the largest LoRA rank the fixed-shape steps serve (their stacks' width)
    max_bottleneck_size: int = 256  # the same for bottleneck adapters' size

    def __post_init__(self):
        if self.max_batch_size < 1 or self.max_model_len < 2 or self.max_num_batched_tokens < 1:
            raise ValueError("max_batch_size >= 1, max_model_len >= 2, max_num_batched_tokens >= 1 required")
        if self.max_num_batched_tokens < self.max_batch_size:
            # every running sequence must be able to decode in every step
            raise ValueError("max_num_batched_tokens must be >= max_batch_size")
        if self.kv_block_size < 1 or (self.kv_cache_bytes is not None and self.kv_cache_bytes < 1):
            raise ValueError("kv_block_size >= 1 and kv_cache_bytes >= 1 required")
        if (self.decode_mode not in ("auto", "dynamic", "static", "graph") or self.max_lora_rank < 1
                or self.max_bottleneck_size < 1):
            raise ValueError("decode_mode must be auto|dynamic|static|graph, max_lora_rank and max_bottleneck_size >= 1")
        if self.emit_timing not in ("auto", "immediate", "overlapped"):
            raise ValueError("emit_timing must be auto|immediate|overlapped")
        if self.max_adapter_bytes is not None and self.max_adapter_bytes < 1:
            raise ValueError("max_adapter_bytes >= 1 (or None for no byte bound) required")
        if self.adapter_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"adapter_dtype must be float32, bfloat16 or float16 (got {self.adapter_dtype})")
