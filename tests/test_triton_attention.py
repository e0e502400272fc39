"""The Triton decode-attention kernel (server/engine/triton_attention.py) against its plain-torch
reference, `table_decode_attention`. Runs on CUDA (benchmarks/gpu_check.sh) and on CPU only under
Triton's interpreter (`TRITON_INTERPRET=1` with Triton installed); the CPU suite has no Triton
and skips it without importing it."""

from __future__ import annotations

import os

import pytest
import torch

from peftserve.server.engine.attention import table_decode_attention
from peftserve.server.engine.kv_cache import blocks_for
from peftserve.server.engine.kv_layout import build_block_table
from peftserve.server.engine.step_state import BlockTable
from tests.test_paged_attention import BS, _pool, _rows

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not torch.cuda.is_available() and not INTERPRET:
    pytest.skip("needs CUDA (or Triton's interpreter: TRITON_INTERPRET=1)", allow_module_level=True)
pytest.importorskip("triton")
pytestmark = pytest.mark.gpu
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_decode_attention_equals_the_torch_form(heads, kv_heads, dtype):
    from peftserve.server.engine.triton_attention import table_decode_attention_triton

    gen = torch.Generator().manual_seed(3)
    dim = 16
    cache = _pool(64, kv_heads, dim, gen)
    rows = _rows(cache, gen, [(0, 1, -1), (3, 1, 0), (4, 1, 1), (11, 1, -1), (7, 1, 0), (15, 1, 0)])
    width = max(len(r.prefix_blocks) + blocks_for(r.own_ctx, BS) for r in rows)
    host = build_block_table(rows, 8, width + 2, BS)
    dev = torch.device(DEVICE)
    k, v = cache.k[0].to(dev, dtype), cache.v[0].to(dev, dtype)
    k[0], v[0] = float("nan"), float("nan")  # entries past a row's width are never read
    k[0, :, 0], v[0, :, 0] = 0.5, 0.25  # but padding rows see the null block's first position
    # a wider table than the rows use, as a bucket gives: the kernel stops at each row's width
    blocks = torch.full((8, width + 5), 0, dtype=torch.long)
    blocks[:, :width + 2] = host.blocks
    table = BlockTable(blocks.to(dev)[:, :width + 2], host.counts.to(dev), host.widths.to(dev))  # row stride > width
    q = torch.randn(8, heads, dim, generator=gen).to(dev, dtype)
    got = table_decode_attention_triton(q, k, v, table, 0.3)
    k_ref, v_ref = k.clone(), v.clone()
    k_ref[0, :, 1:], v_ref[0, :, 1:] = 0.0, 0.0  # the torch form reads every entry (masked): keep it finite
    want = table_decode_attention(q, k_ref, v_ref, table, 0.3)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    assert got.dtype == dtype and torch.isfinite(got.float()).all()


@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_decode_attention_over_blocks_wider_than_its_sub_tile(block_size, dtype):
    """Blocks of more positions than the kernel scores per inner step (SUB_TILE), with key counts
    that end inside a sub-tile, on a block edge, and in a shared prefix's partial block. The
    positions past each entry's keys hold NaN: the kernel must neither read them into the result
    nor stop early; the torch form runs on a copy where they are zero."""
    from peftserve.server.engine.kv_cache import KVCache
    from peftserve.server.engine.kv_layout import RowKV
    from peftserve.server.engine.triton_attention import SUB_TILE, table_decode_attention_triton

    assert block_size >= SUB_TILE
    gen = torch.Generator().manual_seed(9)
    heads, kv_heads, dim = 8, 2, 32
    cache = KVCache(1, 40, block_size, kv_heads, dim, torch.float32, torch.device("cpu"))
    free = torch.randperm(39, generator=gen).add(1).tolist()
    prefix = (free[:2], block_size + 5)  # one full block and 5 keys of the next
    free = free[2:]
    rows = []
    for own_ctx, with_prefix in [(1, False), (SUB_TILE + 1, True), (block_size, False), (block_size + 1, True),
                                 (2 * block_size - 3, False), (3, True), (2 * SUB_TILE, False)]:
        own = [free.pop() for _ in range(blocks_for(own_ctx, block_size))]
        blocks, plen = prefix if with_prefix else ([], 0)
        rows.append(RowKV(own, own_ctx - 1, 1, blocks, plen))
    k = torch.randn(cache.k[0].shape, generator=gen)
    v = torch.randn(cache.v[0].shape, generator=gen)
    k[0], v[0] = 0.5, 0.25  # the null block: padding rows' one key
    clean_k, clean_v = k.clone(), v.clone()
    garbage = torch.ones(k.shape[0], block_size, dtype=torch.bool)  # positions nobody's keys hold
    garbage[0] = False
    for row in rows:
        for entries, tokens in ((row.prefix_blocks, row.prefix_len), (row.own_blocks, row.own_ctx)):
            for j, block in enumerate(entries):
                garbage[block, :max(0, min(block_size, tokens - j * block_size))] = False
    assert garbage[[r.own_blocks[-1] for r in rows if r.own_ctx % SUB_TILE]].any()  # sub-tiles end in garbage
    k.permute(0, 2, 1, 3)[garbage] = float("nan")
    v.permute(0, 2, 1, 3)[garbage] = float("nan")
    clean_k.permute(0, 2, 1, 3)[garbage] = 0.0
    clean_v.permute(0, 2, 1, 3)[garbage] = 0.0
    width = max(len(r.prefix_blocks) + blocks_for(r.own_ctx, block_size) for r in rows)
    host = build_block_table(rows, 10, width + 1, block_size)  # 3 padding rows, one padding entry
    dev = torch.device(DEVICE)
    table = BlockTable(host.blocks.to(dev), host.counts.to(dev), host.widths.to(dev))
    q = torch.randn(10, heads, dim, generator=gen).to(dev, dtype)
    got = table_decode_attention_triton(q, k.to(dev, dtype), v.to(dev, dtype), table, 0.2)
    want = table_decode_attention(q, clean_k.to(dev, dtype), clean_v.to(dev, dtype), table, 0.2)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
