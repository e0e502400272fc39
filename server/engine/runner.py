"""Turns a scheduled plan into tensors, runs the packed forward, returns logits per sampling row."""

from __future__ import annotations

import torch

from .attention import decode_mask
from .adapter_runtime import AdapterRuntime, NoAdapters
from .kv_cache import KVCache
from .model import PackedCausalLM
from .request import Sequence
from .step_state import AdapterBatch, StepState


class ModelRunner:
    def __init__(self, model: PackedCausalLM, cache: KVCache, adapters: AdapterRuntime | None = None):
        self.model = model
        self.cache = cache
        # Before every forward the runtime gets the step's AdapterBatch (merge decision, then
        # the wrapped layers read it); NoAdapters when the model has no wrapped layers.
        self.adapters = adapters or NoAdapters()

    def build_step(self, plan: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, torch.Tensor, StepState, list[int]]:
        """-> (input_ids [T], rope positions [T], StepState, token index of each sampling row)."""
        dev = self.model.device
        ids: list[int] = []
        cache_pos: list[int] = []
        token_slots: list[int] = []
        kv_slots, q_lens, ctx_lens, prefix_lens, adapter_slots = [], [], [], [], []
        decode_rows, prefill_rows, sample_tokens, starts = [], [], [], []
        for row, (seq, n) in enumerate(plan):
            start = len(ids)
            starts.append(start)
            new = seq.all_ids[seq.num_computed:seq.num_computed + n]
            ids.extend(new)
            first = seq.kv_prefix_len + seq.num_computed
            cache_pos.extend(range(first, first + n))
            token_slots.extend([seq.kv_slot] * n)
            kv_slots.append(seq.kv_slot)
            q_lens.append(n)
            ctx_lens.append(first + n)
            prefix_lens.append(seq.kv_prefix_len)
            adapter_slots.append(seq.adapter_slot)
            if n == 1:
                decode_rows.append(row)
            else:
                prefill_rows.append((row, start, start + n))
            if seq.num_computed + n == seq.num_tokens:  # chunk reaches the end: sample from it
                sample_tokens.append(start + n - 1)
        step = StepState(
            kv_slots=kv_slots, q_lens=q_lens, ctx_lens=ctx_lens, kv_prefix_lens=prefix_lens,
            cache_pos=torch.tensor(cache_pos, dtype=torch.long, device=dev),
            token_kv_slots=torch.tensor(token_slots, dtype=torch.long, device=dev),
            adapters=AdapterBatch.build(adapter_slots, q_lens, dev),
            decode_rows=decode_rows, prefill_rows=prefill_rows,
        )
        if decode_rows:
            dec_tokens = [starts[r] for r in decode_rows]
            dec_slots = [kv_slots[r] for r in decode_rows]
            step.decode_tokens = torch.tensor(dec_tokens, dtype=torch.long, device=dev)
            step.decode_slots = torch.tensor(dec_slots, dtype=torch.long, device=dev)
            step.decode_mask = decode_mask(dec_slots, [ctx_lens[r] for r in decode_rows], max(dec_slots) + 1,
                                           max(ctx_lens[r] for r in decode_rows), self.cache.k[0].dtype, dev)
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        positions = step.cache_pos  # RoPE position = cache position (virtual tokens take 0..n-1)
        return input_ids, positions, step, sample_tokens

    @torch.inference_mode()
    def compute_prefix(self, embeds: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Run virtual-token embeddings [n, hidden] at positions 0..n-1 through the model in the
        scratch cache row; return per-layer K/V `[kv_heads, n, head_dim]` (copies)."""
        n = embeds.shape[0]
        dev, slot = self.model.device, self.cache.scratch_slot
        step = StepState(
            kv_slots=[slot], q_lens=[n], ctx_lens=[n], kv_prefix_lens=[0],
            cache_pos=torch.arange(n, device=dev), token_kv_slots=torch.full((n,), slot, device=dev),
            adapters=AdapterBatch.build([0], [n], dev), prefill_rows=[(0, 0, n)],
        )
        if n == 1:  # a single query token goes through the decode path
            step.prefill_rows, step.decode_rows = [], [0]
            step.decode_tokens = torch.zeros(1, dtype=torch.long, device=dev)
            step.decode_slots = torch.tensor([slot], device=dev)
            step.decode_mask = decode_mask([slot], [1], slot + 1, 1, self.cache.k[0].dtype, dev)
        self.adapters.prepare(step.adapters)
        self.model(embeds.to(self.model.dtype), torch.arange(n, device=dev), step, self.cache)
        ks = [k[slot, :, :n].clone() for k in self.cache.k]
        vs = [v[slot, :, :n].clone() for v in self.cache.v]
        return ks, vs

    @torch.inference_mode()
    def execute(self, plan: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Run one step; returns float32 logits [R, vocab] for the rows that sample, in plan order."""
        input_ids, positions, step, sample_tokens = self.build_step(plan)
        self.adapters.prepare(step.adapters)
        embeds = self.model.embed(input_ids)  # [T, hidden]
        hidden = self.model(embeds, positions, step, self.cache)  # [T, hidden]
        if not sample_tokens:
            return hidden.new_empty(0, self.model.vocab_size, dtype=torch.float32)
        rows = hidden.index_select(0, torch.tensor(sample_tokens, device=hidden.device))
        return self.model.logits(rows)
