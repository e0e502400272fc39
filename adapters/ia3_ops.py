"""Batched (IA)3 scaling for a packed token axis where every token may use a different adapter.

Semantics (the reference, `ia3_reference`): for token t with adapter slot s_t and a wrapped
linear `base`,

    out[t] = base(x[t] * l_s)     when s_t's vector scales the input (a "feedforward" module)
    out[t] = base(x[t]) * l_s     when it scales the output (attention-style module)
    out[t] = base(x[t])           when s_t has no (IA)3 vector at this module

which is exactly PEFT's `ia3.Linear` forward for one adapter (see adapters/ia3.py for how a
checkpoint says which modules are feedforward). The fast path `ia3_apply_segmented_` relies on
the runner ordering rows by slot, so each slot's tokens are one contiguous `(slot, start, end)`
segment: it starts from the base output of the whole step, rescales an output segment in place,
and recomputes the base only for input-scaled segments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class IA3SlotWeights:
    """One adapter's (IA)3 vector at one module, on the serving device."""

    scale: torch.Tensor  # [in] for feed-forward modules (scales the input), else [out]
    feedforward: bool


Linear = Callable[[torch.Tensor], torch.Tensor]  # the wrapped base module: [T, in] -> [T, out]


def ia3_reference(base: Linear, x: torch.Tensor, token_slots: torch.Tensor,
                  weights: dict[int, IA3SlotWeights]) -> torch.Tensor:
    """x: [T, in], token_slots: [T] -> out [T, out]. One token at a time: slow, obviously right."""
    rows = []
    for t in range(x.shape[0]):
        w = weights.get(int(token_slots[t]))
        xt = x[t:t + 1]
        if w is None:
            rows.append(base(xt))
        elif w.feedforward:
            rows.append(base(xt * w.scale))
        else:
            rows.append(base(xt) * w.scale)
    return torch.cat(rows) if rows else base(x)


def ia3_apply_segmented_(out: torch.Tensor, x: torch.Tensor, base: Linear, segments: list[tuple[int, int, int]],
                         weights: dict[int, IA3SlotWeights]) -> torch.Tensor:
    """In place: out = base(x) with every (slot, s, e) segment's (IA)3 applied. out: [T, out], the
    base output of x: [T, in]; an input-scaled segment recomputes `base` for its rows only."""
    for slot, start, end in segments:
        w = weights.get(slot)
        if w is None:
            continue
        if w.feedforward:  # PEFT: base(x * l)
            out[start:end] = base(x[start:end] * w.scale)
        else:  # PEFT: base(x) * l
            out[start:end] = out[start:end] * w.scale
    return out


class IA3Stacks:
    """Every slot's (IA)3 vector at one module in fixed-address buffers, for the gathered op:
    `inp [S, in]` and `out [S, out]` (S = slots + 1), all ones except where a slot's adapter
    scales that side, so a token of any other slot is multiplied by exactly 1. `put` / `clear`
    write in place (a captured graph sees the change on its next replay)."""

    def __init__(self, num_slots: int, in_features: int, out_features: int, dtype: torch.dtype,
                 device: torch.device):
        self.inp = torch.ones(num_slots + 1, in_features, dtype=dtype, device=device)
        self.out = torch.ones(num_slots + 1, out_features, dtype=dtype, device=device)

    def fits(self, w: IA3SlotWeights) -> bool:
        return True

    def put(self, slot: int, w: IA3SlotWeights) -> None:
        self.clear(slot)
        (self.inp if w.feedforward else self.out)[slot].copy_(w.scale)

    def clear(self, slot: int) -> None:
        self.inp[slot].fill_(1.0)
        self.out[slot].fill_(1.0)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.inp, self.out))


def ia3_apply_gathered(base: Linear, x: torch.Tensor, token_slots: torch.Tensor, stacks: IA3Stacks) -> torch.Tensor:
    """out = base(x * inp[s_t]) * out[s_t] per token, in a fixed sequence of ops (no host sync):
    the reference's three cases at once, since the side a slot does not scale holds ones.
    x: [T, in], token_slots: [T] int64 -> [T, out]."""
    return base(x * stacks.inp.index_select(0, token_slots)) * stacks.out.index_select(0, token_slots)
