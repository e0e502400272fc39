"""Per-request failure isolation inside one engine step, and the engine supervisor (no HTTP).

Every failure class that concerns one request — NaN/inf logits, a sampling error, a detokeniser
or stop-check error, an observer error, an adapter-prefix write error — must end that request
alone (FinishReason.ERROR with its ErrorCode) while its batch-mates finish with exactly the
tokens they get without it. A loop that dies anyway is reset and restarted by the supervisor.
"""

from __future__ import annotations

import asyncio
import math
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftserve.server.engine import engine as engine_mod
from peftserve.server.engine import sampler as sampler_mod
from peftserve.server.engine.async_engine import AsyncEngine, EngineRestartingError
from peftserve.server.engine.config import EngineConfig
from peftserve.server.engine.detokenizer import IncrementalDetokenizer
from peftserve.server.engine.engine import LLMEngine, NoAdapters
from peftserve.server.engine.request import ErrorCode, FinishReason, SamplingParams, Sequence, SeqStatus
from peftserve.server.engine.sampler import SampleFailure, filter_logits, nonfinite_rows, sample
from peftserve.server.engine.sampling_params import SAMPLING_EPS, SamplingParamError
from peftserve.server.engine.supervisor import EngineState, RestartPolicy, RestartTracker
from tests.test_lora_parity import StubTokenizer
from tests.tiny import tiny_llama

NEW = 6
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13], [20], [30, 31, 32, 33], [40, 41], [50, 51, 52, 53, 54, 55]]
POISON = [99, 98, 97]
GREEDY = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
# top-k 5: seeded rows are compared across batch shapes, where a wide top-k or top-p can flip on
# another CPU's rounding (docs/openai.md, "seed")
SEEDED = SamplingParams(max_new_tokens=NEW, ignore_eos=True, temperature=0.8, top_k=5, top_p=0.9, seed=11)


EMIT_TIMING = {"value": "immediate"}  # the module runs once per EmitTiming (fixture below)


@pytest.fixture(autouse=True, params=["immediate", "overlapped"])
def emit_timing(request, monkeypatch):
    """Every isolation guarantee holds whether a step's text is emitted in it or in the next."""
    monkeypatch.setitem(EMIT_TIMING, "value", request.param)
    return request.param


def make_engine(adapters=None, **config) -> LLMEngine:
    cfg = EngineConfig(**{"max_batch_size": 8, "max_model_len": 64, "emit_timing": EMIT_TIMING["value"], **config})
    return LLMEngine(tiny_llama(0), StubTokenizer(), cfg, adapters=adapters)


def run(engine: LLMEngine, prompts, params) -> list[Sequence]:
    events: dict[int, list] = {}
    seqs = []
    for i, (p, sp) in enumerate(zip(prompts, params)):
        events[i] = []
        seqs.append(Sequence(list(p), sp, on_event=events[i].append))
    for s in seqs:
        engine.add(s)
    while any(s.status is not SeqStatus.FINISHED for s in seqs):
        engine.step()
    for s, i in zip(seqs, events):
        s.events = events[i]
    return seqs


def reference(params_list) -> list[list[int]]:
    seqs = run(make_engine(), PROMPTS, params_list)
    assert all(s.finish_reason is FinishReason.LENGTH for s in seqs)
    return [s.output_ids for s in seqs]


def params_mix():
    return [GREEDY if i % 2 else SEEDED for i in range(len(PROMPTS))]


def check_poisoned(seqs, ref, code: ErrorCode):
    *good, poison = seqs
    assert [s.output_ids for s in good] == ref
    assert all(s.finish_reason is FinishReason.LENGTH for s in good)
    assert poison.finish_reason is FinishReason.ERROR
    last = poison.events[-1]
    assert last.finish_reason is FinishReason.ERROR and last.code is code
    assert sum(ev.finish_reason is not None for ev in poison.events) == 1  # exactly one final event


