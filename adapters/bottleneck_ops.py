"""Batched bottleneck adapters for a packed token axis where every token may use a different adapter.

Semantics (h = hidden size, b = bottleneck size, s = scaling, A(z) = up(act(down(z)))): a
bottleneck adapter wraps one sublayer (attention or MLP) of a decoder layer. For token t with
adapter slot s_t, sublayer input x[t] and sublayer output y[t]:

    sequential (houlsby, pfeiffer):  y'[t] = y[t] + s * A(y[t])
    parallel:                        y'[t] = y[t] + s * A(x[t])
    no adapter at this sublayer:     y'[t] = y[t]

`bottleneck_delta` is the one home of `s * A(z)`: the training/reference wrapper of
adapters/bottleneck.py (`attach_bottleneck`) and the serving path (`BottleneckSlotWeights`)
both call it. `bottleneck_reference` applies it token by token; the fast path
`bottleneck_add_segmented_` relies on the runner ordering rows by slot, so each slot's tokens
are one contiguous `(slot, start, end)` segment: one adapter forward per (segment, sublayer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


def bottleneck_delta(z: torch.Tensor, down_w: torch.Tensor, down_b: torch.Tensor, up_w: torch.Tensor,
                     up_b: torch.Tensor, act: str, scaling: float) -> torch.Tensor:
    """z [..., h] -> scaling * up(act(down(z))) [..., h]. Differentiable (training uses it)."""
    return scaling * F.linear(ACTIVATIONS[act](F.linear(z, down_w, down_b)), up_w, up_b)


@dataclass(frozen=True)
class BottleneckSlotWeights:
    """One adapter's bottleneck at one sublayer, on the serving device."""

    down_w: torch.Tensor  # [b, hidden]
    down_b: torch.Tensor  # [b]
    up_w: torch.Tensor  # [hidden, b]
    up_b: torch.Tensor  # [hidden]
    act: str
    scaling: float
    parallel: bool  # reads the sublayer input instead of its output

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return bottleneck_delta(z, self.down_w, self.down_b, self.up_w, self.up_b, self.act, self.scaling)


def bottleneck_reference(y: torch.Tensor, x: torch.Tensor, token_slots: torch.Tensor,
                         weights: dict[int, BottleneckSlotWeights]) -> torch.Tensor:
    """y: sublayer output [T, h], x: sublayer input [T, h], token_slots: [T] -> y' [T, h] (a new
    tensor). One token at a time: slow, obviously right."""
    rows = []
    for t in range(y.shape[0]):
        w = weights.get(int(token_slots[t]))
        yt = y[t:t + 1]
        rows.append(yt if w is None else yt + w(x[t:t + 1] if w.parallel else yt))
    return torch.cat(rows) if rows else y.clone()


def bottleneck_add_segmented_(y: torch.Tensor, x: torch.Tensor, segments: list[tuple[int, int, int]],
                              weights: dict[int, BottleneckSlotWeights]) -> torch.Tensor:
    """In place: y[s:e] += A_slot(x[s:e] if parallel else y[s:e]) for every (slot, s, e) segment.
    y: the sublayer output [T, h] (the caller owns it: clone the module's output first), x: its input."""
    for slot, start, end in segments:
        w = weights.get(slot)
        if w is not None:
            z = x[start:end] if w.parallel else y[start:end]
            y[start:end] = y[start:end] + w(z)
    return y
