"""Batched LoRA delta for a packed token axis where every token may use a different adapter.

Semantics (the reference, `lora_delta_reference`): for token t with adapter slot s_t,

    delta[t] = ((x[t] @ A_s^T) @ B_s^T) * scale_s        (0 when s_t has no LoRA here)

which is exactly what PEFT's `lora.Linear` adds to the base output for one adapter
(`lora_B(lora_A(x)) * scaling`). The fast path `lora_delta_segmented` relies on the runner
ordering rows by slot, so each slot's tokens are one contiguous segment: one pair of matmuls per
(segment, module) at the adapter's *true* rank — mixed ranks never pay for the largest rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoraSlotWeights:
    """One adapter's LoRA at one module, already on the serving device/dtype."""

    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def lora_delta_reference(x: torch.Tensor, token_slots: torch.Tensor,
                         weights: dict[int, LoraSlotWeights]) -> torch.Tensor:
    """x: [T, in], token_slots: [T] -> delta [T, out]. One token at a time: slow, obviously right."""
    out_dim = next(iter(weights.values())).B.shape[0] if weights else 0
    delta = x.new_zeros(x.shape[0], out_dim)
    for t in range(x.shape[0]):
        w = weights.get(int(token_slots[t]))
        if w is not None:
            delta[t] = ((x[t:t + 1] @ w.A.T) @ w.B.T)[0] * w.scale
    return delta


def lora_add_segmented_(out: torch.Tensor, x: torch.Tensor, segments: list[tuple[int, int, int]],
                        weights: dict[int, LoraSlotWeights]) -> torch.Tensor:
    """In place: out[s:e] += LoRA_slot(x[s:e]) for every (slot, s, e) segment. out: [T, out], x: [T, in]."""
    for slot, start, end in segments:
        w = weights.get(slot)
        if w is not None:
            out[start:end] += (x[start:end] @ w.A.T) @ w.B.T * w.scale
    return out
