"""The per-step batch description handed down to every layer.

One continuous-batching step packs the new tokens of all scheduled sequences into one flat
`[T]` token axis (prefill chunks and decode tokens alike). Everything a layer needs to treat
each token correctly travels in this one object, passed explicitly through the model's forward
kwargs to the attention function and handed to the adapter-aware layers by the adapter
runtime's `prepare`, which the runner calls before the forward (no module globals, no hooks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AdapterBatch:
    """Token -> adapter slot mapping for weight adapters (LoRA, (IA)3, bottleneck).

    Rows are ordered by adapter slot, so each slot's tokens form one contiguous segment.
    """

    token_slots: torch.Tensor  # [T] int64, 0 = no adapter
    # (slot, start, end) for every slot != 0 present in the step, over the token axis
    segments: list[tuple[int, int, int]] = field(default_factory=list)
    plans: dict = field(default_factory=dict)  # grouped-LoRA padding plans, shared by all modules

    @property
    def any_active(self) -> bool:
        return bool(self.segments)

    @staticmethod
    def build(slots_per_row: list[int], q_lens: list[int], device: torch.device) -> "AdapterBatch":
        token_slots = torch.repeat_interleave(
            torch.tensor(slots_per_row, dtype=torch.long), torch.tensor(q_lens, dtype=torch.long)
        ).to(device)
        segments: list[tuple[int, int, int]] = []
        start = 0
        for slot, n in zip(slots_per_row, q_lens):
            if slot != 0:
                if segments and segments[-1][0] == slot and segments[-1][2] == start:
                    segments[-1] = (slot, segments[-1][1], start + n)
                else:
                    segments.append((slot, start, start + n))
            start += n
        return AdapterBatch(token_slots, segments)


@dataclass
class StepState:
    # per row (scheduled sequence), in packed order
    kv_slots: list[int]  # KV-cache row of each sequence
    q_lens: list[int]  # new tokens this step
    ctx_lens: list[int]  # cache length after this step (virtual prefix + computed + new)
    kv_prefix_lens: list[int]  # virtual tokens at the front of the row's cache (0 = none)
    # per token
    cache_pos: torch.Tensor  # [T] where each new token's K/V goes in its row
    token_kv_slots: torch.Tensor  # [T] the row's KV slot, per token
    adapters: AdapterBatch
    # decode rows: one query token each, attended as one batch
    decode_rows: list[int] = field(default_factory=list)
    decode_tokens: torch.Tensor | None = None  # [Bd] token index of each decode row
    decode_slots: torch.Tensor | None = None  # [Bd] KV slot of each decode row
    decode_mask: torch.Tensor | None = None  # [S, 1, 1, L] additive mask over slots 0..S-1
    # prefill rows: (row, token_start, token_end), each attended on its own
    prefill_rows: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.cache_pos.shape[0])
