"""Paged KV cache: a pool of fixed-size blocks under a byte budget, one block table per sequence.

Layout per layer: K and V of shape `[num_blocks, kv_heads, block_size, head_dim]`. Block 0 is
the null block (never handed out): padding entries of index tensors point at it, always masked,
and the padding rows of a fixed-shape decode step (static_decode.py) write their K/V there, so it
holds finite values no real row ever gives weight.
A sequence's cache is two lists of blocks:

- its *own* blocks (`Sequence.kv_blocks`), holding its real tokens at own positions
  0, 1, 2, ... (position p lives in block `kv_blocks[p // block_size]`, offset `p % block_size`);
- the *shared* blocks of its adapter's KV prefix (`Sequence.kv_prefix_blocks`), owned by the
  adapter runtime's prefix cache and referenced in place by every sequence of that adapter
  (prompt tuning, P-tuning, prefix tuning): the virtual tokens are stored once, not per sequence.

Memory therefore grows with the tokens in flight, not with `max_batch_size x max_model_len`:
the scheduler hands out blocks as chunks are scheduled, admission waits when the pool is full,
and a running sequence that cannot get its next block preempts the newest running one (which
recomputes later). Blocks are zeroed before anything reads them, so positions a sequence has not
written read as zeros (finite) whatever their previous owner left there; attention never gives
them weight (attention.py masks by valid length), and finite values keep 0 x value at 0. Blocks
handed out by `alloc` are zeroed at once; blocks the scheduler grows sequences by are zeroed
together before the step's forward (`zero_grown`: one fill per K/V tensor for the whole step,
where zeroing each row's new block alone costs 2 x layers launches per row on a GPU).

Why this layout and not gathered blocks: on CPU, gathering a batch's blocks into a contiguous
tensor each step costs 5-10x the decode attention itself (docs/design.md); attention.py instead
computes decode attention over the pool *in place*, block by block, and reduces per sequence.
"""

from __future__ import annotations

import heapq
import math

import torch

NULL_BLOCK = 0


def kv_bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """K and V of one token over all layers."""
    return 2 * num_layers * kv_heads * head_dim * dtype.itemsize


def blocks_for(tokens: int, block_size: int) -> int:
    return math.ceil(tokens / block_size) if tokens > 0 else 0


DEFAULT_KV_CACHE_BYTES = 4 << 30  # the default pool cap (vLLM-CPU's default KV space is 4 GiB too)


