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
