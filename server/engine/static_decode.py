"""Fixed-shape decode steps: preallocated inputs, bucketed sizes, CUDA graphs.

A step in which every row decodes one token (the bulk of a serving workload) can run with no
per-step shapes: its inputs live in buffers allocated once for the largest bucket — token ids,
RoPE positions, the (block, offset) each token's K/V is written to, each token's adapter slot,
and each row's block table with its key mask. `fill` copies a step's rows into the first B rows
(B = the smallest batch bucket holding them, NB = the smallest block bucket holding the widest
table); padding rows decode token 0 at position 0 into the null block, see one key and are
dropped. `forward(B, NB)` then runs the model on views of those buffers, with attention by
block table (attention.table_decode_attention) and weight adapters gathered per token from
fixed stacks (AdapterMode.GATHER) — nothing in it syncs with the host or depends on more than
(B, NB). The same `forward` runs:

- eagerly (`DecodeMode.STATIC`): the tests hold its tokens to the dynamic step's on CPU;
- captured once per (B, NB) bucket into a CUDA graph at start-up and replayed
  (`DecodeMode.GRAPH`): one launch per step instead of hundreds, which is what bounds a small
  model's decode on a GPU.

Prefill and mixed prefill+decode steps, and steps with an adapter the stacks cannot hold
(bottleneck, a LoRA above `max_lora_rank`), stay on the dynamic path (`DecodeMode.DYNAMIC`,
the CPU's default, where the per-step shapes are cheaper than padding).
"""

from __future__ import annotations

import enum
import logging
import time

import numpy as np
import torch

from .adapter_runtime import AdapterRuntime
from .kv_cache import NULL_BLOCK, KVCache, blocks_for
from .kv_layout import RowKV, build_block_table
from .model import PackedCausalLM
from .request import Sequence
from .step_state import AdapterBatch, AdapterMode, BlockTable, StepState

log = logging.getLogger(__name__)


class DecodeMode(str, enum.Enum):
    DYNAMIC = "dynamic"  # per-step shapes (every step; the CPU default)
    STATIC = "static"  # decode-only steps on the fixed buffers, run eagerly
    GRAPH = "graph"  # decode-only steps on the fixed buffers, replayed from CUDA graphs


def resolve_mode(requested: str, device: torch.device) -> DecodeMode:
    """"auto" = graphs on CUDA, dynamic elsewhere; graphs need CUDA."""
    if requested == "auto":
        return DecodeMode.GRAPH if device.type == "cuda" else DecodeMode.DYNAMIC
    mode = DecodeMode(requested)
    if mode is DecodeMode.GRAPH and device.type != "cuda":
        raise ValueError("decode_mode 'graph' needs a CUDA device (use 'static' to run the same step eagerly)")
    return mode


def buckets(limit: int) -> list[int]:
    """1, 2, 4, ... below `limit`, then `limit`."""
    out, b = [], 1
    while b < limit:
        out.append(b)
        b *= 2
    return out + [limit]


def bucket_for(n: int, sizes: list[int]) -> int:
    return next(b for b in sizes if b >= n)


