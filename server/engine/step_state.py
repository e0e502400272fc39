"""The per-step batch description handed down to every layer.

One continuous-batching step packs the new tokens of all scheduled sequences into one flat
`[T]` token axis (prefill chunks and decode tokens alike). Everything a layer needs to treat
each token correctly travels in this one object, passed explicitly through the model's forward
kwargs to the attention function and handed to the adapter-aware layers by the adapter
runtime's `prepare`, which the runner calls before the forward (no module globals, no hooks).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch


class AdapterMode(enum.Enum):
    """How the wrapped layers apply weight adapters in a step."""

    SEGMENTS = "segments"  # per contiguous slot segment, at each adapter's true shape (host-side plan)
    GATHER = "gather"  # every token gathers its slot's row of fixed stacks: fixed ops, no host sync


@dataclass
class AdapterBatch:
    """Token -> adapter slot mapping for weight adapters (LoRA, (IA)3, bottleneck).

    SEGMENTS: rows are ordered by adapter slot, so each slot's tokens form one contiguous segment.
    GATHER: only `token_slots` is read (a fixed-address buffer in a captured decode step).
    """

    token_slots: torch.Tensor  # [T] int64, 0 = no adapter
    # (slot, start, end) for every slot != 0 present in the step, over the token axis
    segments: list[tuple[int, int, int]] = field(default_factory=list)
    plans: dict = field(default_factory=dict)  # grouped-LoRA padding plans, shared by all modules
    mode: AdapterMode = AdapterMode.SEGMENTS

    @property
    def any_active(self) -> bool:
        return bool(self.segments)

    @staticmethod
    def build(slots_per_row: list[int], q_lens: list[int], device: torch.device) -> "AdapterBatch":
        token_slots = torch.repeat_interleave(
            torch.tensor(slots_per_row, dtype=torch.long), torch.tensor(q_lens, dtype=torch.long)
        ).to(device)
        segments: list[tuple[int, int, int]] = []
        start = 0
        for slot, n in zip(slots_per_row, q_lens):
            if slot != 0:
                if segments and segments[-1][0] == slot and segments[-1][2] == start:
                    segments[-1] = (slot, segments[-1][1], start + n)
                else:
                    segments.append((slot, start, start + n))
            start += n
        return AdapterBatch(token_slots, segments)


@dataclass
class DecodeBlocks:
    """Where the keys of the step's decode rows are, for decode attention over the pool in place
    (attention.py). Built once per step, read by every layer.

    Own blocks are addressed by pool position: entry b of `owner`/`valid` describes pool block b,
    for the blocks 0..NBc-1 (NBc = highest own block of a decode row + 1; lowest-first allocation
    keeps that range packed). Shared (prefix) blocks are listed once per (row, block) pair.
    """

    num_rows: int  # Bd decode rows; index Bd is the "nobody" row whose results are dropped
    owner: torch.Tensor  # [NBc] int64: decode row owning pool block b, or Bd
    masked: torch.Tensor  # [NBc, 1, 1, block_size] bool: True = not one of the owner's keys
    shared_blocks: torch.Tensor  # [P] int64: prefix blocks referenced by decode rows
    shared_rows: torch.Tensor  # [P] int64: the decode row of each pair
    shared_masked: torch.Tensor  # [P, 1, 1, block_size] bool


@dataclass
class BlockTable:
    """The decode rows' keys as fixed-shape tables (the layout a captured step can replay): row
    r's keys are, in order, positions `[0, counts[r, j])` of blocks `blocks[r, j]` for j = 0, 1,
    ... (its prefix blocks, then its own). Padding entries are the null block with count 0."""

    blocks: torch.Tensor  # [B, NB] int64
    counts: torch.Tensor  # [B, NB] int64: keys in each entry (valid positions from 0)
    widths: torch.Tensor  # [B] int64: entries a row uses (the Triton kernel's loop bound)

    def masked(self, block_size: int) -> torch.Tensor:
        """[B, NB * block_size] bool: True = not one of the row's keys."""
        b, nb = self.counts.shape
        positions = torch.arange(block_size, device=self.counts.device)
        return (positions[None, None, :] >= self.counts[:, :, None]).reshape(b, nb * block_size)


@dataclass
class PrefillRow:
    """One row whose new tokens are attended on their own (a prompt chunk), with causal order."""

    row: int
    start: int  # its tokens on the step's token axis: [start, end)
    end: int
    blocks: torch.Tensor  # [nb] int64: the row's prefix blocks, then its own blocks
    keys: torch.Tensor | None  # [ctx] positions, in the blocks' concatenation, of its keys in
    #                            order (prefix, then own tokens); None = the first ctx positions
    ctx: int  # keys visible to the last new token (prefix + computed + new)


@dataclass
class StepState:
    # per token (rows packed in scheduled order): where each new token's K/V is written
    write_blocks: torch.Tensor  # [T] int64 pool block
    write_offsets: torch.Tensor  # [T] int64 position inside the block
    adapters: AdapterBatch
    # decode rows: one query token each, attended as one batch
    decode_rows: list[int] = field(default_factory=list)
    decode_tokens: torch.Tensor | None = None  # [Bd] token index of each decode row
    decode: DecodeBlocks | None = None
    prefill: list[PrefillRow] = field(default_factory=list)
    # a fixed-shape decode step (static_decode.py): every token is a decode row, attended by table
    table: BlockTable | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.write_blocks.shape[0])