# -- one row fails inside the step: the others are untouched ---------------------------------------
def test_nonfinite_logits_fail_only_their_row(monkeypatch):
    ref = reference(params_mix())
    engine = make_engine()
    real = engine.runner.execute

    def poisoned(plan):
        logits = real(plan).clone()  # [R, V] for the rows that sample (inference tensors are read-only)
        rows = [seq for seq, n in plan if seq.num_computed + n == seq.num_tokens]
        for i, seq in enumerate(rows):
            if seq.prompt_ids == POISON and seq.output_ids:  # after its first token: mid-generation
                logits[i, 3] = float("nan")
        return logits

    monkeypatch.setattr(engine.runner, "execute", poisoned)
    seqs = run(engine, PROMPTS + [POISON], params_mix() + [GREEDY])
    check_poisoned(seqs, ref, ErrorCode.NUMERICAL_ERROR)
    assert len(seqs[-1].output_ids) == 1  # the NaN row was never sampled
    assert engine.snapshot().kv_blocks_requests == 0


@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
def test_infinite_logits_fail_only_their_row(monkeypatch, value):
    ref = reference([GREEDY] * len(PROMPTS))
    engine = make_engine()
    real = engine.runner.execute

    def poisoned(plan):
        logits = real(plan).clone()
        rows = [seq for seq, n in plan if seq.num_computed + n == seq.num_tokens]
        for i, seq in enumerate(rows):
            if seq.prompt_ids == POISON:
                logits[i, 0] = value
        return logits

    monkeypatch.setattr(engine.runner, "execute", poisoned)
    check_poisoned(run(engine, PROMPTS + [POISON], [GREEDY] * (len(PROMPTS) + 1)), ref, ErrorCode.NUMERICAL_ERROR)


def test_sampling_error_fails_only_its_row(monkeypatch):
    ref = reference(params_mix())
    real, real_batch = sampler_mod._draw, sampler_mod._draw_batch
    poison = SamplingParams(max_new_tokens=NEW, ignore_eos=True, temperature=1.0, top_k=7, seed=1)

    def draw(row_logits, params, gen):
        if params.top_k == 7:
            raise RuntimeError("injected sampling failure")
        return real(row_logits, params, gen)

    def draw_batch(logits, params, gens):  # the poison row breaks the batched draw for everyone...
        if any(p.top_k == 7 for p in params):
            raise RuntimeError("injected sampling failure")
        return real_batch(logits, params, gens)

    monkeypatch.setattr(sampler_mod, "_draw", draw)
    monkeypatch.setattr(sampler_mod, "_draw_batch", draw_batch)  # ...so the rows are redrawn one by one
    check_poisoned(run(make_engine(), PROMPTS + [POISON], params_mix() + [poison]), ref, ErrorCode.SAMPLING_ERROR)


def test_detokenizer_error_fails_only_its_row(monkeypatch):
    ref = reference(params_mix())

    class Fragile(IncrementalDetokenizer):
        def add(self, token_id, **kw):
            if self.ids[:3] == POISON:
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
            return super().add(token_id, **kw)

    monkeypatch.setattr(engine_mod, "IncrementalDetokenizer", Fragile)
    check_poisoned(run(make_engine(), PROMPTS + [POISON], params_mix() + [GREEDY]), ref, ErrorCode.GENERATION_FAILED)


def test_stop_check_and_observer_errors_fail_only_their_row():
    ref = reference(params_mix())

    class Observer:
        def on_step(self, *a):
            pass

        def on_token(self, seq, now):
            if seq.prompt_ids == POISON:
                raise KeyError("injected observer failure")

        def on_finish(self, seq, now):
            if seq.prompt_ids == POISON:
                raise KeyError("injected observer failure at finish")  # still gets its final event

    engine = make_engine()
    engine.observer = Observer()
    check_poisoned(run(engine, PROMPTS + [POISON], params_mix() + [GREEDY]), ref, ErrorCode.GENERATION_FAILED)


