"""Triton kernel for fixed-shape decode attention by block table (CUDA only; never imported on CPU).

Same semantics as `attention.table_decode_attention` (its plain-torch reference, which the tests
hold it to): each decode row's query against exactly the keys its table lists. The torch form
gathers all NB table entries of every row into a new tensor and reads it back; this kernel reads
each row's entries in place, only up to the row's width (its own entries, not the bucket's), with
an online softmax across blocks (flash-decoding), so a step's attention reads the blocks in use
once. The loop bound is read from device memory, so the kernel is as replayable by a CUDA graph as
the torch form. One program per (row, query head): decode attention is bound by reading K/V, not
by arithmetic, so vector products (no `tl.dot`, whose 16-wide minimum would need padding) suffice.

Imported lazily by attention.py when a CUDA tensor arrives and Triton is importable; runs on CPU
only under Triton's interpreter (TRITON_INTERPRET=1), which is how it was checked without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SUB_TILE = 16  # key positions scored per inner step (a power of two, <= the block size)


@triton.jit
def _table_decode_kernel(q_ptr, k_ptr, v_ptr, table_ptr, counts_ptr, widths_ptr, out_ptr, scaling,
                         stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_tb, stride_cb,
                         stride_ob, stride_oh,
                         GROUPS: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, SUB: tl.constexpr):
    row = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUPS
    d = tl.arange(0, D)
    t = tl.arange(0, SUB)
    q = tl.load(q_ptr + row * stride_qb + head * stride_qh + d).to(tl.float32) * scaling  # [D]
    m = tl.max(tl.full([SUB], float("-inf"), tl.float32), 0)  # running max (a scalar)
    den = tl.sum(tl.zeros([SUB], tl.float32), 0)  # running sum of exp
    acc = tl.zeros([D], tl.float32)
    width = tl.load(widths_ptr + row)
    for j in range(0, width):
        block = tl.load(table_ptr + row * stride_tb + j)
        keys = tl.load(counts_ptr + row * stride_cb + j)  # the entry's keys: positions [0, keys)
        # SUB positions at a time, and only up to the entry's keys: a [BS, D] tile per step
        # held 255 registers a thread at BS = D = 64 (ptxas, sm_90), a [16, D] one 64
        for s0 in range(0, keys, SUB):
            pos = s0 + t  # [SUB]
            base = block * stride_kb + kv_head * stride_kh + pos[:, None] * stride_kt + d[None, :]
            k = tl.load(k_ptr + base).to(tl.float32)  # [SUB, D]
            s = tl.sum(k * q[None, :], 1)  # [SUB]
            hidden = pos >= keys  # past the entry's keys (the tail of its last sub-tile)
            s = tl.where(hidden, float("-inf"), s)
            m_new = tl.maximum(m, tl.max(s, 0))  # finite: the sub-tile holds at least one key
            p = tl.exp(s - m_new)  # [SUB], 0 where hidden
            alpha = tl.exp(m - m_new)  # 0 on the first sub-tile (m = -inf)
            v = tl.where(hidden[:, None], 0.0, tl.load(v_ptr + base).to(tl.float32))  # [SUB, D]: 0 x junk = 0
            acc = acc * alpha + tl.sum(p[:, None] * v, 0)
            den = den * alpha + tl.sum(p, 0)
            m = m_new
    tl.store(out_ptr + row * stride_ob + head * stride_oh + d, acc / den)


def supported(k_pool: torch.Tensor) -> bool:
    """Block size and head dim must be powers of two (`tl.arange`)."""
    bs, dim = k_pool.shape[2], k_pool.shape[3]
    return bs & (bs - 1) == 0 and dim & (dim - 1) == 0


def table_decode_attention_triton(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table,
                                  scaling: float) -> torch.Tensor:
    """q: [B, H, D]; pools [num_blocks, KVH, bs, D] (contiguous); `table`: a BlockTable (blocks,
    counts [B, NB] with unit column stride, any row stride; widths [B]) -> [B, H, D]."""
    b, heads, dim = q.shape
    kv_heads, bs = k_pool.shape[1], k_pool.shape[2]
    q = q.contiguous()
    out = torch.empty(b, heads, dim, dtype=torch.float32, device=q.device)
    _table_decode_kernel[(b, heads)](
        q, k_pool, v_pool, table.blocks, table.counts, table.widths, out, float(scaling),
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), table.blocks.stride(0),
        table.counts.stride(0), out.stride(0), out.stride(1),
        GROUPS=heads // kv_heads, BS=bs, D=dim, SUB=min(bs, SUB_TILE))
    return out.to(q.dtype)
