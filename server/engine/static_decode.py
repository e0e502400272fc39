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
        self._host_cols = _columns(self._host, n)  # [6, Bmax]: the mirror's six columns at once
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
        """Copy the rows of a plan into the buffers' first B rows and NB table entries. Host work
        that a replayed step waits for, so per row it is list appends only: one tensor for the
        five columns, one table (kv_layout.build_block_table)."""
        (b, nb), bs = bucket, self.cache.block_size
        cols: list[int] = []  # [B, 5] row-major: id, position, write block, write offset, adapter slot
        kv_rows = []
        for seq, _ in plan:
            own = seq.num_computed  # own position of the new token
            cols += (seq.token_at(own), seq.kv_prefix_len + own, seq.kv_blocks[own // bs], own % bs, seq.adapter_slot)
            kv_rows.append(RowKV(seq.kv_blocks, own, 1, seq.kv_prefix_blocks, seq.kv_prefix_len))
        # padding rows: token 0 at position 0, written to the null block's offset 0, adapter slot 0
        cols += (0, 0, NULL_BLOCK, 0, 0) * (b - len(plan))
        table = build_block_table(kv_rows, b, nb, bs)
        self._wait_upload()
        self._host_cols[:5, :b] = torch.tensor(cols, dtype=torch.long).view(b, 5).T
        host = self._h
        host[5][:b] = table.widths
        host[6][:b, :nb] = table.blocks
        host[7][:b, :nb] = table.counts
        self._upload()

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
        """Every row a padding row: token 0 at position 0 into the null block, one visible key."""
        self._wait_upload()
        self._host.zero_()  # NULL_BLOCK == 0: tables and write blocks point at the null block
        self._h[5].fill_(1)  # widths: one entry
        self._h[7][:, 0] = 1  # counts: its first position
        self._upload()


def _views(flat: torch.Tensor, n: int, w: int) -> tuple[torch.Tensor, ...]:
    """The step inputs' fixed views of one flat buffer: six [n] columns, then two [n, w] tables."""
    cols = _columns(flat, n).unbind(0)
    tables = flat[6 * n:].view(2, n, w).unbind(0)
    return (*cols, *tables)


def _columns(flat: torch.Tensor, n: int) -> torch.Tensor:
    """The six [n] per-row columns at the head of the flat buffer, as one [6, n] view."""
    return flat[:6 * n].view(6, n)
