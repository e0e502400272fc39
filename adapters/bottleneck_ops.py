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


# -- gathered path: fixed shapes, no host sync, for captured decode steps -----------------------
ACTIVATION_IDS = {name: i for i, name in enumerate(ACTIVATIONS)}  # the stacks store an activation's index


class BottleneckStacks:
    """Every slot's bottleneck at one sublayer in fixed-address buffers, for the gathered op.

    `down [h, S, W]`, `down_b [S, W]`, `up [S, W, h]`, `up_b [S, h]` (S = slots + 1, W = the
    largest bottleneck size the stacks take; views `down.view(h, S * W)` and `up.view(S * W, h)`
    are plain matrices), per slot its `scaling`, activation index and whether it reads the
    sublayer input (parallel). A slot's adapter of size b fills its first b columns; the rest, slot
    0 and empty slots stay zero (scaling 0: their delta is exactly 0). `put` / `clear` write in place.
    """

    def __init__(self, num_slots: int, hidden: int, width: int, dtype: torch.dtype, device: torch.device):
        s = num_slots + 1
        self.width = width
        self.down = torch.zeros(hidden, s, width, dtype=dtype, device=device)
        self.down_b = torch.zeros(s, width, dtype=dtype, device=device)
        self.up = torch.zeros(s, width, hidden, dtype=dtype, device=device)
        self.up_b = torch.zeros(s, hidden, dtype=dtype, device=device)
        self.scaling = torch.zeros(s, dtype=dtype, device=device)
        self.act = torch.zeros(s, dtype=torch.long, device=device)
        self.parallel = torch.zeros(s, dtype=torch.bool, device=device)
        self.slot_ids = torch.arange(s, device=device)

    def fits(self, w: BottleneckSlotWeights) -> bool:
        return w.down_w.shape[0] <= self.width

    def put(self, slot: int, w: BottleneckSlotWeights) -> None:
        if not self.fits(w):
            raise ValueError(f"bottleneck size {w.down_w.shape[0]} exceeds the gathered path's {self.width}")
        self.clear(slot)
        b = w.down_w.shape[0]
        self.down[:, slot, :b].copy_(w.down_w.T)
        self.down_b[slot, :b].copy_(w.down_b)
        self.up[slot, :b].copy_(w.up_w.T)
        self.up_b[slot].copy_(w.up_b)
        self.scaling[slot] = w.scaling
        self.act[slot] = ACTIVATION_IDS[w.act]
        self.parallel[slot] = w.parallel

    def clear(self, slot: int) -> None:
        for t in (self.down[:, slot], self.down_b[slot], self.up[slot], self.up_b[slot], self.scaling[slot:slot + 1]):
            t.zero_()
        self.act[slot] = 0
        self.parallel[slot] = False

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.down, self.down_b, self.up, self.up_b))


def bottleneck_add_gathered_(y: torch.Tensor, x: torch.Tensor, token_slots: torch.Tensor,
                             stacks: BottleneckStacks) -> torch.Tensor:
    """In place: y[t] += s * up(act(down(z[t]))) with every term of slot s = token_slots[t] and
    z = x (parallel) or y (sequential), in a fixed sequence of ops (the reference's semantics,
    `bottleneck_reference`). y, x: [T, h], in the model dtype as the segmented path computes.

    As the gathered LoRA op: one matmul with every slot's `down` at once, masked to each token's
    own slot before the activation (act(0) = 0 for every supported activation, so the other
    slots' columns stay exactly 0 after it), each token's activation picked from the four, then one
    matmul with every slot's `up`."""
    hidden, slots, width = stacks.down.shape
    z = torch.where(stacks.parallel.index_select(0, token_slots)[:, None], x, y)  # [T, h]
    own = (stacks.slot_ids[None, :] == token_slots[:, None]).to(y.dtype)[:, :, None]  # [T, S, 1]
    h = torch.mm(z, stacks.down.view(hidden, slots * width)).view(-1, slots, width)  # [T, S, W]
    h = (h + stacks.down_b[None]) * own  # own slot's bias too; others -> 0
    acts = torch.stack([f(h) for f in ACTIVATIONS.values()])  # [4, T, S, W]
    h = acts[stacks.act.index_select(0, token_slots), torch.arange(h.shape[0], device=h.device)]  # [T, S, W]
    delta = torch.mm(h.view(-1, slots * width), stacks.up.view(slots * width, hidden))  # [T, h]
    delta = (delta + stacks.up_b.index_select(0, token_slots)) * stacks.scaling.index_select(0, token_slots)[:, None]
    y.add_(delta)
    return y
