"""Scheduler unit tests: admission (running places, token budget, KV blocks, adapter hook), chunked
prefill, FCFS, preemption when the KV pool is full."""

from __future__ import annotations

import pytest
import torch

from peftserve.server.engine.config import EngineConfig
from peftserve.server.engine.kv_cache import KVCache
from peftserve.server.engine.request import SamplingParams, Sequence, SeqStatus
from peftserve.server.engine.scheduler import Scheduler


def seq(n: int, adapter_slot: int = 0) -> Sequence:
    s = Sequence(list(range(10, 10 + n)), SamplingParams(), on_event=lambda ev: None)
    s.adapter_slot = adapter_slot
    return s


def make(config: EngineConfig, blocks: int = 64, block_size: int = 4, **hooks) -> Scheduler:
    """A scheduler over a tiny KV pool of `blocks` usable blocks of `block_size` tokens."""
    kv = KVCache(1, blocks + 1, block_size, 1, 2, torch.float32, torch.device("cpu"))
    return Scheduler(config, kv, **hooks)


def run(plan):
    """Pretend the step ran: advance num_computed; sequences whose chunk reached the end decode next."""
    for s, n in plan:
        s.num_computed += n
        if s.num_computed == s.num_tokens:
            s.output_ids.append(1)


def test_admission_limited_by_running_places_in_arrival_order():
    sched = make(EngineConfig(max_batch_size=2, max_num_batched_tokens=100))
    seqs = [seq(3) for _ in range(5)]
    for s in seqs:
        sched.add(s)
    plan, admitted, _ = sched.schedule()
    assert admitted == seqs[:2]
    assert [(s, n) for s, n in plan] == [(seqs[0], 3), (seqs[1], 3)]
    assert list(sched.waiting) == seqs[2:]
    assert all(s.status is SeqStatus.RUNNING for s in admitted)
    assert all(s.status is SeqStatus.WAITING for s in seqs[2:])
    run(plan)
    plan, admitted, _ = sched.schedule()  # no free place: only the running ones decode
    assert admitted == [] and plan == [(seqs[0], 1), (seqs[1], 1)]


def test_admission_waits_for_kv_blocks_in_arrival_order_and_never_fails():
    # 6 usable blocks of 4 tokens, watermark 1: a 10-token prompt takes 3 blocks
    sched = make(EngineConfig(max_batch_size=8, max_num_batched_tokens=100), blocks=6, block_size=4)
    a, b, c = seq(10), seq(10), seq(2)
    for s in (a, b, c):
        sched.add(s)
    plan, admitted, preempted = sched.schedule()
    assert admitted == [a] and plan == [(a, 10)] and preempted == []
    assert list(sched.waiting) == [b, c]  # b does not fit above the watermark; c may not overtake it
    assert len(a.kv_blocks) == 3 and sched.kv.pool.num_free == 3
    run(plan)
    sched.remove(a)
    sched.kv.free(a.kv_blocks)  # a finished
    _, admitted, _ = sched.schedule()
    assert admitted == [b, c]


def test_growth_preempts_the_newest_running_sequence_which_recomputes_first():
    # 4 blocks of 4 tokens: a and b (7 tokens each, 2 blocks each) fill the pool once both decode
    sched = make(EngineConfig(max_batch_size=8, max_num_batched_tokens=100), blocks=5, block_size=4)
    sched.watermark = 0
    a, b = seq(7), seq(7)
    sched.add(a)
    sched.add(b)
    plan, admitted, _ = sched.schedule()
    assert admitted == [a, b] and sched.kv.pool.num_free == 1
    run(plan)  # both sampled a token: 8 tokens each, the 8th goes in their second block
    run(sched.schedule()[0])  # 9 tokens each: the 9th needs a third block; one is free
    plan, admitted, preempted = sched.schedule()
    assert preempted == [b] and plan == [(a, 1)]  # a (older) took the block b gave back
    assert b.status is SeqStatus.WAITING and b.kv_blocks == [] and b.num_computed == 0
    assert list(sched.waiting) == [b] and b.preemptions == 1
    assert b.in_prefill and b.num_tokens == 9  # its prompt and its sampled tokens, recomputed
    sched.remove(a)
    sched.kv.free(a.kv_blocks)
    plan, admitted, _ = sched.schedule()
    assert admitted == [b] and plan == [(b, 9)]


def test_a_long_prefill_never_takes_the_budget_from_a_newer_sequences_decode():
    sched = make(EngineConfig(max_batch_size=4, max_num_batched_tokens=8))
    a = seq(3)
    sched.add(a)
    run(sched.schedule()[0])  # a decodes from now on
    sched.running.insert(0, long := seq(40))  # an older sequence still in prefill
    long.status = SeqStatus.RUNNING
    plan, _, _ = sched.schedule()
    assert sorted(((s is a, n) for s, n in plan), reverse=True) == [(True, 1), (False, 7)]