def test_an_observer_failing_at_the_end_of_every_step_fails_nobody():
    """The step's end publishes metrics (on_step): if that raises, every request still finishes
    with the reference tokens (nobody caused it, so nobody fails)."""
    ref = reference(params_mix())
    calls = []

    class Observer:
        def on_token(self, seq, now):
            pass

        def on_finish(self, seq, now):
            pass

        def on_step(self, *a):
            calls.append(a)
            raise RuntimeError("injected failure publishing the step's metrics")

    engine = make_engine()
    engine.observer = Observer()
    seqs = run(engine, PROMPTS, params_mix())
    assert [s.output_ids for s in seqs] == ref and len(calls) > 3
    assert all(s.finish_reason is not FinishReason.ERROR for s in seqs)


def test_adapter_prefix_write_failure_fails_only_its_row():
    ref = reference(params_mix())

    class PrefixFails(NoAdapters):
        def reserve(self, seq, running):
            return True

        def activate(self, admitted, runner):  # the KV prefix copy of POISON's row fails
            return [(seq, RuntimeError("injected prefix copy failure")) for seq in admitted
                    if seq.prompt_ids == POISON]

    engine = make_engine(adapters=PrefixFails())
    check_poisoned(run(engine, PROMPTS + [POISON], params_mix() + [GREEDY]), ref, ErrorCode.ADAPTER_UNAVAILABLE)
    assert engine.snapshot().kv_blocks_requests == 0  # its KV blocks came back


def test_adapter_admission_failure_is_adapter_unavailable():
    class AdmissionFails(NoAdapters):
        def reserve(self, seq, running):
            return True

        def activate(self, admitted, runner):  # installing POISON's adapter runs out of memory
            return [(seq, MemoryError("injected device OOM")) for seq in admitted if seq.prompt_ids == POISON]

    ref = reference(params_mix())
    check_poisoned(run(make_engine(adapters=AdmissionFails()), PROMPTS + [POISON], params_mix() + [GREEDY]), ref,
                   ErrorCode.ADAPTER_UNAVAILABLE)


# -- the sampler itself ------------------------------------------------------------------------------
def test_nonfinite_rows_is_vectorised_and_exact():
    logits = torch.randn(5, 100)
    assert nonfinite_rows(logits) == []
    logits[1, 4], logits[3, 0], logits[4, 99] = float("nan"), float("inf"), float("-inf")
    assert nonfinite_rows(logits) == [1, 3, 4]
    assert nonfinite_rows(torch.empty(0, 100)) == []
    # both infinities in one row sum to NaN; finite rows whose sums overflow are not flagged
    logits[2, 5], logits[2, 6] = float("inf"), float("-inf")
    logits[0, :3] = 3e38
    logits[1, :2] = -3e38
    assert not torch.isfinite(logits[0].sum()) and nonfinite_rows(logits) == [1, 2, 3, 4]
    logits[1, 4] = 0.0
    assert nonfinite_rows(logits) == [2, 3, 4]
    assert nonfinite_rows(torch.full((2, 8), 3e38)) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nonfinite_rows_equals_the_elementwise_check(dtype):
    """The row-sum screen against the obvious form, over random rows of huge, tiny and
    non-finite values (an overflowing finite row must never be flagged)."""
    gen = torch.Generator().manual_seed(5)
    big = torch.finfo(dtype).max
    for _ in range(50):
        logits = torch.randn(16, 64, generator=gen).to(dtype)
        picks = torch.randint(0, 16 * 64, (12,), generator=gen).tolist()
        kinds = torch.randint(0, 5, (12,), generator=gen).tolist()
        for flat, kind in zip(picks, kinds):
            logits.view(-1)[flat] = (float("nan"), float("inf"), float("-inf"), big, -big)[kind]
        want = (~torch.isfinite(logits).all(dim=-1)).nonzero().flatten().tolist()
        assert nonfinite_rows(logits) == want


@pytest.mark.parametrize("temperature", [1e-300, 1e-40, 5e-324, SAMPLING_EPS / 2, 0.0, -0.0])
def test_temperature_below_the_floor_is_greedy(temperature):
    params = SamplingParams(temperature=temperature)
    assert params.greedy
    logits = torch.randn(3, 50)
    assert sample(logits, [params] * 3, [None] * 3) == torch.argmax(logits, dim=-1).tolist()


