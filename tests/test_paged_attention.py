"""The paged KV cache's attention fast paths against the obvious dense op (attention.py).

Random block tables (own blocks scattered through the pool, shared prefix blocks with a partial
tail, GQA, blocks of other sequences and free blocks holding garbage in the scored range): the
in-place decode attention and the prefill gather must equal softmax(q k^T) v over exactly each
row's keys.
"""

from __future__ import annotations

import pytest
import torch

from peftserve.server.engine.attention import (gather_row, paged_decode_attention, reference_decode_attention,
                                               table_decode_attention)
from peftserve.server.engine.kv_cache import KVCache, blocks_for, pool_blocks
from peftserve.server.engine.kv_layout import RowKV, build_block_table, build_kv_step
from peftserve.server.engine.step_state import AdapterBatch, BlockTable

BS = 4
# The same checks on CUDA where there is one (benchmarks/gpu_check.sh); the CPU suite skips them.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]


def _pool(num_blocks: int, kv_heads: int, dim: int, gen: torch.Generator, device: str = "cpu") -> KVCache:
    cache = KVCache(1, num_blocks, BS, kv_heads, dim, torch.float32, torch.device(device))
    cache.k[0].copy_(torch.randn(cache.k[0].shape, generator=gen))
    cache.v[0].copy_(torch.randn(cache.v[0].shape, generator=gen))
    return cache


def _rows(cache: KVCache, gen: torch.Generator, specs: list[tuple[int, int, int]]) -> list[RowKV]:
    """specs: (own tokens already computed, new tokens, prefix id or -1) -> rows with blocks drawn
    from the pool in a shuffled order (so owners interleave), prefixes shared between rows."""
    free = torch.randperm(cache.pool.num_blocks - 1, generator=gen).add(1).tolist()
    prefixes = {0: (free[:2], 7), 1: (free[2:3], 4)}  # 7 tokens: one full block and a partial one
    free = free[3:]
    rows = []
    for done, n, prefix in specs:
        own = [free.pop() for _ in range(blocks_for(done + n, BS))]
        blocks, plen = prefixes.get(prefix, ([], 0))
        rows.append(RowKV(own, done, n, blocks, plen))
    return rows


