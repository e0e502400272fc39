"""Attention over the paged KV cache, plugged into transformers' attention interface.

transformers' Llama/Qwen2/Mistral attention modules project q/k/v and apply RoPE themselves,
then call the registered attention function. We register `peftserve` and receive the rotated
`[1, heads, T, head_dim]` q/k/v of the whole packed step, plus our StepState and KVCache via
the forward kwargs. We (1) write the new K/V at each token's (block, offset), then (2) attend:
decode rows together over the block pool in place (`paged_decode_attention`), prefill chunks
one by one over their gathered blocks with a causal mask offset by what the row already has
cached (a virtual prefix included). A fixed-shape decode step (static_decode.py, what a CUDA
graph replays) attends by block table instead (`table_decode_attention`).

Semantics, for every query token: softmax(q . k_j * scaling) over exactly the keys j of its
own sequence that precede it (the shared prefix, then its own tokens), times v_j — what
`reference_decode_attention` computes densely, and what the tests hold the fast paths to.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .kv_cache import KVCache
from .step_state import BlockTable, DecodeBlocks, PrefillRow, StepState

ATTN_IMPL = "peftserve"


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                           blocks: DecodeBlocks, scaling: float) -> torch.Tensor:
    """q: [Bd, H, D] one query per decode row -> [Bd, H, D].

    No gather of the pool: own blocks are scored where they lie (pool blocks 0..NBc-1, each
    against its owner's query; blocks of nobody score -inf), shared prefix blocks per (row, block)
    pair, and the softmax is reduced per row across blocks (max, then sum of exp, as in
    flash-decoding). Reads each key once, like a dense matmul over a contiguous cache would, but
    only the blocks in use. Accumulates in float32.
    """
    bd, heads, dim = q.shape
    kv_heads = k_pool.shape[1]
    groups = heads // kv_heads  # query head h reads KV head h // groups
    qg = (q * scaling).reshape(bd, kv_heads, groups, dim).to(k_pool.dtype)  # scaled once, not per key
    nbc = blocks.owner.shape[0]
    parts = [(blocks.owner, blocks.masked, k_pool[:nbc], v_pool[:nbc])]  # views, no copy
    if blocks.shared_blocks.numel():  # prefix blocks: few, shared; gathered per (row, block)
        parts.append((blocks.shared_rows, blocks.shared_masked,
                      k_pool.index_select(0, blocks.shared_blocks), v_pool.index_select(0, blocks.shared_blocks)))
    scores = []
    row_max = q.new_full((bd + 1, kv_heads, groups), float("-inf"), dtype=torch.float32)
    for rows, masked, k, _ in parts:
        # nobody's blocks (row Bd) score against row 0's query: any finite query, all masked below
        s = torch.matmul(qg.index_select(0, rows.clamp(max=bd - 1)), k.transpose(-1, -2)).float()
        s.masked_fill_(masked, float("-inf"))  # [N, KVH, G, bs]
        row_max.scatter_reduce_(0, rows[:, None, None].expand(-1, kv_heads, groups), s.amax(-1), "amax")
        scores.append(s)
    row_max[bd] = 0.0  # nobody's blocks are all masked: keep exp(-inf - max) = 0, not NaN
    num = q.new_zeros(bd + 1, kv_heads, groups, dim, dtype=torch.float32)
    den = q.new_zeros(bd + 1, kv_heads, groups, dtype=torch.float32)
    for (rows, _, _, v), s in zip(parts, scores):
        e = s.sub_(row_max.index_select(0, rows)[..., None]).exp_()  # [N, KVH, G, bs], in place
        den.index_add_(0, rows, e.sum(-1))
        num.index_add_(0, rows, torch.matmul(e.to(v.dtype), v).float())  # [N, KVH, G, D]
    out = num[:bd] / den[:bd, ..., None]
    return out.reshape(bd, heads, dim).to(q.dtype)


def table_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                           table: BlockTable, scaling: float) -> torch.Tensor:
    """q: [B, H, D] one query per decode row -> [B, H, D]; the fixed-shape form for captured steps.

    Every row gathers the NB blocks of its table (shapes depend only on the bucket (B, NB), no
    host sync), then one masked softmax per row. It reads NB blocks per row where
    `paged_decode_attention` reads only the blocks in use: the price of a replayable step, paid
    where launches, not bytes, bound decode (an accelerator); the CPU keeps the dynamic form.
    Accumulates in float32, as the other forms.
    """
    b, heads, dim = q.shape
    nb = table.blocks.shape[1]
    kv_heads, bs = k_pool.shape[1], k_pool.shape[2]
    groups = heads // kv_heads  # query head h reads KV head h // groups
    idx = table.blocks.reshape(-1)

    def gather(pool: torch.Tensor) -> torch.Tensor:  # -> [B, KVH, NB * bs, D]
        got = pool.index_select(0, idx).view(b, nb, kv_heads, bs, dim)
        return got.permute(0, 2, 1, 3, 4).reshape(b, kv_heads, nb * bs, dim)

    k, v = gather(k_pool), gather(v_pool)
    qg = (q * scaling).reshape(b, kv_heads, groups, dim).to(k.dtype)
    s = torch.matmul(qg, k.transpose(-1, -2)).float()  # [B, KVH, G, NB * bs]
    s.masked_fill_(table.masked(bs)[:, None, None, :], float("-inf"))
    probs = torch.softmax(s, dim=-1)
    out = torch.matmul(probs.to(v.dtype), v).float()  # [B, KVH, G, D]
    return out.reshape(b, heads, dim).to(q.dtype)


@functools.cache
def _triton_kernel():
    """The Triton form of table_decode_attention, or None where Triton is not installed (imported
    only once a CUDA tensor reaches attention: the CPU path never imports Triton)."""
    try:
        from .triton_attention import supported, table_decode_attention_triton
    except ImportError:
        return None
    return supported, table_decode_attention_triton


def decode_by_table(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: BlockTable,
                    scaling: float) -> torch.Tensor:
    """A fixed-shape step's decode attention: the Triton kernel on CUDA when available (reads each
    row's own entries in place), else `table_decode_attention` (plain torch, its reference)."""
    kernel = _triton_kernel() if q.is_cuda else None
    if kernel is not None and kernel[0](k_pool):
        return kernel[1](q, k_pool, v_pool, table, scaling)
    return table_decode_attention(q, k_pool, v_pool, table, scaling)


def reference_decode_attention(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                               scaling: float) -> torch.Tensor:
    """The obvious op: q [Bd, H, D]; keys/values per row `[KVH, ctx_r, D]` (dense) -> [Bd, H, D]."""
    outs = []
    for r, (k, v) in enumerate(zip(keys, values)):
        groups = q.shape[1] // k.shape[0]
        k, v = k.repeat_interleave(groups, 0).float(), v.repeat_interleave(groups, 0).float()  # [H, ctx, D]
        probs = torch.softmax(torch.einsum("hd,hcd->hc", q[r].float(), k) * scaling, dim=-1)
        outs.append(torch.einsum("hc,hcd->hd", probs, v))
    return torch.stack(outs).to(q.dtype)


def gather_row(pool: torch.Tensor, row: PrefillRow) -> torch.Tensor:
    """A prefill row's keys (or values) in order: `[KVH, ctx, D]` (a copy of its blocks only)."""
    got = pool.index_select(0, row.blocks)  # [nb, KVH, bs, D]
    flat = got.permute(1, 0, 2, 3).reshape(got.shape[1], -1, got.shape[3])  # [KVH, nb * bs, D]
    return flat[:, :row.ctx] if row.keys is None else flat.index_select(1, row.keys)


def _prefill_attention(q: torch.Tensor, k_row: torch.Tensor, v_row: torch.Tensor,
                       scaling: float) -> torch.Tensor:
    """q: [H, Lq, D] new tokens of one row; k/v_row: [KVH, ctx, D] its whole cache -> [Lq, H, D]."""
    lq, ctx = q.shape[1], k_row.shape[1]
    groups = q.shape[0] // k_row.shape[0]
    k_row, v_row = k_row.to(q.dtype), v_row.to(q.dtype)  # no-op unless the cache is float32
    if groups > 1:  # GQA: expand K/V heads to query heads (cheap view + one copy per chunk)
        k_row = k_row.repeat_interleave(groups, dim=0)
        v_row = v_row.repeat_interleave(groups, dim=0)
    if lq == ctx:
        out = F.scaled_dot_product_attention(q[None], k_row[None], v_row[None], is_causal=True, scale=scaling)
    else:  # earlier chunks / virtual prefix are cached: query i sees keys <= ctx - lq + i
        allowed = torch.ones(lq, ctx, dtype=torch.bool, device=q.device).tril(diagonal=ctx - lq)
        out = F.scaled_dot_product_attention(q[None], k_row[None], v_row[None], attn_mask=allowed, scale=scaling)
    return out[0].transpose(0, 1)


def write_kv(cache: KVCache, layer: int, step: StepState, key: torch.Tensor, value: torch.Tensor) -> None:
    """key/value: [1, KVH, T, D] -> the pool, at each new token's (block, offset)."""
    k = key[0].transpose(0, 1)  # [T, KVH, D]
    v = value[0].transpose(0, 1)
    cache.k[layer][step.write_blocks, :, step.write_offsets] = k.to(cache.k[layer].dtype)
    cache.v[layer][step.write_blocks, :, step.write_offsets] = v.to(cache.v[layer].dtype)


def peftserve_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor, attention_mask, scaling: float | None = None,
                        dropout: float = 0.0, **kwargs):
    step: StepState = kwargs["peftserve_step"]
    cache: KVCache = kwargs["peftserve_cache"]
    layer = module.layer_idx
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    write_kv(cache, layer, step, key, value)
    q = query[0]  # [H, T, D]
    k_pool, v_pool = cache.k[layer], cache.v[layer]
    if step.table is not None:  # a fixed-shape decode step: every token is a decode row
        return decode_by_table(q.transpose(0, 1), k_pool, v_pool, step.table, scaling)[None], None
    out = q.new_empty(q.shape[1], q.shape[0], q.shape[2])  # [T, H, D]
    if step.decode is not None:
        dec_q = q[:, step.decode_tokens].transpose(0, 1)  # [Bd, H, D]
        out[step.decode_tokens] = paged_decode_attention(dec_q, k_pool, v_pool, step.decode, scaling)
    for row in step.prefill:
        out[row.start:row.end] = _prefill_attention(q[:, row.start:row.end], gather_row(k_pool, row),
                                                    gather_row(v_pool, row), scaling)
    return out[None], None  # [1, T, H, D]


def register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPL, peftserve_attention)
    # We never let transformers build a mask (we drive the layers ourselves), but keep the
    # mask interface consistent in case a model's own forward is called with our impl.
    AttentionMaskInterface.register(ATTN_IMPL, lambda *args, **kwargs: None)
