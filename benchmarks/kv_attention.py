"""Decode attention over a paged KV cache: why attention.py scores blocks in place (issue 12).

    .venv/bin/python benchmarks/kv_attention.py --threads 2

One layer's decode attention for R rows (default model's shape: 9 query heads, 3 KV heads,
64 dims, float32), three ways, side by side on the same machine:

- `slots`: the pre-paging layout, one contiguous `max_len` row per sequence; attention reads a
  view `[R, KVH, L, D]` with a length mask (no copy; memory = rows x max_model_len);
- `gather`: the obvious paged op, each row's blocks gathered into a contiguous tensor first;
- `paged`: ours (`attention.paged_decode_attention`): blocks scored where they lie in the pool,
  softmax reduced per row across blocks.

Lengths are either all equal (the slot layout's best case) or uniform in [L/4, L] (its padding
shows). Prints median ms per call and paged / slots.
"""

from __future__ import annotations

import random

import torch

from common import median_seconds, parser, setup, table
from peftserve.server.engine.attention import paged_decode_attention
from peftserve.server.engine.kv_cache import blocks_for
from peftserve.server.engine.kv_layout import RowKV, build_kv_step
from peftserve.server.engine.step_state import AdapterBatch

HEADS, KV_HEADS, DIM = 9, 3, 64


def timed(fn, repeats: int) -> float:
    return 1e3 * median_seconds(fn, repeats, warmup=3)


def case(rows: int, lens: list[int], block_size: int, repeats: int, gen: torch.Generator) -> list:
    max_len = max(lens)
    scale = DIM ** -0.5
    q = torch.randn(rows, HEADS, DIM, generator=gen)
    qg = q.view(rows, KV_HEADS, HEADS // KV_HEADS, DIM)
    # slots: [R, KVH, L, D] rows, additive length mask
    k_rows = torch.randn(rows, KV_HEADS, max_len, DIM, generator=gen)
    v_rows = torch.randn(rows, KV_HEADS, max_len, DIM, generator=gen)
    visible = torch.arange(max_len)[None, :] < torch.tensor(lens)[:, None]
    mask = torch.zeros(rows, max_len).masked_fill_(~visible, torch.finfo(torch.float32).min)[:, None, None, :]

    def slots():
        s = torch.matmul(qg, k_rows.transpose(-1, -2)) * scale + mask
        return torch.matmul(torch.softmax(s, dim=-1), v_rows)

    # a pool with every row's blocks scattered through it
    need = [blocks_for(n, block_size) for n in lens]
    order = torch.randperm(sum(need), generator=gen).add(1).tolist()
    tables, at = [], 0
    for n in need:
        tables.append(order[at:at + n])
        at += n
    k_pool = torch.randn(sum(need) + 1, KV_HEADS, block_size, DIM, generator=gen)
    v_pool = torch.randn(sum(need) + 1, KV_HEADS, block_size, DIM, generator=gen)
    step, _ = build_kv_step([RowKV(t, n - 1, 1, [], 0) for t, n in zip(tables, lens)],
                            AdapterBatch.build([0] * rows, [1] * rows, torch.device("cpu")), block_size,
                            torch.device("cpu"))
    width = max(need)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])  # [R, nb]
    gmask = torch.zeros(rows, width * block_size)
    gmask.masked_fill_(torch.arange(width * block_size)[None, :] >= torch.tensor(lens)[:, None],
                       torch.finfo(torch.float32).min)
    gmask = gmask[:, None, None, :]

    def gather():
        k = k_pool[padded].permute(0, 2, 1, 3, 4).reshape(rows, KV_HEADS, -1, DIM)
        v = v_pool[padded].permute(0, 2, 1, 3, 4).reshape(rows, KV_HEADS, -1, DIM)
        s = torch.matmul(qg, k.transpose(-1, -2)) * scale + gmask
        return torch.matmul(torch.softmax(s, dim=-1), v)

    def paged():
        return paged_decode_attention(q, k_pool, v_pool, step.decode, scale)

    t_slots, t_gather, t_paged = (timed(f, repeats) for f in (slots, gather, paged))
    return [t_slots, t_gather, t_paged, t_paged / t_slots]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    setup(args)
    gen = torch.Generator().manual_seed(args.seed)
    rng = random.Random(args.seed)
    shapes = [(64, 128), (64, 512)] if args.quick else [(64, 128), (64, 256), (64, 512), (16, 1024)]
    out = []
    for rows, length in shapes:
        for spread in ("equal", "mixed"):
            lens = [length] * rows if spread == "equal" else [rng.randint(length // 4, length) for _ in range(rows)]
            r = case(rows, lens, args.block_size, args.repeats, gen)
            out.append([f"{rows} x {length}", spread] + [f"{x:.2f}" for x in r[:3]] + [f"{r[3]:.2f}x"])
    table(f"decode attention, one layer, ms (block size {args.block_size})",
          ["rows x max len", "lengths", "slots", "gather", "paged (ours)", "paged / slots"], out)


if __name__ == "__main__":
    main()