def pool_blocks(kv_cache_bytes: int | None, max_seqs: int, max_model_len: int, block_size: int,
                bytes_per_token: int) -> int:
    """Blocks in the pool (null block included) for a byte budget; None = room for `max_seqs`
    full-length sequences, capped at DEFAULT_KV_CACHE_BYTES. Never fewer than one sequence of
    `max_model_len` needs, with a prefix's partial block beside it: a lone request always fits."""
    per_seq = blocks_for(max_model_len, block_size) + 1
    block_bytes = block_size * bytes_per_token
    if kv_cache_bytes is None:
        wanted = max_seqs * per_seq
        blocks = min(wanted, max(per_seq, DEFAULT_KV_CACHE_BYTES // block_bytes))
    else:
        blocks = kv_cache_bytes // block_bytes
        if blocks < per_seq:
            raise ValueError(f"kv_cache_bytes={kv_cache_bytes} holds {blocks} blocks of {block_size} tokens; "
                             f"one sequence of max_model_len={max_model_len} needs {per_seq} "
                             f"({per_seq * block_bytes} bytes)")
    return blocks + 1


class KVCacheFull(RuntimeError):
    """No free block now: the caller waits (admission) or preempts (growth); never a client error."""


class BlockPool:
    """Free-block bookkeeping: hands out the lowest free blocks first, so the blocks in use stay
    packed at the front of the pool (decode attention computes over the used prefix of it)."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks  # including the null block
        self._free = list(range(1, num_blocks))
        heapq.heapify(self._free)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def capacity(self) -> int:
        """Blocks that can ever be handed out (the null block excluded)."""
        return self.num_blocks - 1

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise KVCacheFull(f"{n} KV blocks wanted, {len(self._free)} free")
        return [heapq.heappop(self._free) for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        for block in blocks:
            heapq.heappush(self._free, block)


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        if num_blocks < 2:
            raise ValueError("a KV cache needs at least one block besides the null block")
        shape = (num_blocks, kv_heads, block_size, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self._grown: list[int] = []  # handed out by `grow`, not zeroed yet (none of them free)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    @property
    def block_nbytes(self) -> int:
        return self.nbytes // self.pool.num_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.pool.capacity * self.block_size

    def reset(self) -> None:
        """Every block free again (the engine supervisor's reset; stale contents are re-zeroed
        when handed out)."""
        self.pool = BlockPool(self.pool.num_blocks)
        self._grown = []

    # -- blocks -------------------------------------------------------------------------------
    def alloc(self, n: int) -> list[int]:
        """n zeroed blocks, or KVCacheFull (nothing taken)."""
        blocks = self.pool.alloc(n)
        self._zero(blocks)
        return blocks

    def _zero(self, blocks: list[int]) -> None:
        if blocks:
            idx = torch.tensor(blocks, dtype=torch.long, device=self.k[0].device)
            for t in self.k + self.v:
                t.index_fill_(0, idx, 0)

    def free(self, blocks: list[int]) -> None:
        if self._grown:  # a block freed before its zeroing is zeroed when handed out again
            gone = set(blocks)
            self._grown = [b for b in self._grown if b not in gone]
        self.pool.free(blocks)

    def grow(self, blocks: list[int], tokens: int) -> bool:
        """Extend a block list in place so it holds `tokens` positions; False (unchanged) when
        the pool has too few free blocks. The new blocks are zeroed by `zero_grown`, which the
        runner calls before every forward."""
        need = blocks_for(tokens, self.block_size) - len(blocks)
        if need <= 0:
            return True
        if need > self.pool.num_free:
            return False
        new = self.pool.alloc(need)
        self._grown += new
        blocks.extend(new)
        return True

    def zero_grown(self) -> None:
        """Zero every block `grow` handed out since the last call, all at once."""
        if self._grown:
            grown, self._grown = self._grown, []
            self._zero(grown)

    def tokens_fit(self, blocks: list[int], have: int) -> int:
        """How many more positions a block list holding `have` can take without preemption."""
        return len(blocks) * self.block_size - have + self.pool.num_free * self.block_size

    def write_prefix(self, blocks: list[int], prefix_k: list[torch.Tensor], prefix_v: list[torch.Tensor]) -> None:
        """Store given per-layer K/V (each `[kv_heads, n, head_dim]`) at positions 0..n-1 of `blocks`."""
        bs = self.block_size
        for layer, (pk, pv) in enumerate(zip(prefix_k, prefix_v)):
            for j, block in enumerate(blocks):
                part = slice(j * bs, min((j + 1) * bs, pk.shape[1]))
                width = part.stop - part.start
                self.k[layer][block, :, :width].copy_(pk[:, part])
                self.v[layer][block, :, :width].copy_(pv[:, part])

    def read(self, layer: int, blocks: list[int], tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `tokens` positions of a block list, as dense `[kv_heads, tokens, head_dim]`
        copies (tests, prefix export); the serving path never gathers like this per step."""
        self.zero_grown()
        idx = torch.tensor(blocks, dtype=torch.long, device=self.k[0].device)

        def dense(pool: torch.Tensor) -> torch.Tensor:
            got = pool.index_select(0, idx)  # [nb, KVH, bs, D]
            return got.permute(1, 0, 2, 3).reshape(got.shape[1], -1, got.shape[3])[:, :tokens]

        return dense(self.k[layer]), dense(self.v[layer])
