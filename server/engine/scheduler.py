"""Iteration-level scheduler: which sequences run this step, and how many tokens each.

Every step: each running sequence in decode gets one token; running sequences still in
prefill continue with a chunk; then waiting sequences are admitted first-come-first-served
while a KV slot is free, the step's token budget lasts and the admission hook (the adapter
runtime's `reserve`, pure bookkeeping) agrees. A prompt longer than the budget is prefilled in
chunks over several steps.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from .config import EngineConfig
from .request import Sequence, SeqStatus

# Called for the head of the queue; returns True once it has reserved what the sequence needs
# beyond a KV slot (an adapter device slot, a KV prefix), False to make it wait.
AdmitHook = Callable[[Sequence, list[Sequence]], bool]


class Scheduler:
    def __init__(self, config: EngineConfig, can_admit: AdmitHook | None = None):
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.can_admit = can_admit or (lambda seq, running: True)
        self.max_overtaken_steps = 16

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def schedule(self, free_slots: int) -> tuple[list[tuple[Sequence, int]], list[Sequence]]:
        """Return ([(seq, new_tokens)], newly admitted seqs), rows ordered by adapter slot."""
        budget = self.config.max_num_batched_tokens
        plan: list[tuple[Sequence, int]] = []
        for seq in self.running:  # decodes first: they are cheap and keep ITL low
            if not seq.in_prefill and budget > 0:
                plan.append((seq, 1))
                budget -= 1
        for seq in self.running:  # then unfinished prefill chunks of running sequences
            if seq.in_prefill and budget > 0:
                n = min(budget, len(seq.prompt_ids) - seq.num_computed)
                plan.append((seq, n))
                budget -= n
        admitted: list[Sequence] = []
        blocked: list[Sequence] = []  # wait for an adapter slot; keep their queue order
        while self.waiting and budget > 0 and free_slots > len(admitted):
            seq = self.waiting.popleft()
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
            seq.status = SeqStatus.RUNNING
            admitted.append(seq)
            n = min(budget, len(seq.prompt_ids) - seq.num_computed)
            plan.append((seq, n))
            budget -= n
        self.waiting.extendleft(reversed(blocked))
        self.running.extend(admitted)
        plan.sort(key=lambda item: item[0].adapter_slot)  # contiguous token segments per adapter
        return plan, admitted
