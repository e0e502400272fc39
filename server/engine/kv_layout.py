"""From each row's block table to the step's KV index tensors (write positions, decode blocks,
prefill gathers). One function for every caller (the runner's steps and the prefix compute), so
the layout rules of kv_cache.py live in exactly one place on the way to attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kv_cache import NULL_BLOCK, blocks_for
from .step_state import AdapterBatch, BlockTable, DecodeBlocks, PrefillRow, StepState


@dataclass(frozen=True)
class RowKV:
    """One row of a step, as the cache sees it."""

    own_blocks: list[int]  # the row's own blocks (already grown to hold own_start + n)
    own_start: int  # own positions already computed
    n: int  # new tokens this step
    prefix_blocks: list[int]  # shared KV-prefix blocks (empty = none)
    prefix_len: int  # virtual tokens in them

    @property
    def own_ctx(self) -> int:
        return self.own_start + self.n

    @property
    def ctx(self) -> int:
        return self.prefix_len + self.own_ctx


def valid_counts(num_blocks: int, tokens: int, block_size: int) -> list[int]:
    """Positions used in each of the first `num_blocks` blocks of a list holding `tokens`."""
    return [min(block_size, tokens - j * block_size) for j in range(num_blocks)]


def _decode_blocks(rows: list[RowKV], block_size: int, device: torch.device) -> DecodeBlocks:
    bd = len(rows)
    own: dict[int, tuple[int, int]] = {}  # pool block -> (decode row, valid positions)
    shared_blocks, shared_rows, shared_counts = [], [], []
    for r, row in enumerate(rows):
        nb = blocks_for(row.own_ctx, block_size)
        for block, count in zip(row.own_blocks[:nb], valid_counts(nb, row.own_ctx, block_size)):
            own[block] = (r, count)
        npb = len(row.prefix_blocks)
        for block, count in zip(row.prefix_blocks, valid_counts(npb, row.prefix_len, block_size)):
            shared_blocks.append(block)
            shared_rows.append(r)
            shared_counts.append(count)
    nbc = max(own) + 1
    owner = [bd] * nbc
    counts = [0] * nbc
    for block, (r, count) in own.items():
        owner[block], counts[block] = r, count
    positions = torch.arange(block_size)
    masked = positions[None, :] >= torch.tensor(counts)[:, None]  # [NBc, bs]
    shared_masked = positions[None, :] >= torch.tensor(shared_counts, dtype=torch.long)[:, None]  # [P, bs]
    return DecodeBlocks(
        num_rows=bd,
        owner=torch.tensor(owner, dtype=torch.long).to(device),
        masked=masked[:, None, None, :].to(device),
        shared_blocks=torch.tensor(shared_blocks, dtype=torch.long).to(device),
        shared_rows=torch.tensor(shared_rows, dtype=torch.long).to(device),
        shared_masked=shared_masked[:, None, None, :].to(device),
    )


def _prefill_row(index: int, start: int, row: RowKV, block_size: int, device: torch.device) -> PrefillRow:
    own = row.own_blocks[:blocks_for(row.own_ctx, block_size)]
    blocks = torch.tensor(row.prefix_blocks + own, dtype=torch.long).to(device)
    keys = None
    if row.prefix_len % block_size:  # own tokens start after the prefix's last (partial) block
        own_from = len(row.prefix_blocks) * block_size
        keys = torch.cat([torch.arange(row.prefix_len), own_from + torch.arange(row.own_ctx)]).to(device)
    return PrefillRow(row=index, start=start, end=start + row.n, blocks=blocks, keys=keys, ctx=row.ctx)


def build_block_table(rows: list[RowKV], batch: int, width: int, block_size: int) -> BlockTable:
    """Decode rows as fixed-shape tables for `table_decode_attention`, padded to `batch` rows of
    `width` entries, on the host: blocks, counts [batch, width], widths [batch]. Row r lists its
    prefix blocks then its own; padding entries are the null block, fully masked, and padding
    rows see exactly one key (null block, position 0), so their softmax stays finite.

    Built once per fixed-shape step, so its host cost bounds a replayed step: one flat list and
    three tensor constructions, with the counts computed by broadcasting (per-row tensor writes
    cost ~25 us a row, 6 ms at 256 rows on this VM, more than a small model's graph replay)."""
    if len(rows) > batch:
        raise ValueError(f"{len(rows)} rows do not fit a table of {batch}")
    pad = [NULL_BLOCK] * width
    flat: list[int] = []  # [batch * width] block ids, row-major
    shape: list[int] = []  # [batch, 3] row-major: prefix entries, prefix tokens, own tokens
    for row in rows:
        own = blocks_for(row.own_ctx, block_size)
        used = len(row.prefix_blocks) + own
        if used > width:
            raise ValueError(f"a row needs {used} table entries; the table has {width}")
        flat += row.prefix_blocks
        flat += row.own_blocks[:own]
        flat += pad[used:]
        shape += (len(row.prefix_blocks), row.prefix_len, row.own_ctx)
    spare = batch - len(rows)
    flat += pad * spare
    shape += (0, 0, 1) * spare  # a padding row: one own key, in entry 0 (the null block)
    npb, plen, octx = torch.tensor(shape, dtype=torch.long).view(batch, 3).unbind(1)  # [batch] each
    j = torch.arange(width)[None, :]  # [1, width]
    npb, plen, octx = npb[:, None], plen[:, None], octx[:, None]  # [batch, 1]
    # keys in entry j: a prefix entry holds the prefix's tokens from j * bs on, an own entry the
    # row's own tokens from (j - npb) * bs on; past the row's last entry both are <= 0
    keys = torch.where(j < npb, plen - j * block_size, octx - (j - npb) * block_size)  # [batch, width]
    counts = keys.clamp_(0, block_size)
    widths = (npb + (octx + block_size - 1) // block_size)[:, 0]  # [batch]
    return BlockTable(torch.tensor(flat, dtype=torch.long).view(batch, width), counts, widths)


def build_kv_step(rows: list[RowKV], adapters: AdapterBatch, block_size: int,
                  device: torch.device) -> tuple[StepState, torch.Tensor]:
    """-> (StepState, RoPE positions [T]); rows with one new token are decode rows, others prefill.

    RoPE position of a new token = prefix_len + its own position: virtual tokens take 0..n-1,
    exactly as PEFT's past_key_values / prepended embeddings place them.
    """
    write_blocks: list[int] = []
    write_offsets: list[int] = []
    positions: list[int] = []
    decode_rows, decode_tokens, prefill = [], [], []
    start = 0
    for i, row in enumerate(rows):
        for p in range(row.own_start, row.own_ctx):
            write_blocks.append(row.own_blocks[p // block_size])
            write_offsets.append(p % block_size)
        positions.extend(range(row.prefix_len + row.own_start, row.prefix_len + row.own_ctx))
        if row.n == 1:
            decode_rows.append(i)
            decode_tokens.append(start)
        else:
            prefill.append(_prefill_row(i, start, row, block_size, device))
        start += row.n
    step = StepState(
        write_blocks=torch.tensor(write_blocks, dtype=torch.long).to(device),
        write_offsets=torch.tensor(write_offsets, dtype=torch.long).to(device),
        adapters=adapters, decode_rows=decode_rows, prefill=prefill,
    )
    if decode_rows:
        step.decode_tokens = torch.tensor(decode_tokens, dtype=torch.long).to(device)
        step.decode = _decode_blocks([rows[i] for i in decode_rows], block_size, device)
    assert NULL_BLOCK not in write_blocks, "a row wrote to the null block: its blocks were not grown"
    return step, torch.tensor(positions, dtype=torch.long).to(device)