def test_temperature_at_the_floor_samples_the_argmax_of_huge_logits():
    params = SamplingParams(temperature=SAMPLING_EPS, seed=0)
    assert not params.greedy
    logits = torch.tensor([[3e38, 1e38, -3e38, 0.0]])  # / 1e-5 overflows float32 without the clamp
    assert torch.isfinite(torch.softmax(filter_logits(logits[0], params), -1)).all()
    assert sample(logits, [params], [torch.Generator().manual_seed(0)]) == [0]


@pytest.mark.parametrize("top_p", [1e-300, 5e-324, 1e-46, 1e-9])
def test_top_p_that_underflows_float32_keeps_the_top_token(top_p):
    logits = torch.randn(200, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=0.5, top_p=top_p)
    out = filter_logits(logits, params)
    assert torch.isfinite(out).sum() == 1 and int(torch.argmax(out)) == int(torch.argmax(logits))
    assert sample(logits[None], [params], [torch.Generator().manual_seed(1)]) == [int(torch.argmax(logits))]


@pytest.mark.parametrize("field,value", [
    ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", -1e-9), ("temperature", 100.5),
    ("top_p", 0.0), ("top_p", -0.0), ("top_p", 1.0000001), ("top_p", float("nan")), ("top_k", -1),
    ("top_k", 2**31), ("max_new_tokens", 0), ("seed", -1), ("seed", 2**63), ("temperature", True),
    ("stop", ("",)),
])
def test_sampling_params_refuse_values_outside_the_rules(field, value):
    with pytest.raises(SamplingParamError) as err:
        SamplingParams(**{field: value})
    assert err.value.field == field


F32_MAX = float(torch.finfo(torch.float32).max)
finite_logits = st.floats(min_value=-F32_MAX, max_value=F32_MAX, width=32)
accepted_params = st.builds(
    SamplingParams,
    temperature=st.one_of(st.floats(0.0, 100.0), st.sampled_from([1e-300, SAMPLING_EPS, 100.0])),
    top_p=st.one_of(st.floats(0.0, 1.0, exclude_min=True), st.sampled_from([5e-324, 1e-300, 1.0])),
    top_k=st.one_of(st.integers(0, 300), st.just(2**31 - 1)),
    seed=st.integers(0, 2**63 - 1),
)


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(params=accepted_params, logits=st.lists(finite_logits, min_size=1, max_size=40),
       scale=st.sampled_from([1.0, 1e-30, 1e30, 3e38]))
def test_every_accepted_parameter_samples_a_valid_token(params, logits, scale):
    """Property: for any accepted parameters and any finite float32 logits, sampling never
    fails and returns a token with the maximal logit or one the filters kept."""
    row = (torch.tensor(logits, dtype=torch.float32) * scale).clamp(-F32_MAX, F32_MAX)
    out = sample(row[None], [params], [torch.Generator().manual_seed(params.seed)])
    assert len(out) == 1 and not isinstance(out[0], SampleFailure)
    tok = out[0]
    assert 0 <= tok < len(logits)
    if params.greedy:
        assert tok == int(torch.argmax(row))
    else:
        probs = torch.softmax(filter_logits(row, params), -1)
        assert torch.isfinite(probs).all() and math.isclose(float(probs.sum()), 1.0, rel_tol=1e-3)
        assert probs[tok] > 0


def test_a_raising_row_becomes_a_failure_not_an_exception(monkeypatch):
    def boom(*a):
        raise RuntimeError("x")

    monkeypatch.setattr(sampler_mod, "_draw", boom)
    monkeypatch.setattr(sampler_mod, "_draw_batch", boom)
    hot = SamplingParams(temperature=1.0)
    out = sample(torch.randn(3, 10), [SamplingParams(), hot, SamplingParams()], [None] * 3)
    assert isinstance(out[1], SampleFailure) and out[1].code is ErrorCode.SAMPLING_ERROR
    assert isinstance(out[0], int) and isinstance(out[2], int)


