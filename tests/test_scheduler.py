"""Scheduler unit tests: admission (slots, token budget, adapter hook), chunked prefill, FCFS."""

from __future__ import annotations

import pytest
import torch

from peftserve.server.engine.config import EngineConfig
from peftserve.server.engine.request import SamplingParams, Sequence, SeqStatus
from peftserve.server.engine.scheduler import Scheduler


def seq(n: int, adapter_slot: int = 0) -> Sequence:
    s = Sequence(list(range(10, 10 + n)), SamplingParams(), on_event=lambda ev: None)
    s.adapter_slot = adapter_slot
    return s


def run(plan):
    """Pretend the step ran: advance num_computed; sequences whose chunk reached the end decode next."""
    for s, n in plan:
        s.num_computed += n
        if s.num_computed == s.num_tokens:
            s.output_ids.append(1)


def test_admission_limited_by_free_slots_in_arrival_order():
    sched = Scheduler(EngineConfig(max_batch_size=8, max_num_batched_tokens=100))
    seqs = [seq(3) for _ in range(5)]
    for s in seqs:
        sched.add(s)
    plan, admitted = sched.schedule(free_slots=2)
    assert admitted == seqs[:2]
    assert [(s, n) for s, n in plan] == [(seqs[0], 3), (seqs[1], 3)]
    assert list(sched.waiting) == seqs[2:]
    assert all(s.status is SeqStatus.RUNNING for s in admitted)
    assert all(s.status is SeqStatus.WAITING for s in seqs[2:])
    run(plan)
    plan, admitted = sched.schedule(free_slots=0)  # no free slot: only the running ones decode
    assert admitted == [] and plan == [(seqs[0], 1), (seqs[1], 1)]


def test_admission_limited_by_token_budget_and_last_one_chunked():
    sched = Scheduler(EngineConfig(max_batch_size=8, max_num_batched_tokens=16))
    a, b, c = seq(10), seq(10), seq(4)
    for s in (a, b, c):
        sched.add(s)
    plan, admitted = sched.schedule(free_slots=8)
    assert admitted == [a, b]  # the budget ran out inside b: b starts with a 6-token chunk
    assert plan == [(a, 10), (b, 6)]
    assert list(sched.waiting) == [c]
    run(plan)
    plan, admitted = sched.schedule(free_slots=6)
    # decodes first (a), then b's remaining prefill, then c is admitted with what is left
    assert plan == [(a, 1), (b, 4), (c, 4)]
    assert admitted == [c]
    assert sum(n for _, n in plan) <= 16


def test_chunked_prefill_over_several_steps():
    sched = Scheduler(EngineConfig(max_batch_size=2, max_num_batched_tokens=16))
    long = seq(40)
    sched.add(long)
    chunks = []
    while long.in_prefill:
        plan, _ = sched.schedule(free_slots=1)
        chunks.append(plan[0][1])
        run(plan)
    assert chunks == [16, 16, 8]
    assert long.output_ids == [1]  # sampled only once the whole prompt was in
    plan, _ = sched.schedule(free_slots=1)
    assert plan == [(long, 1)]


def test_decodes_are_scheduled_before_prefill_chunks():
    sched = Scheduler(EngineConfig(max_batch_size=4, max_num_batched_tokens=8))
    a = seq(2)
    sched.add(a)
    run(sched.schedule(4)[0])  # a now decodes
    b = seq(30)
    sched.add(b)
    plan, _ = sched.schedule(3)
    assert plan == [(a, 1), (b, 7)]


def test_blocked_head_is_overtaken_only_for_a_bounded_number_of_steps():
    blocked = set()
    sched = Scheduler(EngineConfig(max_batch_size=8, max_num_batched_tokens=100),
                      can_admit=lambda s, running: s not in blocked)
    sched.max_overtaken_steps = 2
    head, other = seq(3), seq(3)
    sched.add(head)
    sched.add(other)
    blocked.add(head)  # e.g. its adapter has no free device slot
    plan, admitted = sched.schedule(8)
    assert admitted == [other]  # a resident-adapter request overtakes the blocked head
    assert list(sched.waiting) == [head]  # which keeps its place at the front
    late = [seq(3) for _ in range(3)]
    for s in late:
        sched.add(s)
    _, admitted = sched.schedule(8)  # head blocked for its 2nd step: still overtaken
    assert admitted == late
    late2 = seq(3)
    sched.add(late2)
    _, admitted = sched.schedule(8)  # 3rd step: the head has waited long enough -> strict FCFS
    assert admitted == [] and list(sched.waiting) == [head, late2]
    blocked.clear()
    _, admitted = sched.schedule(8)
    assert admitted == [head, late2]


def test_admission_hook_sees_running_and_newly_admitted():
    seen = []
    sched = Scheduler(EngineConfig(max_batch_size=8, max_num_batched_tokens=100),
                      can_admit=lambda s, running: seen.append(list(running)) or True)
    a, b = seq(2), seq(2)
    sched.add(a)
    sched.add(b)
    sched.schedule(8)
    assert seen == [[], [a]]


def test_plan_rows_grouped_by_adapter_slot():
    sched = Scheduler(EngineConfig(max_batch_size=8, max_num_batched_tokens=100))
    seqs = [seq(2, adapter_slot=s) for s in (2, 0, 1, 2, 0)]
    for s in seqs:
        sched.add(s)
    plan, _ = sched.schedule(8)
    assert [s.adapter_slot for s, _ in plan] == [0, 0, 1, 2, 2]
    assert sorted(id(s) for s, _ in plan) == sorted(id(s) for s in seqs)


def test_remove_waiting_and_running():
    sched = Scheduler(EngineConfig(max_batch_size=8, max_num_batched_tokens=100))
    a, b = seq(2), seq(2)
    sched.add(a)
    sched.schedule(1)
    sched.add(b)
    sched.remove(a)
    sched.remove(b)
    assert not sched.has_work()


@pytest.mark.parametrize("budget", [3, 7, 64])
def test_engine_chunked_prefill_matches_transformers(tiny_model, smollm_tokenizer, budget):
    """End to end through LLMEngine: any token budget gives transformers' greedy tokens."""
    from peftserve.server.engine.engine import LLMEngine

    model, ref = tiny_model(5), tiny_model(5)
    engine = LLMEngine(model, smollm_tokenizer, EngineConfig(max_batch_size=3, max_model_len=128,
                                                             max_num_batched_tokens=budget))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, len(smollm_tokenizer), (n,), generator=g).tolist() for n in (50, 3, 21, 9)]
    done = engine.generate(prompts, SamplingParams(max_new_tokens=6, ignore_eos=True))
    for ids, s in zip(prompts, done):
        expected = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                do_sample=False, max_new_tokens=6, eos_token_id=None, pad_token_id=0)
        assert s.output_ids == expected[0, len(ids):].tolist()
    assert engine.cache.slots.num_free == 3


def test_budget_below_batch_size_is_refused():
    """Every running sequence must be able to decode each step, or decodes starve."""
    with pytest.raises(ValueError):
        EngineConfig(max_batch_size=8, max_num_batched_tokens=4)
