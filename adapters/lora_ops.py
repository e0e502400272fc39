"""Batched LoRA delta for a packed token axis where every token may use a different adapter.

Semantics (the reference, `lora_delta_reference`): for token t with adapter slot s_t,

    delta[t] = ((x[t] @ A_s^T) @ B_s^T) * scale_s        (0 when s_t has no LoRA here)

which is exactly what PEFT's `lora.Linear` adds to the base output for one adapter
(`lora_B(lora_A(x)) * scaling`). Like PEFT (whose `autocast_adapter_dtype` keeps adapter weights
in float32 on a bf16/fp16 base), the delta is computed in float32 and added to the base output
in float32 before casting back — which is also the fast choice on CPU, where small bf16 matmuls
run 5x slower than float32 ones. The fast path `lora_add_segmented_` relies on the runner
ordering rows by slot, so each slot's tokens are one contiguous segment: one pair of matmuls per
(segment, module) at the adapter's *true* rank — mixed ranks never pay for the largest rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoraSlotWeights:
    """One adapter's LoRA at one module, float32, on the serving device."""

    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scale: float
    At: torch.Tensor = None  # [in, r] contiguous: the layout the matmul wants
    Bt: torch.Tensor = None  # [r, out]

    def __post_init__(self):
        object.__setattr__(self, "A", self.A.float())
        object.__setattr__(self, "B", self.B.float())
        object.__setattr__(self, "At", self.A.T.contiguous())
        object.__setattr__(self, "Bt", self.B.T.contiguous())

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def lora_delta_reference(x: torch.Tensor, token_slots: torch.Tensor,
                         weights: dict[int, LoraSlotWeights]) -> torch.Tensor:
    """x: [T, in], token_slots: [T] -> delta [T, out]. One token at a time: slow, obviously right."""
    out_dim = next(iter(weights.values())).B.shape[0] if weights else 0
    delta = torch.zeros(x.shape[0], out_dim, dtype=torch.float32, device=x.device)
    for t in range(x.shape[0]):
        w = weights.get(int(token_slots[t]))
        if w is not None:
            delta[t] = ((x[t:t + 1].float() @ w.A.T) @ w.B.T)[0] * w.scale
    return delta


def lora_add_segmented_(out: torch.Tensor, x: torch.Tensor, segments: list[tuple[int, int, int]],
                        weights: dict[int, LoraSlotWeights]) -> torch.Tensor:
    """In place: out[s:e] += LoRA_slot(x[s:e]) for every (slot, s, e) segment. out: [T, out], x: [T, in]."""
    same = out.dtype == torch.float32
    for slot, start, end in segments:
        w = weights.get(slot)
        if w is None:
            continue
        delta = (x[start:end].float() @ w.At) @ w.Bt
        if same:
            out[start:end].add_(delta.mul_(w.scale))
        else:  # PEFT: bf16 result + fp32 delta promotes to fp32, then casts back
            out[start:end] = out[start:end].float().add_(delta.mul_(w.scale))
    return out