def test_prefills_that_fill_the_pool_preempt_the_newest_not_a_planned_decode():
    # 6 blocks of 4: a decodes (3 tokens, 1 block); b and c prefill in 8-token chunks
    sched = make(EngineConfig(max_batch_size=4, max_num_batched_tokens=9), blocks=6, block_size=4)
    sched.watermark = 0
    a = seq(3)
    sched.add(a)
    run(sched.schedule()[0])
    b, c = seq(24), seq(24)
    sched.add(b)
    sched.add(c)
    run(sched.schedule()[0])  # a decodes, b gets an 8-token chunk (2 blocks)
    run(sched.schedule()[0])  # a decodes, b 8 more (2 blocks): the pool is full, c still waits
    assert sched.kv.pool.num_free == 0 and list(sched.waiting) == [c]
    plan, admitted, preempted = sched.schedule()
    # b's next chunk needs 2 blocks and none is free: the newest sequence not planned yet is b
    # itself (a's decode was planned first and is never the victim), so b goes back to the queue
    assert (a, 1) in plan and preempted == [b] and b.kv_blocks == []
    assert admitted == [] and list(sched.waiting) == [b, c]  # no newcomer takes b's blocks; b goes first


def test_idle_prefixes_are_reclaimed_before_anyone_is_preempted():
    held: list[list[int]] = []
    calls = []

    def reclaim(n):
        calls.append(n)
        freed = 0
        while held and freed < n:
            blocks = held.pop()
            sched.kv.free(blocks)
            freed += len(blocks)
        return freed

    sched = make(EngineConfig(max_batch_size=8, max_num_batched_tokens=100), blocks=5, block_size=4,
                 reclaim=reclaim)
    sched.watermark = 0
    held.append(sched.kv.alloc(2))  # an idle KV prefix
    a = seq(7)
    sched.add(a)
    run(sched.schedule()[0])
    run(sched.schedule()[0])  # 8 tokens: two blocks, one free
    plan, _, preempted = sched.schedule()  # the 9th needs a block: the free one
    run(plan)
    big = seq(8)
    sched.add(big)
    plan, admitted, preempted = sched.schedule()  # a needs nothing new; big needs 2, reclaims the prefix
    assert admitted == [big] and preempted == [] and calls and held == []


def test_admission_limited_by_token_budget_and_last_one_chunked():
    sched = make(EngineConfig(max_batch_size=8, max_num_batched_tokens=16))
    a, b, c = seq(10), seq(10), seq(4)
    for s in (a, b, c):
        sched.add(s)
    plan, admitted, _ = sched.schedule()
    assert admitted == [a, b]  # the budget ran out inside b: b starts with a 6-token chunk
    assert plan == [(a, 10), (b, 6)]
    assert list(sched.waiting) == [c]
    run(plan)
    plan, admitted, _ = sched.schedule()
    # decodes first (a), then b's remaining prefill, then c is admitted with what is left
    assert plan == [(a, 1), (b, 4), (c, 4)]
    assert admitted == [c]
    assert sum(n for _, n in plan) <= 16


def test_chunked_prefill_over_several_steps():
    sched = make(EngineConfig(max_batch_size=2, max_num_batched_tokens=16))
    long = seq(40)
    sched.add(long)
    chunks = []
    while long.in_prefill:
        plan, _, _ = sched.schedule()
        chunks.append(plan[0][1])
        run(plan)
    assert chunks == [16, 16, 8]
    assert long.output_ids == [1]  # sampled only once the whole prompt was in
    plan, _, _ = sched.schedule()
    assert plan == [(long, 1)]


def test_decodes_are_scheduled_before_prefill_chunks():
    sched = make(EngineConfig(max_batch_size=4, max_num_batched_tokens=8))
    a = seq(2)
    sched.add(a)
    run(sched.schedule()[0])  # a now decodes
    b = seq(30)
    sched.add(b)
    plan, _, _ = sched.schedule()
    assert plan == [(a, 1), (b, 7)]


def test_blocked_head_is_overtaken_only_for_a_bounded_number_of_steps():
    blocked = set()
    sched = make(EngineConfig(max_batch_size=8, max_num_batched_tokens=100), can_admit=lambda s, running: s not in blocked)
    sched.max_overtaken_steps = 2
    head, other = seq(3), seq(3)
    sched.add(head)
    sched.add(other)
    blocked.add(head)  # e.g. its adapter has no free device slot
    plan, admitted, _ = sched.schedule()
    assert admitted == [other]  # a resident-adapter request overtakes the blocked head
    assert list(sched.waiting) == [head]  # which keeps its place at the front
    late = [seq(3) for _ in range(3)]
    for s in late:
        sched.add(s)
    _, admitted, _ = sched.schedule()  # head blocked for its 2nd step: still overtaken
    assert admitted == late
    late2 = seq(3)
    sched.add(late2)
    _, admitted, _ = sched.schedule()  # 3rd step: the head has waited long enough -> strict FCFS
    assert admitted == [] and list(sched.waiting) == [head, late2]
    blocked.clear()
    _, admitted, _ = sched.schedule()
    assert admitted == [head, late2]


