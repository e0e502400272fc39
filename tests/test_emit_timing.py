"""EmitTiming.OVERLAPPED (engine.py): a step's tokens become text and events during the next step,
after its forward is launched. On CUDA that is the default; here it is forced on CPU, where it
must give exactly IMMEDIATE's tokens, texts, finish reasons, logprobs and event order, on the
dynamic and the fixed-shape step, with stop strings, EOS, min_tokens, seeded sampling and
penalties in one batch; aborts still deliver the last text; failures stay with their row."""

from __future__ import annotations

import pytest
import torch

from peftserve.server.engine import engine as engine_mod
from peftserve.server.engine.config import EngineConfig
from peftserve.server.engine.detokenizer import IncrementalDetokenizer
from peftserve.server.engine.engine import EmitTiming, LLMEngine, resolve_emit_timing
from peftserve.server.engine.request import ErrorCode, FinishReason, SamplingParams, Sequence, SeqStatus
from tests.test_lora_parity import StubTokenizer
from tests.tiny import tiny_llama

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13], [20], [30, 31, 32, 33], [40, 41], [50, 51, 52, 53, 54, 55], [60, 61],
           [70, 71, 72]]
NEW = 12


def make_engine(timing: str, mode: str = "dynamic", eos: set[int] | None = None) -> LLMEngine:
    cfg = EngineConfig(max_batch_size=8, max_model_len=64, emit_timing=timing, decode_mode=mode)
    engine = LLMEngine(tiny_llama(0), StubTokenizer(), cfg)
    if eos is not None:
        engine.eos = eos
    return engine


def run(engine: LLMEngine, params: list[SamplingParams]) -> list[Sequence]:
    seqs = []
    for p, sp in zip(PROMPTS, params):
        events: list = []
        seq = Sequence(list(p), sp, on_event=events.append)
        seq.events = events
        seqs.append(seq)
        engine.add(seq)
    while any(s.status is not SeqStatus.FINISHED for s in seqs):
        engine.step()
    return seqs


def observed(seqs: list[Sequence]) -> list:
    """Everything a consumer sees: per request its ids, reason and events in order, the top
    logprob ids included; the logprob values apart (`assert_same_logprobs`)."""
    return [(s.output_ids, s.finish_reason,
             [(ev.token_id, ev.text, ev.finish_reason, ev.code, ev.logprobs and [t for t, _ in ev.logprobs[1]])
              for ev in s.events]) for s in seqs]


def assert_same_logprobs(got: list[Sequence], want: list[Sequence]) -> None:
    """Logprob values agree to float32 rounding, not bit for bit: OVERLAPPED computes one more
    row for a request a stop string ends, so a later step's batch has one more row, and CPU GEMM
    kernels that pick their blocking by the row count (AVX-512/AMX builds of oneDNN do) round
    the other rows' logits differently in the last bits (seen: 5e-7)."""
    def values(seqs):
        return torch.tensor([v for s in seqs for ev in s.events if ev.logprobs
                             for v in (ev.logprobs[0], *(lp for _, lp in ev.logprobs[1]))], dtype=torch.float64)

    assert len(values(want)) > 0
    torch.testing.assert_close(values(got), values(want), rtol=0, atol=1e-5)


def workload(stop: str, eos_token: int) -> tuple[list[SamplingParams], set[int]]:
    greedy = dict(max_new_tokens=NEW, ignore_eos=True)
    # sampled rows at top-k 5: OVERLAPPED computes a stopped row one step more, so the two
    # timings batch differently and logits may differ in the last bit (docs/openai.md, "seed")
    params = [
        SamplingParams(**greedy),
        SamplingParams(**{**greedy, "stop": (stop,)}),  # stops by text mid-generation
        SamplingParams(max_new_tokens=NEW),  # may end by EOS
        SamplingParams(**{**greedy, "temperature": 0.9, "top_p": 0.9, "top_k": 5, "seed": 7, "logprobs": 2}),
        SamplingParams(max_new_tokens=NEW, min_tokens=4, stop=(stop,)),  # EOS and stop held back by min_tokens
        SamplingParams(**{**greedy, "repetition_penalty": 1.3, "presence_penalty": 0.5}),
        SamplingParams(**{**greedy, "max_new_tokens": 1}),  # ends on its first token
        SamplingParams(**{**greedy, "stop": (stop,), "temperature": 0.7, "top_k": 5, "seed": 3}),
    ]
    return params, {eos_token}


