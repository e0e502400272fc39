"""Turns a scheduled plan into tensors, runs the packed forward, returns logits per sampling row."""

from __future__ import annotations

import logging

import torch

from .adapter_runtime import AdapterRuntime, NoAdapters
from .kv_cache import KVCache, blocks_for
from .kv_layout import RowKV, build_kv_step
from .model import PackedCausalLM
from .request import Sequence
from .static_decode import StaticDecode
from .step_state import AdapterBatch, StepState

log = logging.getLogger(__name__)


class ModelRunner:
    MAX_STATIC_FAILURES = 3

    def __init__(self, model: PackedCausalLM, cache: KVCache, adapters: AdapterRuntime | None = None,
                 static: StaticDecode | None = None):
        self.model = model
        self.cache = cache
        # Before every forward the runtime gets the step's AdapterBatch (merge decision, then
        # the wrapped layers read it); NoAdapters when the model has no wrapped layers.
        self.adapters = adapters or NoAdapters()
        # Fixed-shape decode steps (static_decode.py), None = every step dynamic (the CPU default)
        self.static = static
        self.static_steps = 0
        self.static_failures = 0  # in a row; at MAX_STATIC_FAILURES the fixed path is switched off

    def build_step(self, plan: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, torch.Tensor, StepState, list[int]]:
        """-> (input_ids [T], RoPE positions [T], StepState, token index of each sampling row).

        The scheduler has already grown every row's blocks to hold its new tokens."""
        ids: list[int] = []
        rows: list[RowKV] = []
        sample_tokens: list[int] = []
        for seq, n in plan:
            ids.extend(seq.token_slice(seq.num_computed, seq.num_computed + n))
            rows.append(RowKV(seq.kv_blocks, seq.num_computed, n, seq.kv_prefix_blocks, seq.kv_prefix_len))
            if seq.num_computed + n == seq.num_tokens:  # chunk reaches the end: sample from it
                sample_tokens.append(len(ids) - 1)
        dev = self.model.device
        adapters = AdapterBatch.build([seq.adapter_slot for seq, _ in plan], [n for _, n in plan], dev)
        step, positions = build_kv_step(rows, adapters, self.cache.block_size, dev)
        return torch.tensor(ids, dtype=torch.long, device=dev), positions, step, sample_tokens

    @torch.inference_mode()
    def compute_prefix(self, embeds: torch.Tensor) -> tuple[list[int], int]:
        """Run virtual-token embeddings [n, hidden] at positions 0..n-1 through the base model into
        fresh blocks of the pool; -> (those blocks, n). KVCacheFull when the pool has no room.
        The caller (the adapter runtime's prefix cache) owns the blocks from then on."""
        n = embeds.shape[0]
        dev = self.model.device
        self.cache.zero_grown()  # before any forward, as in `execute`
        blocks = self.cache.alloc(blocks_for(n, self.cache.block_size))
        try:
            step, positions = build_kv_step([RowKV(blocks, 0, n, [], 0)], AdapterBatch.build([0], [n], dev),
                                            self.cache.block_size, dev)
            self.adapters.prepare(step.adapters)
            self.model(embeds.to(self.model.dtype), positions, step, self.cache)
        except BaseException:
            self.cache.free(blocks)
            raise
        return blocks, n

    def store_prefix(self, k: list[torch.Tensor], v: list[torch.Tensor]) -> tuple[list[int], int]:
        """Given per-layer K/V `[kv_heads, n, head_dim]` (prefix tuning) -> (fresh blocks holding them, n)."""
        n = k[0].shape[1]
        blocks = self.cache.alloc(blocks_for(n, self.cache.block_size))
        self.cache.write_prefix(blocks, k, v)
        return blocks, n

    @torch.inference_mode()
    def execute(self, plan: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Run one step; returns float32 logits [R, vocab] for the rows that sample, in plan order.
        A decode-only step the fixed buffers fit runs there (replayed from a graph on CUDA); if
        that raises, the step runs again dynamically (its K/V writes are the same, idempotent),
        so a fault of the fixed path never fails a request the dynamic one would serve."""
        self.cache.zero_grown()  # the blocks the scheduler grew rows by: before anything reads them
        if self.static is not None and (bucket := self.static.bucket(plan)) is not None:
            try:
                logits = self.static.run(plan, bucket)
                self.static_steps += 1
                self.static_failures = 0
                return logits
            except Exception:
                self.static_failures += 1
                log.exception("fixed-shape decode step failed; running it dynamically")
                if self.static_failures >= self.MAX_STATIC_FAILURES:  # broken, not unlucky: stop trying
                    log.error("fixed-shape decode disabled after %d failures in a row", self.static_failures)
                    self.static = None
        input_ids, positions, step, sample_tokens = self.build_step(plan)
        self.adapters.prepare(step.adapters)
        embeds = self.model.embed(input_ids)  # [T, hidden]
        hidden = self.model(embeds, positions, step, self.cache)  # [T, hidden]
        if not sample_tokens:
            return hidden.new_empty(0, self.model.vocab_size, dtype=torch.float32)
        rows = hidden.index_select(0, torch.tensor(sample_tokens, device=hidden.device))
        return self.model.logits(rows)
