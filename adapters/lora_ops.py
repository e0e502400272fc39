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

Storage dtype (`--adapter-dtype`, `LoraSlotWeights(..., dtype=)`): float32 (the default) is
PEFT's numerics exactly. bfloat16 / float16 *store* A and B in that dtype (half the bytes that
every decode step reads: with many adapters those bytes, not FLOPs, bound multi-LoRA decode)
and upcast them to float32 at each matmul, so x, the rank-r intermediate, the delta and its
addition stay float32: the only difference from PEFT is the one-time rounding of A and B to
8 (bf16) or 11 (fp16) significant bits, never an accumulation in low precision. Why upcast per
matmul rather than a bf16 matmul (oneDNN accumulates those in fp32 too): the intermediate
[T, r] would be rounded to bf16 between the two matmuls, and on a CPU without native bf16
(AVX2 only) a bf16 matmul of these shapes is 5-30x slower than the float32 one, while the
upcast (a cast of [in, r] / [r, out], cache-resident at these ranks) costs about as much as it
saves in memory traffic there; measured on a 2-core AVX2 EPYC, best of 5 (us per module, k
adapters x L tokens, hidden 576): k8 L2 r64: fp32 222, bf16-stored+upcast 173, bf16 matmul
1383; k8 L2 r8: 18 / 33 / 178; one adapter x 64 tokens r16: 56 / 70 / 5121. End to end there
(default model fp32, 64 requests x 16 new, 32 LoRAs r8-64 q,k,v,o, busy box): 108 tok/s fp32 storage,
106 bf16 storage — a wash on AVX2; the gain is expected where adapter bytes bound the step (bf16
base on a bf16 CPU: issue 13's memory-traffic floor), to be measured by benchmarks/lora.py part 5.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class LoraSlotWeights:
    """One adapter's LoRA at one module, on the serving device, stored in `dtype` (float32 = PEFT's
    numerics; bfloat16/float16 = half the bytes, upcast to float32 at each matmul)."""

    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scale: float
    At: torch.Tensor = None  # [in, r] contiguous: the layout the matmul wants (= A.T, no copy, when A is that view)
    Bt: torch.Tensor = None  # [r, out]
    dtype: torch.dtype = torch.float32  # storage dtype of A, B, At, Bt

    def __post_init__(self):
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"LoRA storage dtype must be one of {STORAGE_DTYPES}, not {self.dtype}")
        if self.A.dtype != self.dtype or self.B.dtype != self.dtype:  # (a no-op `.to` still costs ~1 us)
            object.__setattr__(self, "A", self.A.to(self.dtype))
            object.__setattr__(self, "B", self.B.to(self.dtype))
        if self.dtype == torch.float16 and not (torch.isfinite(self.A).all() and torch.isfinite(self.B).all()):
            # the admission check (adapters/admission.py) bounds the float32 weights; float16 storage
            # overflows above 65504: refuse the install (its rows fail alone) rather than serve inf
            raise ValueError("LoRA weights exceed float16's range (65504): use --adapter-dtype bfloat16 or float32")
        object.__setattr__(self, "At", self.A.T.contiguous())
        object.__setattr__(self, "Bt", self.B.T.contiguous())

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def nbytes(self) -> int:
        """Device bytes of this entry (A, B and their transposed copies), in the storage dtype. A
        transposed view is no copy: a loaded LoRA's A and B are the transposed views of At and Bt
        (adapters/lora.py), so each pair is counted once."""
        distinct = {t.data_ptr(): t for t in (self.A, self.B, self.At, self.Bt)}  # a view starts where its tensor does
        return sum(t.numel() * t.element_size() for t in distinct.values())


def lora_delta_reference(x: torch.Tensor, token_slots: torch.Tensor,
                         weights: dict[int, LoraSlotWeights]) -> torch.Tensor:
    """x: [T, in], token_slots: [T] -> delta [T, out]. One token at a time: slow, obviously right."""
    out_dim = next(iter(weights.values())).B.shape[0] if weights else 0
    delta = torch.zeros(x.shape[0], out_dim, dtype=torch.float32, device=x.device)
    for t in range(x.shape[0]):
        w = weights.get(int(token_slots[t]))
        if w is not None:
            delta[t] = ((x[t:t + 1].float() @ w.A.float().T) @ w.B.float().T)[0] * w.scale
    return delta