def test_the_row_by_row_fallback_draws_what_the_batch_would_have(monkeypatch):
    """When the batched draw fails, each row is redrawn with the uniform its generator gave the batch,
    so a seeded request's tokens do not depend on whether its batch-mates broke the batch."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(3)) * 2
    params = [SamplingParams(temperature=0.9, top_p=0.8, seed=i) for i in range(4)]

    def gens():
        return [torch.Generator().manual_seed(10 + i) for i in range(4)]

    batched = sample(logits, params, gens())

    def broken(*a):
        raise RuntimeError("x")

    monkeypatch.setattr(sampler_mod, "_draw_batch", broken)
    assert sample(logits, params, gens()) == batched


# -- supervisor ------------------------------------------------------------------------------------
def test_restart_tracker_backs_off_and_gives_up_within_the_window():
    now = [0.0]
    tracker = RestartTracker(RestartPolicy(max_restarts=3, window_s=10.0, backoff_s=0.1, max_backoff_s=0.25),
                             clock=lambda: now[0])
    assert [tracker.next_delay() for _ in range(3)] == [0.1, 0.2, 0.25]
    assert tracker.next_delay() is None  # a 4th crash inside the window: give up
    now[0] = 10.5  # the window moved on: crashes are forgiven
    assert tracker.next_delay() == 0.1


def test_engine_reset_frees_every_slot_and_forgets_requests():
    engine = make_engine()
    seqs = [Sequence(list(p), GREEDY, on_event=lambda ev: None) for p in PROMPTS]
    for s in seqs:
        engine.add(s)
    engine.step()
    assert engine.snapshot().kv_blocks_requests > 0
    held = engine.reset()
    assert set(held) == set(seqs) and all(s.status is SeqStatus.FINISHED for s in seqs)
    assert engine.snapshot().kv_blocks_requests == 0 and not engine.has_work()
    assert [s.output_ids for s in run(engine, PROMPTS, [GREEDY] * len(PROMPTS))] == reference([GREEDY] * 6)


class Fatal(BaseException):
    """Not an Exception: escapes every per-row guard, like a device error or an interpreter bug."""


def test_supervisor_restarts_the_loop_after_a_fatal_error():
    engine = make_engine()
    aengine = AsyncEngine(engine, idle_wait_s=0.01)
    real = engine.step
    armed = {"fire": False}

    def step():
        if armed["fire"]:
            armed["fire"] = False
            raise Fatal("injected")
        return real()

    engine.step = step

    async def scenario():
        slow = aengine.submit(PROMPTS[0], SamplingParams(max_new_tokens=40, ignore_eos=True))
        it = aiter(slow)
        first = await anext(it)  # running now
        assert first.finish_reason is None
        armed["fire"] = True
        events = [ev async for ev in it]
        assert events[-1].finish_reason is FinishReason.ERROR and events[-1].code is ErrorCode.ENGINE_RESTARTED
        deadline = time.monotonic() + 5
        while not aengine.running:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        again = [ev async for ev in aengine.submit(PROMPTS[1], GREEDY)]
        return again

    aengine.start()
    try:
        again = asyncio.run(scenario())
    finally:
        aengine.stop()
    assert again[-1].finish_reason is FinishReason.LENGTH
    assert [ev.token_id for ev in again] == reference([GREEDY] * 6)[1]
    assert aengine.restarts == 1 and engine.snapshot().kv_blocks_requests == 0


def test_supervisor_refuses_work_while_restarting_and_gives_up_after_repeated_crashes():
    engine = make_engine()
    aengine = AsyncEngine(engine, idle_wait_s=0.01,
                          restart_policy=RestartPolicy(max_restarts=2, window_s=60, backoff_s=0.3))

    def step():
        raise Fatal("always")

    engine.step = step

    async def scenario():
        codes = []
        while aengine.state is not EngineState.DEAD:
            try:
                stream = aengine.submit(PROMPTS[0], GREEDY)
            except EngineRestartingError:
                assert aengine.state is EngineState.RESTARTING
                codes.append("restarting")
                await asyncio.sleep(0.02)
                continue
            codes.append([ev async for ev in stream][-1].code)
        return codes

    aengine.start()
    try:
        codes = asyncio.run(asyncio.wait_for(scenario(), 20))
    finally:
        aengine.stop()
    assert codes.count(ErrorCode.ENGINE_RESTARTED) == 2 and ErrorCode.ENGINE_STOPPED in codes
    assert "restarting" in codes and aengine.restarts == 2 and "Fatal" in aengine.dead_reason


# -- adapter device tier after failures ---------------------------------------------------------------
def test_engine_reset_with_adapters_leaves_a_consistent_device_tier(tmp_path):
    """After a crash mid-generation with a merged LoRA and pinned slots, reset() restores the
    base weights, empties the slots and the pins, and every adapter serves correctly again."""
    from peftserve.server.runtime.merge import MergePolicy
    from tests.test_engine_faults import _serving

    serving = _serving(tmp_path)
    engine, runtime = serving.engine, serving.runtime
    a, b = serving.registry.resolve("a"), serving.registry.resolve("b")
    prompts, params = [[1, 2, 3], [4, 5, 6, 7]], SamplingParams(max_new_tokens=5, ignore_eos=True)
    ref = [s.output_ids for s in engine.generate(prompts * 3, params, adapters=[a, a, b, b, None, None])]
    merger = runtime.merger
    merger.policy, merger.min_steps = MergePolicy.SINGLE_ADAPTER, 1
    seqs = [Sequence(p, SamplingParams(max_new_tokens=30, ignore_eos=True), lambda e: None, adapter=a) for p in prompts]
    for s in seqs:
        engine.add(s)
    for _ in range(3):
        engine.step()
    assert merger.merged_slot != 0 and runtime.slots.pins  # a LoRA is folded into the base weights
    engine.reset()
    assert merger.merged_slot == 0 and not runtime.slots.pins and runtime.resident == 0
    assert engine.snapshot().kv_blocks_requests == 0
    merger.policy = MergePolicy.NEVER
    again = [s.output_ids for s in engine.generate(prompts * 3, params, adapters=[a, a, b, b, None, None])]
    assert again == ref


def test_prefix_failure_gives_back_the_slot_pin_and_half_installs_are_cleared():
    from peftserve.server.runtime.kinds import WeightKind
    from peftserve.server.runtime.layers import AdapterLayers
    from peftserve.server.runtime.runtime import DeviceRuntime

    class Handle:
        kind, key = "fake", "v1"

    class PrefixFails(WeightKind):  # a slot kind with a prefix, whose prefix cannot be computed
        uses_prefix = True

        def to_device(self, ver, dtype, device):
            return {}

        def prefix(self, ver, runner):
            raise MemoryError("injected")

    class HalfInstall(PrefixFails):
        uses_prefix = False

        def install(self, lay, slot, weights):
            next(iter(lay.linears.values())).put(self, slot, object())  # one module written, then failure
            raise RuntimeError("injected install failure")

    layers = AdapterLayers(tiny_llama(0))
    cpu = torch.device("cpu")
    runtime = DeviceRuntime(layers, 2, torch.float32, cpu, kinds={"fake": PrefixFails()})
    seq = Sequence([1], GREEDY, lambda e: None, adapter=Handle())
    assert runtime.reserve(seq, [])
    [(failed, exc)] = runtime.activate([seq], runner=None)
    assert failed is seq and isinstance(exc, MemoryError)
    assert all(n == 0 for n in runtime.slots.pins.values())  # the slot can be evicted again

    runtime = DeviceRuntime(layers, 2, torch.float32, cpu, kinds={"fake": HalfInstall()})
    seq = Sequence([1], GREEDY, lambda e: None, adapter=Handle())
    assert runtime.reserve(seq, [])
    [(failed, exc)] = runtime.activate([seq], runner=None)
    assert failed is seq and isinstance(exc, RuntimeError)
    assert all(not lin.entries for lin in layers.linears.values()) and runtime.resident == 0
