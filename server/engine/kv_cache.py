"""Per-sequence slot KV cache.

Layout per layer: K and V of shape `[max_seqs, kv_heads, max_model_len, head_dim]`. A running
sequence owns one slot (row) for its whole life, so admission can never run out of KV memory
mid-generation (no preemption needed), and decode attention reads a *view* of the first
`max_active_slot + 1` rows without any gather (see attention.py). Why not paged blocks: on CPU
the gather of scattered blocks into a contiguous tensor costs more than the memory we would
save; see docs/design.md.
"""

from __future__ import annotations

import heapq

import torch


class SlotAllocator:
    """Hands out the lowest free slot first, so active rows stay packed at the front."""

    def __init__(self, num_slots: int):
        self._free = list(range(num_slots))
        heapq.heapify(self._free)
        self.num_slots = num_slots

    def alloc(self) -> int:
        return heapq.heappop(self._free)

    def free(self, slot: int) -> None:
        heapq.heappush(self._free, slot)

    @property
    def num_free(self) -> int:
        return len(self._free)


class KVCache:
    def __init__(self, num_layers: int, max_seqs: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        # One extra row past the sequences' rows: scratch space where a soft prompt's KV prefix is
        # computed once (through the very same forward path) before it is shared.
        shape = (max_seqs + 1, kv_heads, max_len, head_dim)
        self.scratch_slot = max_seqs
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.slots = SlotAllocator(max_seqs)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def write_prefix(self, slot: int, prefix_k: list[torch.Tensor], prefix_v: list[torch.Tensor]) -> None:
        """Copy a shared per-adapter KV prefix (each `[kv_heads, n, head_dim]`) to a slot's front."""
        for layer, (pk, pv) in enumerate(zip(prefix_k, prefix_v)):
            n = pk.shape[1]
            self.k[layer][slot, :, :n].copy_(pk)
            self.v[layer][slot, :, :n].copy_(pv)