def _dense(cache: KVCache, row: RowKV) -> tuple[torch.Tensor, torch.Tensor]:
    """The row's keys/values in order, read the slow way: prefix then own tokens."""
    pk, pv = cache.read(0, row.prefix_blocks, row.prefix_len) if row.prefix_blocks else (None, None)
    ok, ov = cache.read(0, row.own_blocks, row.own_ctx)
    if pk is None:
        return ok, ov
    return torch.cat([pk, ok], dim=1), torch.cat([pv, ov], dim=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_decode_attention_over_the_pool_equals_the_dense_reference(heads, kv_heads, device):
    gen = torch.Generator().manual_seed(0)
    dim = 8
    cache = _pool(64, kv_heads, dim, gen, device)
    specs = [(0, 1, -1), (3, 1, 0), (4, 1, 1), (11, 1, -1), (7, 1, 0), (15, 1, 0)]
    rows = _rows(cache, gen, specs)
    dev = torch.device(device)
    step, _ = build_kv_step(rows, AdapterBatch.build([0] * len(rows), [1] * len(rows), dev), BS, dev)
    assert step.decode is not None and step.decode.shared_blocks.numel() > 0
    q = torch.randn(len(rows), heads, dim, generator=gen).to(dev)
    got = paged_decode_attention(q, cache.k[0], cache.v[0], step.decode, 0.3)
    keys, values = zip(*(_dense(cache, r) for r in rows))
    want = reference_decode_attention(q, list(keys), list(values), 0.3)
    tol = 1e-5 if device == "cpu" else 1e-4  # CUDA sums in another order
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_fixed_shape_decode_attention_by_block_table_equals_the_dense_reference(heads, kv_heads, device):
    """The graph-safe form: tables padded to a wider bucket and extra padding rows (which must
    stay finite: they attend to the null block); the real rows equal the reference."""
    gen = torch.Generator().manual_seed(2)
    dim = 8
    cache = _pool(64, kv_heads, dim, gen, device)
    rows = _rows(cache, gen, [(0, 1, -1), (3, 1, 0), (4, 1, 1), (11, 1, -1), (7, 1, 0)])
    width = max(len(r.prefix_blocks) + blocks_for(r.own_ctx, BS) for r in rows)
    table = build_block_table(rows, 8, width + 3, BS)  # 3 padding rows, 3 padding entries
    masked = table.masked(BS)
    assert table.widths.tolist() == [len(r.prefix_blocks) + blocks_for(r.own_ctx, BS) for r in rows] + [1] * 3
    dev = torch.device(device)
    q = torch.randn(8, heads, dim, generator=gen).to(dev)
    on_dev = BlockTable(table.blocks.to(dev), table.counts.to(dev), table.widths.to(dev))
    got = table_decode_attention(q, cache.k[0], cache.v[0], on_dev, 0.3)
    keys, values = zip(*(_dense(cache, r) for r in rows))
    want = reference_decode_attention(q[:len(rows)], list(keys), list(values), 0.3)
    tol = 1e-5 if device == "cpu" else 1e-4
    torch.testing.assert_close(got[:len(rows)], want, rtol=tol, atol=tol)
    assert torch.isfinite(got).all()
    assert (~masked).sum(1).tolist() == [r.ctx for r in rows] + [1] * 3  # exactly each row's keys


def _table_row_by_row(rows: list[RowKV], batch: int, width: int) -> BlockTable:
    """The obvious form of build_block_table: each row's entries and their key counts, one by one."""
    blocks = torch.zeros(batch, width, dtype=torch.long)
    counts = torch.zeros(batch, width, dtype=torch.long)
    widths = torch.ones(batch, dtype=torch.long)
    counts[len(rows):, 0] = 1  # padding rows: one key, position 0 of the null block
    for r, row in enumerate(rows):
        own = row.own_blocks[:blocks_for(row.own_ctx, BS)]
        keys = [min(BS, row.prefix_len - j * BS) for j in range(len(row.prefix_blocks))]
        keys += [min(BS, row.own_ctx - j * BS) for j in range(len(own))]
        entries = row.prefix_blocks + own
        blocks[r, :len(entries)] = torch.tensor(entries)
        counts[r, :len(entries)] = torch.tensor(keys)
        widths[r] = len(entries)
    return BlockTable(blocks, counts, widths)


def test_block_table_equals_the_row_by_row_form():
    """Random rows (own lengths across block edges, with and without prefixes of a partial last
    block) in tables with padding rows and entries: every tensor equal to the obvious form."""
    gen = torch.Generator().manual_seed(7)
    cache = _pool(512, 1, 2, gen)
    for _ in range(40):
        n = int(torch.randint(1, 12, (1,), generator=gen))
        specs = [(int(torch.randint(0, 30, (1,), generator=gen)), 1, int(torch.randint(-1, 2, (1,), generator=gen)))
                 for _ in range(n)]
        rows = _rows(cache, gen, specs)
        width = max(len(r.prefix_blocks) + blocks_for(r.own_ctx, BS) for r in rows)
        for batch, wide in ((n, width), (n + 3, width + 2)):
            got, want = build_block_table(rows, batch, wide, BS), _table_row_by_row(rows, batch, wide)
            for a, b in zip((got.blocks, got.counts, got.widths), (want.blocks, want.counts, want.widths)):
                assert a.dtype == torch.long and torch.equal(a, b)
    with pytest.raises(ValueError):
        build_block_table(rows, n, width - 1, BS)  # a row does not fit the width
    with pytest.raises(ValueError):
        build_block_table(rows, n - 1 if n > 1 else 0, width, BS)  # more rows than the table has


def test_decode_attention_ignores_nan_in_blocks_it_does_not_own():
    """Blocks of nobody in the scored range (free, or another sequence's) may hold anything."""
    gen = torch.Generator().manual_seed(1)
    cache = _pool(32, 2, 8, gen)
    rows = _rows(cache, gen, [(5, 1, -1), (2, 1, 1)])
    used = {b for r in rows for b in r.own_blocks + r.prefix_blocks}
    for b in range(1, 32):
        if b not in used:
            cache.k[0][b] = float("nan")
            cache.v[0][b] = float("nan")
    step, _ = build_kv_step(rows, AdapterBatch.build([0, 0], [1, 1], torch.device("cpu")), BS, torch.device("cpu"))
    q = torch.randn(2, 4, 8, generator=gen)
    got = paged_decode_attention(q, cache.k[0], cache.v[0], step.decode, 0.5)
    keys, values = zip(*(_dense(cache, r) for r in rows))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, reference_decode_attention(q, list(keys), list(values), 0.5))