def test_auto_overlaps_only_on_an_asynchronous_device():
    assert resolve_emit_timing("auto", torch.device("cpu")) is EmitTiming.IMMEDIATE
    assert resolve_emit_timing("auto", torch.device("cuda")) is EmitTiming.OVERLAPPED
    assert resolve_emit_timing("overlapped", torch.device("cpu")) is EmitTiming.OVERLAPPED
    with pytest.raises(ValueError):
        EngineConfig(emit_timing="later")


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_overlapped_emission_equals_immediate(mode):
    # a stop string and an EOS id that really occur: read off a plain greedy run
    probe = run(make_engine("immediate", mode), [SamplingParams(max_new_tokens=NEW, ignore_eos=True)] * 8)
    text = StubTokenizer().decode(probe[1].output_ids)
    stop, eos_token = text[4:6], probe[2].output_ids[5]
    params, eos = workload(stop, eos_token)
    want = run(make_engine("immediate", mode, eos), params)
    got_engine = make_engine("overlapped", mode, eos)
    assert got_engine.emit_timing is EmitTiming.OVERLAPPED
    got = run(got_engine, params)
    reasons = {s.finish_reason for s in want}
    assert {FinishReason.STOP, FinishReason.EOS, FinishReason.LENGTH} <= reasons, reasons  # every path ran
    assert observed(got) == observed(want)
    assert_same_logprobs(got, want)
    assert not got_engine._unemitted
    if mode == "static":
        assert got_engine.runner.static_steps > 0


def test_an_abort_still_delivers_the_last_text():
    """A request aborted while its last token's text waits for the next step: the text goes out
    before the abort event, as IMMEDIATE sent it with the token."""
    texts = {}
    for timing in ("immediate", "overlapped"):
        engine = make_engine(timing)
        seqs = []
        for p in PROMPTS[:3]:
            events: list = []
            seq = Sequence(list(p), SamplingParams(max_new_tokens=NEW, ignore_eos=True), on_event=events.append)
            seq.events = events
            seqs.append(seq)
            engine.add(seq)
        for _ in range(4):
            engine.step()
        if timing == "overlapped":
            assert any(item[0] is seqs[1] for item in engine._unemitted)
        engine.abort(seqs[1])
        assert seqs[1].events[-1].finish_reason is FinishReason.ABORT
        texts[timing] = "".join(ev.text for ev in seqs[1].events)
        while engine.has_work():
            engine.step()
        assert not engine._unemitted
    assert texts["overlapped"] == texts["immediate"] != ""


def test_a_detokenizer_failure_in_deferred_emission_fails_only_its_row(monkeypatch):
    params = [SamplingParams(max_new_tokens=NEW, ignore_eos=True)] * len(PROMPTS)
    want = run(make_engine("immediate"), params)

    class Fragile(IncrementalDetokenizer):
        def add(self, token_id, **kw):
            if self.ids[:4] == PROMPTS[3] and len(self.ids) > 6:  # its third token: a deferred one
                raise ValueError("injected")
            return super().add(token_id, **kw)

    monkeypatch.setattr(engine_mod, "IncrementalDetokenizer", Fragile)
    got = run(make_engine("overlapped"), params)
    assert got[3].finish_reason is FinishReason.ERROR and got[3].events[-1].code is ErrorCode.GENERATION_FAILED
    assert sum(ev.finish_reason is not None for ev in got[3].events) == 1
    others = [i for i in range(len(PROMPTS)) if i != 3]
    assert observed([got[i] for i in others]) == observed([want[i] for i in others])


def test_reset_forgets_unemitted_tokens():
    engine = make_engine("overlapped")
    for p in PROMPTS:
        engine.add(Sequence(list(p), SamplingParams(max_new_tokens=NEW, ignore_eos=True), on_event=lambda ev: None))
    for _ in range(3):
        engine.step()
    assert engine._unemitted
    held = engine.reset()
    assert len(held) == len(PROMPTS) and engine._unemitted == []
    assert engine.step() == 0
