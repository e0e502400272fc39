"""Iteration-level scheduler: which sequences run this step, how many tokens each, and the KV
blocks they need for it.

Every step, in this order:

1. running sequences, oldest first: a decode token each, then the next chunks of unfinished
   prefills with the budget left. Their blocks grow to hold the new tokens; when the pool is
   full, idle KV prefixes are reclaimed first, then the *newest* running sequence not planned yet
   is preempted (its blocks freed, back to the head of the queue, recomputed later from its
   prompt and the tokens it already has), so the oldest requests always make progress;
2. unless someone was preempted this step, waiting sequences, first-come-first-served, while
   there is a free running place (`max_batch_size`), the step's token budget lasts, the pool
   holds their first chunk above a small watermark (else they wait: never a failure), and the
   admission hook (the adapter runtime's `reserve`, pure bookkeeping) agrees.

A prompt longer than the budget is prefilled in chunks over several steps.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from .config import EngineConfig
from .kv_cache import KVCache, blocks_for
from .request import Sequence, SeqStatus

# Called for the head of the queue; returns True once it has reserved what the sequence needs
# beyond KV blocks (an adapter device slot, a KV prefix), False to make it wait.
AdmitHook = Callable[[Sequence, list[Sequence]], bool]
# Called when the pool is full, before preempting anyone: free up to n blocks held by idle KV
# prefixes; -> blocks freed.
ReclaimHook = Callable[[int], int]


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCache, can_admit: AdmitHook | None = None,
                 reclaim: ReclaimHook | None = None):
        self.config = config
        self.kv = kv
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is the newest
        self.can_admit = can_admit or (lambda seq, running: True)
        self.reclaim = reclaim or (lambda blocks: 0)
        self.max_overtaken_steps = 16
        # Admission leaves this many blocks free, so running sequences can grow a while before
        # anyone is preempted (vLLM keeps 1 % too).
        self.watermark = max(1, kv.pool.capacity // 100)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def requeue(self, seq: Sequence) -> None:
        """An admitted sequence goes back to the head of the queue (its activation found the pool
        full); it is admitted again when blocks free up."""
        self.remove(seq)
        self._back_to_waiting(seq)
        self.waiting.appendleft(seq)

    def _back_to_waiting(self, seq: Sequence) -> None:
        """Free its blocks and forget what admission gave it; what it computed is recomputed from
        its tokens, its adapter slot and KV prefix are reserved and attached again on readmission
        (the caller releases the runtime's pins)."""
        self.kv.free(seq.kv_blocks)
        seq.kv_blocks, seq.kv_prefix_blocks, seq.kv_prefix_len = [], [], 0
        seq.num_computed, seq.adapter_slot = 0, 0
        seq.status = SeqStatus.WAITING

    def schedule(self) -> tuple[list[tuple[Sequence, int]], list[Sequence], list[Sequence]]:
        """-> ([(seq, new_tokens)] rows ordered by adapter slot, newly admitted, preempted).

        Preempted sequences are already back in the queue (after this step's admissions); the
        caller releases what they held outside the KV cache (adapter pins, prefixes)."""
        budget, bs = self.config.max_num_batched_tokens, self.kv.block_size
        plan: list[tuple[Sequence, int]] = []
        preempted: list[Sequence] = []
        # decodes first: they are cheap and keep ITL low (the budget always covers one per running
        # sequence); then the next chunks of unfinished prefills, with what is left
        decodes, prefills = self._split_running()
        for decoding, group in ((True, decodes), (False, prefills)):
            for seq in group:
                if seq.status is not SeqStatus.RUNNING or budget <= 0:
                    continue  # preempted as someone's victim in this step
                if decoding and seq.num_computed < len(seq.kv_blocks) * bs:
                    n = 1  # its last block has room: nothing to grow (the common step, kept cheap)
                else:
                    want = 1 if decoding else min(budget, seq.num_tokens - seq.num_computed)
                    n = self._grow(seq, want, preempted, plan)
                if n:
                    plan.append((seq, n))
                    budget -= n
        # Under pressure (someone was just preempted) nobody new starts: the blocks freed go to the
        # running sequences, and the preempted ones are first in line next step (vLLM does the same).
        admitted = [] if preempted else self._admit(budget, plan)
        for seq in reversed(preempted):  # first in line, in their admission order
            self.waiting.appendleft(seq)
        plan.sort(key=lambda item: item[0].adapter_slot)  # contiguous token segments per adapter
        return plan, admitted, preempted

    def _split_running(self) -> tuple[list[Sequence], list[Sequence]]:
        """Running sequences -> (decoding, still prefilling), each in admission order. One pass
        at the step's start: a sequence preempted while the decodes are planned is skipped by
        its status, so splitting up front plans what two filtered passes would."""
        decodes, prefills = [], []
        for seq in self.running:
            (prefills if seq.in_prefill else decodes).append(seq)
        return decodes, prefills

    def _grow(self, seq: Sequence, want: int, preempted: list[Sequence], plan: list[tuple[Sequence, int]]) -> int:
        """Give `seq` blocks for up to `want` new tokens (at least one), reclaiming idle prefixes,
        then preempting the newest running sequence not planned yet this step (`seq` itself when
        it is that one); -> tokens granted, 0 if `seq` had to go."""
        while True:
            fit = self.kv.tokens_fit(seq.kv_blocks, seq.num_computed)
            if fit < 1 and self.reclaim(1):
                continue
            if fit >= 1:
                n = min(want, fit)
                self._take(seq, seq.num_computed + n)
                return n
            planned = {id(s) for s, _ in plan}
            victim = next(s for s in reversed(self.running) if id(s) not in planned)  # `seq` is never planned
            self._preempt(victim, preempted)
            if victim is seq:
                return 0

    def _preempt(self, seq: Sequence, preempted: list[Sequence]) -> None:
        self.running.remove(seq)
        self._back_to_waiting(seq)
        seq.preemptions += 1
        preempted.append(seq)

    def _take(self, seq: Sequence, tokens: int) -> None:
        if not self.kv.grow(seq.kv_blocks, tokens):
            raise RuntimeError("KV blocks checked free were not there")  # a bookkeeping bug

    def _fits(self, seq: Sequence, n: int) -> bool:
        need = blocks_for(n, self.kv.block_size) + self.watermark
        short = need - self.kv.pool.num_free
        return short <= 0 or self.reclaim(short) >= short

    def _admit(self, budget: int, plan: list[tuple[Sequence, int]]) -> list[Sequence]:
        admitted: list[Sequence] = []
        blocked: list[Sequence] = []  # wait for an adapter slot; keep their queue order
        while self.waiting and budget > 0 and len(self.running) + len(admitted) < self.config.max_batch_size:
            seq = self.waiting[0]
            n = min(budget, seq.num_tokens - seq.num_computed)
            if not self._fits(seq, n):
                break  # the pool is full: everyone behind waits too (FCFS)
            self.waiting.popleft()
            if not self.can_admit(seq, self.running + admitted):
                seq.blocked_steps += 1
                blocked.append(seq)
                # Requests whose adapter is already resident (or base) may overtake a request
                # that waits for a free slot — otherwise one cold adapter serialises everyone —
                # until that request has waited `max_overtaken_steps`: then strict FCFS, so
                # it is first in line for the next slot that frees up (no starvation).
                if seq.blocked_steps > self.max_overtaken_steps:
                    break
                continue
            self._take(seq, n)
            seq.status = SeqStatus.RUNNING
            admitted.append(seq)
            plan.append((seq, n))
            budget -= n
        self.waiting.extendleft(reversed(blocked))
        self.running.extend(admitted)
        return admitted