def test_prefill_gather_returns_prefix_then_own_tokens_in_order():
    gen = torch.Generator().manual_seed(2)
    cache = _pool(32, 2, 8, gen)
    rows = _rows(cache, gen, [(0, 6, 0), (4, 5, -1), (2, 3, 1)])
    step, positions = build_kv_step(rows, AdapterBatch.build([0] * 3, [6, 5, 3], torch.device("cpu")),
                                    BS, torch.device("cpu"))
    assert [p.row for p in step.prefill] == [0, 1, 2]
    for prow, row in zip(step.prefill, rows):
        k, v = _dense(cache, row)
        assert torch.equal(gather_row(cache.k[0], prow), k) and torch.equal(gather_row(cache.v[0], prow), v)
    # RoPE positions continue after the virtual tokens; K/V go to the own blocks
    assert positions.tolist() == list(range(7, 13)) + list(range(4, 9)) + list(range(6, 9))
    first = rows[0]
    assert step.write_blocks[:6].tolist() == [first.own_blocks[p // BS] for p in range(6)]
    assert step.write_offsets[:6].tolist() == [p % BS for p in range(6)]


def test_blocks_are_zeroed_when_handed_out_and_the_lowest_go_first():
    cache = KVCache(2, 9, BS, 1, 2, torch.float32, torch.device("cpu"))
    for t in cache.k + cache.v:
        t.fill_(float("nan"))
    blocks = cache.alloc(3)
    assert blocks == [1, 2, 3]
    assert all(torch.equal(t[blocks], torch.zeros_like(t[blocks])) for t in cache.k + cache.v)
    cache.free([2])
    assert cache.alloc(1) == [2]


def test_grown_blocks_are_zeroed_together_before_use_and_never_after_another_owner_wrote():
    """`grow` defers the zeroing to `zero_grown` (one fill per tensor per step); a grown block
    freed before that is not zeroed later under its next owner (`alloc` zeroes it at once)."""
    cache = KVCache(2, 9, BS, 1, 2, torch.float32, torch.device("cpu"))
    for t in cache.k + cache.v:
        t.fill_(float("nan"))
    a, b = [], []
    assert cache.grow(a, 2 * BS) and cache.grow(b, BS + 1) and a == [1, 2] and b == [3, 4]
    assert all(torch.isnan(t[1:5]).all() for t in cache.k)  # not yet: the runner zeroes before its forward
    cache.free(b)
    again = cache.alloc(1)  # b's first block, zeroed now, then written by its new owner
    assert again == [3]
    for t in cache.k + cache.v:
        t[3].fill_(7.0)
    cache.zero_grown()
    assert all(torch.equal(t[1:3], torch.zeros_like(t[1:3])) for t in cache.k + cache.v)
    assert all((t[3] == 7.0).all() for t in cache.k + cache.v)  # the new owner's K/V survive
    assert all(torch.isnan(t[4]).all() for t in cache.k)  # free, never handed out again: untouched
    assert cache.grow(a, 2 * BS + 1) and a == [1, 2, 4]
    k, _ = cache.read(0, a, 2 * BS + 1)  # a reader never sees a grown block unzeroed
    assert torch.equal(k, torch.zeros_like(k))


def test_pool_size_follows_the_budget_and_refuses_one_that_cannot_hold_a_request():
    per_token = 1000
    # default: room for every sequence at full length, capped by the default budget
    assert pool_blocks(None, 4, 100, 10, per_token) == 4 * 11 + 1
    assert pool_blocks(None, 64, 8192, 64, per_token * 46) == (4 << 30) // (64 * per_token * 46) + 1
    assert pool_blocks(10_000_000, 64, 100, 10, per_token) == 1000 + 1
    with pytest.raises(ValueError, match="max_model_len"):
        pool_blocks(50_000, 64, 100, 10, per_token)  # 5 blocks < one 100-token sequence


def test_prefix_cache_gives_blocks_back_when_it_evicts_and_never_evicts_pinned():
    from peftserve.server.runtime.slots import KVPrefix, PrefixCache

    cache = KVCache(1, 11, BS, 1, 2, torch.float32, torch.device("cpu"))
    prefixes = PrefixCache(max_bytes=1 << 30)
    for key in ("a", "b", "c"):
        blocks = cache.alloc(2)
        prefixes.put(key, KVPrefix(blocks, 7, nbytes=2 * cache.block_nbytes, release=cache.free))
    assert cache.pool.num_free == 4
    prefixes.pin("a")
    prefixes.get("b")  # b is now the most recently used: c, then b go first (a is pinned)
    assert prefixes.reclaim(3) == 4 and list(prefixes.prefixes) == ["a"]
    assert cache.pool.num_free == 8
    prefixes.max_bytes = 0
    prefixes.trim()  # over budget, but pinned: kept
    assert list(prefixes.prefixes) == ["a"]
    prefixes.unpin("a")
    prefixes.discard("a")
    assert cache.pool.num_free == 10 and not prefixes.prefixes