class StaticDecode:
    def __init__(self, model: PackedCausalLM, cache: KVCache, adapters: AdapterRuntime, max_batch: int,
                 max_model_len: int, mode: DecodeMode):
        self.model, self.cache, self.adapters, self.mode = model, cache, adapters, mode
        bs = cache.block_size
        self.max_blocks = blocks_for(max_model_len, bs) + 1  # own blocks + a prefix's partial block
        self.batch_buckets = buckets(max_batch)
        self.block_buckets = buckets(self.max_blocks)
        # Every per-step input in one int64 buffer, so a step is one host->device copy (from a
        # pinned mirror on CUDA); the named tensors are fixed views of it, which graphs read.
        n, w = max_batch, self.max_blocks
        dev = model.device
        self._flat = torch.zeros(6 * n + 2 * n * w, dtype=torch.long, device=dev)
        pinned = dev.type == "cuda"
        self._host = torch.zeros(self._flat.shape, dtype=torch.long, pin_memory=pinned)
        self._copied = torch.cuda.Event() if pinned else None  # the last upload left the mirror
        (self.ids,  # [Bmax] token ids
         self.positions,  # [Bmax] RoPE positions
         self.write_blocks,  # [Bmax] pool block of the new K/V
         self.write_offsets,  # [Bmax] offset in it
         self.token_slots,  # [Bmax] adapter slot
         self.widths,  # [Bmax] table entries each row uses
         self.table,  # [Bmax, NBmax] pool blocks: prefix, then own
         self.counts) = _views(self._flat, n, w)  # [Bmax, NBmax] keys in each entry
        self._h = _views(self._host, n, w)  # the same views of the host mirror
        self._np = [v.numpy() for v in self._h]  # numpy views of the same memory: `_advance`'s array ops
        self._rows: _Rows | None = None  # what the mirror holds, when it can be advanced in place
        self._table_dirty = 0  # table entries [0, this) may hold a non-null entry in some row
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.capture_seconds = 0.0  # start-up capture, then every recapture added
        self.recaptures = 0
        self._pool = None  # the graphs' shared memory pool
        self._generation = adapters.gather_generation  # of the runtime's stacks the graphs were recorded with

    # -- which steps --------------------------------------------------------------------
    def width(self, seq: Sequence) -> int:
        """Block-table entries of a decoding row: its prefix blocks, then its own."""
        return len(seq.kv_prefix_blocks) + blocks_for(seq.num_computed + 1, self.cache.block_size)

    def bucket(self, plan: list[tuple[Sequence, int]]) -> tuple[int, int] | None:
        """The (B, NB) bucket of a plan the buffers fit, else None. Fits: every row decodes its
        last token, the batch and every row's table fit, and the adapter runtime's stacks hold
        every row's adapter."""
        if not 0 < len(plan) <= self.batch_buckets[-1]:
            return None
        if not all(n == 1 and seq.num_computed + 1 == seq.num_tokens for seq, n in plan):
            return None
        widest = max(self.width(seq) for seq, _ in plan)
        if widest > self.max_blocks or not self.adapters.gather_ready({seq.adapter_slot for seq, _ in plan}):
            return None
        return bucket_for(len(plan), self.batch_buckets), bucket_for(widest, self.block_buckets)

    # -- one step -----------------------------------------------------------------------
    def fill(self, plan: list[tuple[Sequence, int]], bucket: tuple[int, int]) -> None:
        """Copy the rows of a plan into the buffers' first B rows and NB table entries: host work
        a replayed step waits for, so it is kept small per row. The host mirror persists between
        steps: a row that was in the last fill, one token further on (decoding's steady state),
        is moved to its new place and advanced with array ops over all such rows (`_advance`);
        only rows new to the mirror (admitted, resumed, or after a dynamic step) are written
        from their sequence (`_write_fresh`), then the rows up to B are padding."""
        prev, self._rows = self._rows, None  # a fill that raises leaves no state to advance from
        self._wait_upload()
        (b, nb), r = bucket, len(plan)
        seqs = [seq for seq, _ in plan]
        own = [seq.num_computed for seq in seqs]  # own position of each row's new token
        src = prev.sources(seqs, own) if prev is not None else [-1] * r  # its row in the last fill, -1 = none
        kept = [i for i in range(r) if src[i] >= 0]
        if kept:
            self._advance(kept, [src[i] for i in kept], seqs, own)
        if len(kept) < r:
            self._write_fresh([i for i in range(r) if src[i] < 0], plan, nb)
        self._write_padding(r, b)
        self._rows = _Rows(seqs, own)
        self._upload()

    def _advance(self, rows: list[int], src: list[int], seqs: list[Sequence], own: list[int]) -> None:
        """Rows `src` of the last fill become rows `rows` (a gather, skipped when none moved), each
        one token on: position +1, write offset +1, the token sampled last step; a row whose new
        token opens a block writes there and its table gains that entry, with one key; every other
        row's last entry gains a key. A Python loop only over the rows opening a block (1 in
        block_size per step). Tested against writing every row fresh (test_static_decode)."""
        bs, w = self.cache.block_size, self._table_dirty
        ids, pos, wblock, woff, slots, widths, table, counts = self._np
        at = np.asarray(rows)  # [k] rows of this fill
        if rows != src:  # rows finished or joined since: move the kept ones (numpy copies the source first)
            frm = np.asarray(src)
            for col in (pos, wblock, slots, widths):
                col[at] = col[frm]
            table[at, :w] = table[frm, :w]
            counts[at, :w] = counts[frm, :w]
        ids[at] = [seqs[i].token_at(own[i]) for i in rows]
        pos[at] += 1
        offsets = np.asarray([own[i] for i in rows], dtype=np.int64) % bs  # [k]
        woff[at] = offsets
        for k in np.flatnonzero(offsets == 0).tolist():  # the new token is the first of a fresh block
            i = rows[k]
            block = seqs[i].kv_blocks[own[i] // bs]
            wblock[i] = block
            table[i, widths[i]] = block
            counts[i, widths[i]] = 0  # gains its key below, with every other row's last entry
            widths[i] += 1
        counts[at, widths[at] - 1] += 1
        self._table_dirty = max(w, int(widths[at].max()))

    def _write_fresh(self, rows: list[int], plan: list[tuple[Sequence, int]], nb: int) -> None:
        """Rows `rows` of the plan written from their sequences: per row, list appends only (one
        array for the five columns, one table: kv_layout.build_block_table); entries past NB that
        an earlier, wider fill left are cleared, so every entry past a row's width is the null
        block with no keys (what `_advance` relies on when a row's table grows)."""
        bs = self.cache.block_size
        ids, pos, wblock, woff, slots, widths, table, counts = self._np
        cols: list[int] = []  # [k, 5] row-major: id, position, write block, write offset, adapter slot
        kv_rows = []
        for i in rows:
            seq = plan[i][0]
            own = seq.num_computed  # own position of the new token
            cols += (seq.token_at(own), seq.kv_prefix_len + own, seq.kv_blocks[own // bs], own % bs, seq.adapter_slot)
            kv_rows.append(RowKV(seq.kv_blocks, own, 1, seq.kv_prefix_blocks, seq.kv_prefix_len))
        at = np.asarray(rows)
        for col, values in zip((ids, pos, wblock, woff, slots), np.asarray(cols, dtype=np.int64).reshape(-1, 5).T):
            col[at] = values
        fresh = build_block_table(kv_rows, len(rows), nb, bs)
        widths[at] = fresh.widths.numpy()
        table[at, :nb] = fresh.blocks.numpy()
        counts[at, :nb] = fresh.counts.numpy()
        if self._table_dirty > nb:  # NULL_BLOCK == 0: null entries, no keys
            table[at, nb:self._table_dirty] = NULL_BLOCK
            counts[at, nb:self._table_dirty] = 0
        self._table_dirty = max(self._table_dirty, nb)

    def _write_padding(self, r: int, b: int) -> None:
        """Rows r..b-1: token 0 at position 0, written to the null block's offset 0, adapter slot
        0, one key (the null block's position 0), so their softmax stays finite."""
        if r == b:
            return
        ids, pos, wblock, woff, slots, widths, table, counts = self._np
        for col in (ids, pos, wblock, woff, slots):
            col[r:b] = 0  # NULL_BLOCK == 0
        widths[r:b] = 1
        table[r:b, :self._table_dirty] = NULL_BLOCK
        counts[r:b, :self._table_dirty] = 0
        counts[r:b, 0] = 1

    def _wait_upload(self) -> None:
        """The previous step's copy may still read the pinned mirror: let it finish first."""
        if self._copied is not None:
            self._copied.synchronize()

    def _upload(self) -> None:
        self._flat.copy_(self._host, non_blocking=True)
        if self._copied is not None:
            self._copied.record()

    def forward(self, b: int, nb: int) -> torch.Tensor:
        """The step on the buffers' first b rows and nb table entries -> float32 logits [b, vocab].
        Shapes depend on (b, nb) only; what a graph captures and replays."""
        step = StepState(
            write_blocks=self.write_blocks[:b], write_offsets=self.write_offsets[:b],
            adapters=AdapterBatch(self.token_slots[:b], mode=AdapterMode.GATHER),
            table=BlockTable(self.table[:b, :nb], self.counts[:b, :nb], self.widths[:b]),
        )
        self.adapters.prepare(step.adapters)  # host-side only in GATHER mode: the layers read this batch
        hidden = self.model(self.model.embed(self.ids[:b]), self.positions[:b], step, self.cache)  # [b, hidden]
        return self.model.logits(hidden)

    def run(self, plan: list[tuple[Sequence, int]], bucket: tuple[int, int]) -> torch.Tensor:
        """A plan and its `bucket(plan)` -> float32 logits [rows, vocab] in plan order (a view of
        the graph's output buffer in GRAPH mode: valid until the next step)."""
        self.fill(plan, bucket)
        b, nb = bucket
        if self.mode is not DecodeMode.GRAPH:
            return self.forward(b, nb)[:len(plan)]
        if self.adapters.gather_generation != self._generation:  # stacks added: other ops now
            self.graphs.clear()
            self._generation = self.adapters.gather_generation
        captured = self.graphs.get((b, nb))
        if captured is None:  # first use since start-up or since the stacks changed: record it now
            return self._capture_bucket(b, nb)[:len(plan)]
        graph, logits = captured
        # the runtime's host-side part of the step (e.g. undo a merge: graphs apply every slot)
        self.adapters.prepare(AdapterBatch(self.token_slots[:b], mode=AdapterMode.GATHER))
        graph.replay()
        return logits[:len(plan)]

    # -- capture (CUDA) -----------------------------------------------------------------
    @torch.inference_mode()
    def capture(self) -> float:
        """Capture one graph per (B, NB) bucket, largest first (smaller ones reuse its memory
        pool), on padding rows. -> seconds taken (logged). Adapter stacks added later (the first
        adapter targeting a module) make these stale: `run` then records each bucket again on
        its next use."""
        t0 = time.perf_counter()
        self._pool = torch.cuda.graph_pool_handle()
        self.graphs.clear()
        self._generation = self.adapters.gather_generation  # recorded with the stacks as they are now
        self._fill_padding()
        for b, nb in self.all_buckets():
            self._capture_bucket(b, nb)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        self.capture_seconds = seconds
        self.recaptures = 0
        log.info("decode graphs captured", extra={"graphs": len(self.graphs), "seconds": round(seconds, 2),
                                                  "batch_buckets": self.batch_buckets,
                                                  "block_buckets": self.block_buckets})
        return seconds

    def _capture_bucket(self, b: int, nb: int) -> torch.Tensor:
        """Run the step on the buffers as they are (a warm-up on a side stream: lazy inits and
        workspaces stay out of the graph), then record it. -> the warm-up's logits [b, vocab]."""
        t0 = time.perf_counter()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            warm = self.forward(b, nb)
        torch.cuda.current_stream().wait_stream(side)
        warm = warm.clone()  # owned by the current stream from here
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self.forward(b, nb)
        self.graphs[(b, nb)] = (graph, logits)
        if self.capture_seconds:  # a recapture while serving
            self.recaptures += 1
            self.capture_seconds += time.perf_counter() - t0
            log.debug("decode graph recaptured", extra={"batch": b, "blocks": nb})
        return warm

    def all_buckets(self) -> list[tuple[int, int]]:
        """Every (B, NB) a step can take, largest first (the capture order)."""
        return [(b, nb) for b in reversed(self.batch_buckets) for nb in reversed(self.block_buckets)]

    @torch.inference_mode()
    def run_padding(self, b: int, nb: int) -> torch.Tensor:
        """Eagerly, what `capture` records for bucket (b, nb): the step over padding rows only
        (they write the null block alone). Tests run it for every bucket on CPU."""
        self._fill_padding()
        return self.forward(b, nb)

    def _fill_padding(self) -> None:
        """Every row a padding row (`_write_padding`: token 0 at position 0 into the null block,
        one visible key); nothing left to advance from."""
        self._rows = None
        self._wait_upload()
        self._write_padding(0, self.batch_buckets[-1])
        self._table_dirty = 1  # past entry 0, every row's entries are null now
        self._upload()


class _Rows:
    """The rows a fill left in the host mirror: which sequences, holding which block lists (a
    preempted sequence gets a new list), at which own positions."""

    __slots__ = ("index", "blocks", "own")

    def __init__(self, seqs: list[Sequence], own: list[int]):
        self.index = {seq: i for i, seq in enumerate(seqs)}  # a Sequence hashes by identity (eq=False)
        self.blocks = [seq.kv_blocks for seq in seqs]
        self.own = own

    def sources(self, seqs: list[Sequence], own: list[int]) -> list[int]:
        """Each row's row in this fill if it can be advanced from there (same sequence, same
        block list, exactly one token on), else -1."""
        src = [self.index.get(seq, -1) for seq in seqs]
        return [j if j >= 0 and seq.kv_blocks is self.blocks[j] and p == self.own[j] + 1 else -1
                for seq, p, j in zip(seqs, own, src)]


def _views(flat: torch.Tensor, n: int, w: int) -> tuple[torch.Tensor, ...]:
    """The step inputs' fixed views of one flat buffer: six [n] columns, then two [n, w] tables."""
    cols = flat[:6 * n].view(6, n).unbind(0)
    tables = flat[6 * n:].view(2, n, w).unbind(0)
    return (*cols, *tables)