def test_admission_hook_sees_running_and_newly_admitted():
    seen = []
    sched = make(EngineConfig(max_batch_size=8, max_num_batched_tokens=100), can_admit=lambda s, running: seen.append(list(running)) or True)
    a, b = seq(2), seq(2)
    sched.add(a)
    sched.add(b)
    sched.schedule()
    assert seen == [[], [a]]


def test_plan_rows_grouped_by_adapter_slot():
    sched = make(EngineConfig(max_batch_size=8, max_num_batched_tokens=100))
    seqs = [seq(2, adapter_slot=s) for s in (2, 0, 1, 2, 0)]
    for s in seqs:
        sched.add(s)
    plan, _, _ = sched.schedule()
    assert [s.adapter_slot for s, _ in plan] == [0, 0, 1, 2, 2]
    assert sorted(id(s) for s, _ in plan) == sorted(id(s) for s in seqs)


def test_remove_waiting_and_running():
    sched = make(EngineConfig(max_batch_size=8, max_num_batched_tokens=100))
    a, b = seq(2), seq(2)
    sched.add(a)
    sched.schedule()
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
    assert engine.cache.pool.num_free == engine.cache.pool.capacity  # every block back


def test_budget_below_batch_size_is_refused():
    """Every running sequence must be able to decode each step, or decodes starve."""
    with pytest.raises(ValueError):
        EngineConfig(max_batch_size=8, max_num_batched_tokens=4)


def test_engine_under_kv_pressure_preempts_and_still_matches_transformers(tiny_model, smollm_tokenizer):
    """A pool of 14 blocks of 4 tokens for 6 sequences that grow to 30+ tokens: admission waits,
    running sequences are preempted and recompute (prompt + tokens so far), and every sequence
    still gets transformers' greedy tokens; seeded sampling gives the same tokens as without
    pressure (the generator is the request's, preemption does not redraw)."""
    from peftserve.server.engine.engine import LLMEngine
    from peftserve.server.engine.kv_cache import kv_bytes_per_token

    model, ref = tiny_model(5), tiny_model(5)
    cfg = model.config
    per_token = kv_bytes_per_token(cfg.num_hidden_layers, cfg.num_key_value_heads,
                                   cfg.hidden_size // cfg.num_attention_heads, torch.float32)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, len(smollm_tokenizer), (n,), generator=g).tolist() for n in (20, 3, 17, 9, 12, 25)]

    def run_engine(blocks, params):
        engine = LLMEngine(model, smollm_tokenizer, EngineConfig(
            max_batch_size=6, max_model_len=48, max_num_batched_tokens=32, kv_block_size=4,
            kv_cache_bytes=blocks * 4 * per_token if blocks else None))
        done = engine.generate(prompts, params)
        assert engine.cache.pool.num_free == engine.cache.pool.capacity  # every block came back
        return engine, done

    greedy = SamplingParams(max_new_tokens=12, ignore_eos=True)
    engine, done = run_engine(14, greedy)
    assert engine.preemptions > 0 and engine.snapshot().preemptions == engine.preemptions
    for ids, s in zip(prompts, done):
        expected = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                do_sample=False, max_new_tokens=12, eos_token_id=None, pad_token_id=0)
        assert s.output_ids == expected[0, len(ids):].tolist()
    # top-k 5: tight and roomy batch differently, so logits may differ in the last bit (docs/openai.md, "seed")
    seeded = [SamplingParams(max_new_tokens=12, ignore_eos=True, temperature=0.8, top_k=5, seed=100 + i)
              for i in range(len(prompts))]
    _, tight = run_engine(14, seeded)
    _, roomy = run_engine(None, seeded)
    assert [s.output_ids for s in tight] == [s.output_ids for s in roomy]


def test_sequence_token_reads_equal_the_joined_list():
    """token_at / token_slice read prompt + output without joining them: every index and every
    slice, across the prompt/output boundary included, equals the joined list's."""
    seq = Sequence([5, 6, 7], SamplingParams(), on_event=lambda ev: None)
    seq.output_ids = [8, 9]
    joined = seq.prompt_ids + seq.output_ids
    assert [seq.token_at(i) for i in range(seq.num_tokens)] == joined
    for start in range(seq.num_tokens + 1):
        for end in range(start, seq.num_tokens + 1):
            assert seq.token_slice(start, end) == joined[start:end], (start, end)
