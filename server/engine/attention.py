"""Attention over the slot KV cache, plugged into transformers' attention interface.

transformers' Llama/Qwen2/Mistral attention modules project q/k/v and apply RoPE themselves,
then call the registered attention function. We register `peftserve` and receive the rotated
`[1, heads, T, head_dim]` q/k/v of the whole packed step, plus our StepState and KVCache via
the forward kwargs. We (1) scatter the new K/V into each sequence's cache row, then (2) attend:
decode rows together as one batched matmul over a view of the cache, prefill chunks one by one
with a causal mask offset by what the row already has cached (a virtual prefix included).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kv_cache import KVCache
from .step_state import StepState

ATTN_IMPL = "peftserve"


def decode_mask(slots: list[int], ctx_lens: list[int], num_slots: int, max_len: int,
                dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive mask `[S, 1, 1, L]`: slot s may see cache positions < its context length.

    Slots without a decode row this step see position 0 only (their result is discarded; this
    keeps the softmax finite).
    """
    lens = torch.ones(num_slots, dtype=torch.long)
    lens[torch.tensor(slots, dtype=torch.long)] = torch.tensor(ctx_lens, dtype=torch.long)
    visible = torch.arange(max_len)[None, :] < lens[:, None]  # [S, L]
    mask = torch.zeros(num_slots, max_len, dtype=dtype)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    return mask.to(device)[:, None, None, :]


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      step: StepState, scaling: float) -> torch.Tensor:
    """q: [H, Bd, D] decode queries -> [Bd, H, D]."""
    mask = step.decode_mask  # [S, 1, 1, L]
    num_slots, max_len = mask.shape[0], mask.shape[-1]
    heads, _, dim = q.shape
    kv_heads = k_cache.shape[1]
    groups = heads // kv_heads
    # Queries scattered to their slot; rows of idle slots stay zero and are ignored.
    q_full = k_cache.new_zeros(num_slots, heads, dim)  # in the cache's dtype (see engine.py)
    q_full[step.decode_slots] = q.transpose(0, 1).to(k_cache.dtype)
    q_full = q_full.view(num_slots, kv_heads, groups, dim)  # [S, KVH, G, D]
    k = k_cache[:num_slots, :, :max_len]  # view, no copy: [S, KVH, L, D]
    v = v_cache[:num_slots, :, :max_len]
    scores = torch.matmul(q_full, k.transpose(-1, -2)) * scaling + mask  # [S, KVH, G, L]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(k.dtype)
    out = torch.matmul(probs, v)  # [S, KVH, G, D]
    return out.view(num_slots, heads, dim)[step.decode_slots].to(q.dtype)


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
    """key/value: [1, KVH, T, D] -> cache rows at (slot, position) of each token."""
    k = key[0].transpose(0, 1)  # [T, KVH, D]
    v = value[0].transpose(0, 1)
    cache.k[layer][step.token_kv_slots, :, step.cache_pos] = k.to(cache.k[layer].dtype)
    cache.v[layer][step.token_kv_slots, :, step.cache_pos] = v.to(cache.v[layer].dtype)


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
    out = q.new_empty(q.shape[1], q.shape[0], q.shape[2])  # [T, H, D]
    if step.decode_rows:
        out[step.decode_tokens] = _decode_attention(q[:, step.decode_tokens], cache.k[layer], cache.v[layer],
                                                    step, scaling)
    for row, start, end in step.prefill_rows:
        slot, ctx = step.kv_slots[row], step.ctx_lens[row]
        out[start:end] = _prefill_attention(q[:, start:end], cache.k[layer][slot, :, :ctx],
                                            cache.v[layer][slot, :, :ctx], scaling)
    return out[None], None  # [1, T, H, D]


def register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPL, peftserve_attention)
    # We never let transformers build a mask (we drive the layers ourselves), but keep the
    # mask interface consistent in case a model's own forward is called with our impl.
    AttentionMaskInterface.register(ATTN_IMPL, lambda *args, **kwargs: None)
