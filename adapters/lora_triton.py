"""Triton kernels for the gathered LoRA op (CUDA only; never imported on CPU).

Same semantics as `lora_ops.lora_add_gathered_`'s plain-torch form, which the tests hold them to:
out[t] += ((x[t] @ A_s) @ B_s) * scale_s for s = token_slots[t]. The torch form multiplies every
token by every slot's padded stacks and masks; these kernels read, for each token, only its own
slot's rows up to that slot's true rank (`LoraStacks.ranks`), as BGMV kernels do (punica, vLLM):
tokens of one adapter share its rows through the cache, so a step reads about the bytes of the
adapters in the batch, at their true ranks. Two kernels, shrink (x @ A, scaled, into a small
[T, R] float32 buffer) and expand (that @ B, added to `out` with PEFT's promotion); no host sync
and fixed launch shapes, so a CUDA graph can record them. Vector products, no `tl.dot`: rank
and batch are far below tensor-core tile sizes in decode, and the loads bound the time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_IN = 128
BLOCK_R = 16
BLOCK_OUT = 128


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, slots_ptr, ranks_ptr, scale_ptr, h_ptr, IN, R,
                   stride_xt, stride_ai, stride_as, BLOCK_IN: tl.constexpr, BLOCK_R: tl.constexpr):
    t = tl.program_id(0)
    rb = tl.program_id(1)
    s = tl.load(slots_ptr + t)
    rank = tl.load(ranks_ptr + s)
    r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < rank
    acc = tl.zeros([BLOCK_R], tl.float32)
    for i0 in range(0, IN, BLOCK_IN):
        i = i0 + tl.arange(0, BLOCK_IN)
        imask = i < IN
        xv = tl.load(x_ptr + t * stride_xt + i, mask=imask, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + i[:, None] * stride_ai + s * stride_as + r[None, :],
                    mask=imask[:, None] & rmask[None, :], other=0.0).to(tl.float32)  # [BLOCK_IN, BLOCK_R]
        acc += tl.sum(xv[:, None] * a, 0)
    scale = tl.load(scale_ptr + s)
    tl.store(h_ptr + t * R + r, acc * scale, mask=r < R)


@triton.jit
def _expand_kernel(h_ptr, b_ptr, slots_ptr, ranks_ptr, out_ptr, OUT, R,
                   stride_bs, stride_br, stride_ot, BLOCK_R: tl.constexpr, BLOCK_OUT: tl.constexpr):
    t = tl.program_id(0)
    ob = tl.program_id(1)
    s = tl.load(slots_ptr + t)
    rank = tl.load(ranks_ptr + s)
    o = ob * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    omask = o < OUT
    acc = tl.zeros([BLOCK_OUT], tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        rmask = r < rank
        hv = tl.load(h_ptr + t * R + r, mask=rmask, other=0.0)
        b = tl.load(b_ptr + s * stride_bs + r[:, None] * stride_br + o[None, :],
                    mask=rmask[:, None] & omask[None, :], other=0.0).to(tl.float32)  # [BLOCK_R, BLOCK_OUT]
        acc += tl.sum(hv[:, None] * b, 0)
    cur = tl.load(out_ptr + t * stride_ot + o, mask=omask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_ot + o, (cur + acc).to(out_ptr.dtype.element_ty), mask=omask)


def lora_add_gathered_triton_(out: torch.Tensor, x: torch.Tensor, token_slots: torch.Tensor, stacks) -> torch.Tensor:
    """In place, as `lora_add_gathered_`: x [T, in], out [T, out] (row stride any, unit column
    stride), token_slots [T] int64; `stacks`: a LoraStacks on the same device."""
    t, in_features = x.shape
    _, slots, rank = stacks.A.shape
    out_features = stacks.B.shape[2]
    x = x if x.stride(1) == 1 else x.contiguous()
    if out.stride(1) != 1:
        raise ValueError("out needs unit column stride")
    h = torch.empty(t, rank, dtype=torch.float32, device=x.device)  # [T, R], scale folded in
    _shrink_kernel[(t, triton.cdiv(rank, BLOCK_R))](
        x, stacks.A, token_slots, stacks.ranks, stacks.scale, h, in_features, rank,
        x.stride(0), stacks.A.stride(0), stacks.A.stride(1), BLOCK_IN=BLOCK_IN, BLOCK_R=BLOCK_R)
    _expand_kernel[(t, triton.cdiv(out_features, BLOCK_OUT))](
        h, stacks.B, token_slots, stacks.ranks, out, out_features, rank,
        stacks.B.stride(0), stacks.B.stride(1), out.stride(0), BLOCK_R=BLOCK_R, BLOCK_OUT=BLOCK_OUT)
    return out