def lora_add_segmented_(out: torch.Tensor, x: torch.Tensor, segments: list[tuple[int, int, int]],
                        weights: dict[int, LoraSlotWeights]) -> torch.Tensor:
    """In place: out[s:e] += LoRA_slot(x[s:e]) for every (slot, s, e) segment. out: [T, out], x: [T, in]."""
    same = out.dtype == torch.float32
    rows = x.shape[0]
    for slot, start, end in segments:
        w = weights.get(slot)
        if w is None:
            continue
        # (a segment of every row, e.g. a lone request's prefill, skips the slicing: ~10 us of
        # the ~40 this costs per module at 8 tokens, times every adapted module)
        xs, outs = (x, out) if start == 0 and end == rows else (x[start:end], out[start:end])
        At, Bt = (w.At, w.Bt) if w.dtype == torch.float32 else (w.At.float(), w.Bt.float())
        delta = torch.mm(torch.mm(xs.float(), At), Bt).mul_(w.scale)  # [n, out] float32
        if same:
            outs.add_(delta)
        else:  # PEFT: bf16 result + fp32 delta promotes to fp32, then casts back. Added into the
            # delta (IEEE addition commutes: the same bits) and cast back by the copy
            outs.copy_(delta.add_(outs))
    return out


# -- grouped fast path: few ops per module however many adapters share the step -----------------
GROUP_MIN_SEGMENTS = 4  # below this, the plain per-segment loop is cheaper


@dataclass
class _Group:
    slots: tuple[int, ...]  # the adapters of one rank at this module
    pad_idx: torch.Tensor  # [k, L] token index per (adapter, position); T = the zero row (padding)
    valid: torch.Tensor  # [k * L] bool: which padded positions are real tokens
    dest: torch.Tensor  # [n] token index of each real position, in `valid` order


def _plan(active: list[tuple[int, int, int]], ranks: dict[int, int], total: int, device) -> list[_Group]:
    by_rank: dict[int, list[tuple[int, int, int]]] = {}
    for seg in active:
        by_rank.setdefault(ranks[seg[0]], []).append(seg)
    groups = []
    for segs in by_rank.values():
        longest = max(e - s for _, s, e in segs)
        pad = torch.full((len(segs), longest), total, dtype=torch.long)
        for row, (_, s, e) in enumerate(segs):
            pad[row, : e - s] = torch.arange(s, e)
        valid = (pad != total).reshape(-1)
        groups.append(_Group(tuple(slot for slot, _, _ in segs), pad.to(device), valid.to(device),
                             pad.reshape(-1)[valid].to(device)))
    return groups


def lora_add_grouped_(out: torch.Tensor, x: torch.Tensor, segments: list[tuple[int, int, int]],
                      weights: dict[int, LoraSlotWeights], stacks: dict, plans: dict) -> torch.Tensor:
    """Same result as `lora_add_segmented_`, in ~6 ops per *rank group* instead of ~9 per segment.

    Adapters of equal rank at this module are batched: their segments are padded to one length
    ([k, L, in], padding reads a zero row), multiplied by their stacked weights with two bmm's at
    that true rank, scaled per adapter, and index-added back. `stacks` caches the stacked
    weights per slot tuple (owned by the module; cleared when its slots change); `plans` caches
    the padding plans per segment layout (owned by the step, shared by all modules).
    """
    active = [seg for seg in segments if seg[0] in weights]
    if len(active) < GROUP_MIN_SEGMENTS:
        return lora_add_segmented_(out, x, active, weights)
    ranks = {slot: weights[slot].rank for slot, _, _ in active}
    key = (tuple(active), tuple(ranks.values()))
    groups = plans.get(key)
    if groups is None:
        groups = plans[key] = _plan(active, ranks, x.shape[0], x.device)
    x_ext = torch.cat([x.float(), x.new_zeros(1, x.shape[1], dtype=torch.float32)])  # [T + 1, in]
    acc = out if out.dtype == torch.float32 else out.float()
    for g in groups:
        stacked = stacks.get(g.slots)
        if stacked is None:
            stacked = stacks[g.slots] = (
                torch.stack([weights[s].At for s in g.slots]),  # [k, in, r]
                torch.stack([weights[s].Bt for s in g.slots]),  # [k, r, out]
                torch.tensor([weights[s].scale for s in g.slots], device=x.device).view(-1, 1, 1),
            )
        At, Bt, scale = stacked  # stored in the adapters' dtype, upcast per step (no-op for fp32)
        delta = torch.bmm(torch.bmm(x_ext[g.pad_idx], At.float()), Bt.float()).mul_(scale)  # [k, L, out]
        acc.index_add_(0, g.dest, delta.reshape(-1, delta.shape[-1])[g.valid])
    if acc is not out:
        out.copy_(acc)
    return out


# -- gathered path: fixed shapes, no host sync, for captured decode steps -----------------------
class LoraStacks:
    """Every slot's LoRA at one module in fixed-address buffers, for the gathered op.

    `A [in, S, R]` and `B [S, R, out]` (S = slots + 1, R = the largest rank the stacks take) in
    the storage dtype, and `scale [S]` float32; laid out so that `A.view(in, S * R)` and
    `B.view(S * R, out)` are plain matrices. A slot's adapter of rank r fills its first r rank
    columns and the rest stays zero, so the padding adds exact zeros; slot 0 ("no adapter") and
    empty slots are all zero. `put` / `clear` write in place: a captured graph that read these
    buffers sees the new adapter on its next replay.
    """

    def __init__(self, num_slots: int, in_features: int, out_features: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device):
        self.max_rank = max_rank
        self.A = torch.zeros(in_features, num_slots + 1, max_rank, dtype=dtype, device=device)
        self.B = torch.zeros(num_slots + 1, max_rank, out_features, dtype=dtype, device=device)
        self.scale = torch.zeros(num_slots + 1, dtype=torch.float32, device=device)
        self.ranks = torch.zeros(num_slots + 1, dtype=torch.int32, device=device)  # [S] true rank (0 = empty)
        self.slot_ids = torch.arange(num_slots + 1, device=device)  # [S]

    def fits(self, w: LoraSlotWeights) -> bool:
        return w.rank <= self.max_rank

    def put(self, slot: int, w: LoraSlotWeights) -> None:
        if not self.fits(w):
            raise ValueError(f"LoRA rank {w.rank} exceeds the gathered path's max rank {self.max_rank}")
        self.clear(slot)
        self.A[:, slot, :w.rank].copy_(w.At)
        self.B[slot, :w.rank].copy_(w.Bt)
        self.scale[slot] = w.scale
        self.ranks[slot] = w.rank

    def clear(self, slot: int) -> None:
        self.A[:, slot].zero_()
        self.B[slot].zero_()
        self.scale[slot] = 0.0
        self.ranks[slot] = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.A, self.B, self.scale, self.ranks))


@functools.cache
def _triton_op():
    """adapters/lora_triton.py's kernels where Triton is installed, else None (imported only once
    a CUDA tensor arrives: the CPU path never imports Triton)."""
    try:
        from .lora_triton import lora_add_gathered_triton_
    except ImportError:
        return None
    return lora_add_gathered_triton_


def lora_add_gathered_(out: torch.Tensor, x: torch.Tensor, token_slots: torch.Tensor,
                       stacks: LoraStacks) -> torch.Tensor:
    """The gathered op (semantics: `lora_add_gathered_torch_`): on CUDA with Triton, kernels that
    read each token's own slot at its true rank; otherwise the plain-torch form."""
    op = _triton_op() if x.is_cuda else None
    if op is not None and out.stride(-1) == 1:
        return op(out, x, token_slots, stacks)
    return lora_add_gathered_torch_(out, x, token_slots, stacks)


def lora_add_gathered_torch_(out: torch.Tensor, x: torch.Tensor, token_slots: torch.Tensor,
                       stacks: LoraStacks) -> torch.Tensor:
    """In place: out[t] += ((x[t] @ A_s) @ B_s) * scale_s with s = token_slots[t], for every token
    in a fixed sequence of ops whatever the slots (no host sync: what a CUDA graph can replay).
    x: [T, in], out: [T, out], token_slots: [T] int64. Float32 math and PEFT's promotion.

    Two dense matmuls over all slots at once: x @ A_all gives every token's product with every
    slot's A ([T, S * R]); a mask keeps each token's own slot (other slots' columns become exact
    zeros), scaled per token; that times B_all sums only its own slot's B rows. Each stack is
    read once per step (S x R x (in + out) values) and nothing per token is materialised — for
    decode batches T >= S / 2 that is fewer bytes than gathering each token's matrices (BGMV in
    plain torch: T x R x (in + out) written then read). Prefill keeps the segmented/grouped ops
    at true rank. Masking by multiplication is exact because admission keeps adapter weights
    finite and bounded (adapters/admission.py): another slot's product is finite, times 0 is 0."""
    in_features, slots, rank = stacks.A.shape
    h = torch.mm(x.float(), stacks.A.view(in_features, slots * rank).float()).view(-1, slots, rank)  # [T, S, R]
    own = (stacks.slot_ids[None, :] == token_slots[:, None]).float()  # [T, S]: 1 at the token's slot
    h = h * (own * stacks.scale[None, :])[:, :, None]  # other slots' products -> 0, own one scaled
    delta = torch.mm(h.view(-1, slots * rank), stacks.B.view(slots * rank, -1).float())  # [T, out]
    if out.dtype == torch.float32:
        out.add_(delta)
    else:  # PEFT: bf16 result + fp32 delta promotes to fp32, then casts back
        out.copy_(out.float().add_(delta))
    return out
