"""Logprobs, penalties, min_tokens against plain-torch references, for every adapter kind in one batch.

The reference is a straightforward loop: the oracle model (PEFT's `PeftModel`, or the base with
our reference bottleneck forward) runs the whole prefix each step, the penalties are applied by
`ref_penalize` (Python loops over the token history, written from the OpenAI/vLLM definitions),
and the next token is the argmax (or an inverse-CDF draw from a generator seeded like the
engine's). The engine runs all rows of all kinds in one continuous batch.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from peft import PeftModel, get_peft_model

from peftserve.adapters.bottleneck import BottleneckConfig, attach_bottleneck, init_bottleneck, read_bottleneck, \
    save_bottleneck
from peftserve.server.engine.config import EngineConfig
from peftserve.server.build import build_engine
from peftserve.server.engine.logprobs import token_logprobs
from peftserve.server.engine.penalties import apply_penalties
from peftserve.server.engine.request import SamplingParams
from peftserve.server.engine.sampler import filter_logits
from tests.test_kinds_parity import BOTTLENECKS, PEFT_KINDS, VOCAB, _randomise, base
from tests.test_lora_parity import StubTokenizer

KINDS = ("lora", "prompt-random", "prefix", "ia3", "bn-houlsby")
NEW = 8


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (3, 9, 20)]


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """name -> (adapter dir or None, oracle model) for the base and each kind in KINDS."""
    root = tmp_path_factory.mktemp("extras")
    out = {None: (None, _no_eos(base()))}
    for i, name in enumerate(KINDS):
        if name in PEFT_KINDS:
            model = base()
            torch.manual_seed(500 + i)
            pm = get_peft_model(model, PEFT_KINDS[name]())
            _randomise(pm, 600 + i)
            pm.save_pretrained(root / name)
            out[name] = (root / name, _no_eos(PeftModel.from_pretrained(base(), root / name).eval()))
        else:
            model = base()
            cfg = BottleneckConfig.from_dict({"peft_type": "BOTTLENECK", **BOTTLENECKS[name]})
            save_bottleneck(root / name, cfg, init_bottleneck(cfg, model, seed=700 + i, random_up=True))
            cfg2, w2 = read_bottleneck(root / name, model)
            attach_bottleneck(model, cfg2, w2)
            out[name] = (root / name, _no_eos(model))
    return out


def _no_eos(model):
    model.generation_config.eos_token_id = None
    return model


def serving_for(tmp_path, refs):
    cfg = EngineConfig(max_batch_size=64, max_model_len=96, max_num_batched_tokens=64, max_adapters_per_batch=8)
    serving = build_engine(base(), StubTokenizer(), cfg, store=tmp_path / "store")
    for name, (d, _) in refs.items():
        if name is not None:
            serving.registry.import_dir(d, name)
    return serving


def collect_logprobs(serving, jobs):
    """Run jobs through the engine capturing every TokenEvent's logprobs."""
    from peftserve.server.engine.request import Sequence, SeqStatus

    engine = serving.engine
    out: list[list] = [[] for _ in jobs]
    seqs = []
    for i, (a, p, sp) in enumerate(jobs):
        seq = Sequence(list(p), sp, on_event=lambda ev, i=i: out[i].append(ev),
                       adapter=serving.registry.resolve(a) if a else None)
        engine.add(seq)
        seqs.append(seq)
    while any(s.status is not SeqStatus.FINISHED for s in seqs):
        engine.step()
    return seqs, out


# -- references ---------------------------------------------------------------------------------------
def ref_penalize(logits: torch.Tensor, prompt: list[int], out: list[int], p: SamplingParams, eos=()) -> torch.Tensor:
    logits = logits.clone()
    if p.repetition_penalty != 1.0:
        for t in set(prompt) | set(out):
            v = logits[t].item()
            logits[t] = v / p.repetition_penalty if v > 0 else v * p.repetition_penalty
    for t, c in Counter(out).items():
        logits[t] -= p.frequency_penalty * c + p.presence_penalty
    if len(out) < p.min_tokens:
        for e in eos:
            logits[e] = float("-inf")
    return logits


@torch.no_grad()
def ref_run(model, prompt: list[int], p: SamplingParams, eos=()):
    """-> (tokens, [raw log_softmax [V] per step]) by the straightforward loop."""
    gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
    ids, out, lps = list(prompt), [], []
    for _ in range(p.max_new_tokens):
        logits = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)
                       ).logits[0, -1].float()
        lps.append(torch.log_softmax(logits, dim=-1))
        proc = ref_penalize(logits, prompt, out, p, eos)
        if p.greedy:
            tok = int(torch.argmax(proc))
        else:
            # inverse-CDF draw with one float64 uniform per step from the request's generator
            u = float(torch.rand((), generator=gen, dtype=torch.float64))
            cdf = torch.softmax(filter_logits(proc, p), -1).double().cumsum(0)
            tok = int((cdf <= u * float(cdf[-1])).sum())
        out.append(tok)
        ids.append(tok)
    return out, lps


# -- tests ----------------------------------------------------------------------------------------------
def test_plain_rows_pay_nothing():
    logits = torch.randn(3, 11)
    plain = [SamplingParams(), SamplingParams(temperature=0.5), SamplingParams(top_k=3)]

    class S:
        def __init__(self, p):
            self.params, self.prompt_ids, self.output_ids = p, [1, 2], [3]

    assert apply_penalties(logits, [S(p) for p in plain], [0]) is logits  # no copy, no work
    assert token_logprobs(logits, plain, [0, 1, 2]) == [None, None, None]
    assert not any(p.processes_logits for p in plain)


def test_logprobs_equal_log_softmax_of_reference_logits(tmp_path, refs):
    serving = serving_for(tmp_path, refs)
    k = 5
    jobs = [(name, p, SamplingParams(max_new_tokens=NEW, ignore_eos=True, logprobs=k))
            for p in prompts() for name in refs]  # every kind interleaved in one batch
    seqs, events = collect_logprobs(serving, jobs)
    for (name, prompt, sp), seq, evs in zip(jobs, seqs, events):
        tokens, ref_lps = ref_run(refs[name][1], prompt, sp)
        assert seq.output_ids == tokens, name
        got = [ev.logprobs for ev in evs if ev.token_id is not None]
        assert len(got) == NEW
        for step, ((lp, top), ref) in enumerate(zip(got, ref_lps)):
            assert math.isclose(lp, ref[tokens[step]].item(), abs_tol=1e-4), (name, step)
            ref_vals, ref_ids = torch.topk(ref, k)
            assert [t for t, _ in top] == ref_ids.tolist(), (name, step)
            assert torch.allclose(torch.tensor([v for _, v in top]), ref_vals, atol=1e-4)


PENALTIES = [
    SamplingParams(presence_penalty=1.5),
    SamplingParams(frequency_penalty=0.9),
    SamplingParams(repetition_penalty=1.8),
    SamplingParams(presence_penalty=-0.5, frequency_penalty=1.2, repetition_penalty=0.7),
]


def _with(p: SamplingParams, **kw) -> SamplingParams:
    from dataclasses import replace

    return replace(p, max_new_tokens=NEW, ignore_eos=True, **kw)


def test_penalties_match_reference_for_every_kind_in_one_batch(tmp_path, refs):
    serving = serving_for(tmp_path, refs)
    jobs = [(name, p, _with(sp, logprobs=1)) for sp in PENALTIES for p in prompts()[:2] for name in refs]
    seqs, events = collect_logprobs(serving, jobs)
    changed = 0
    for (name, prompt, sp), seq, evs in zip(jobs, seqs, events):
        tokens, ref_lps = ref_run(refs[name][1], prompt, sp)
        assert seq.output_ids == tokens, (name, sp)
        plain, _ = ref_run(refs[name][1], prompt, _with(SamplingParams()))
        changed += plain != tokens
        # logprobs stay those of the raw model distribution, whatever the penalties did
        for ev, ref, tok in zip([e for e in evs if e.token_id is not None], ref_lps, tokens):
            assert math.isclose(ev.logprobs[0], ref[tok].item(), abs_tol=1e-4)
    assert changed >= len(jobs) // 2, "penalties changed too few outputs: the test would be vacuous"


def test_seeded_sampling_with_penalties_matches_reference(tmp_path, refs):
    serving = serving_for(tmp_path, refs)
    # top-k 5: the reference's logits equal the engine's only to rounding, and a wide top-k's cut can
    # fall between near-equal logits (here 7e-7 apart at top-k 50), so another CPU could flip it
    jobs = [(name, prompts()[1], _with(sp, temperature=0.8, top_k=5, seed=100 + i))
            for i, sp in enumerate(PENALTIES) for name in refs]
    seqs, _ = collect_logprobs(serving, jobs)
    for (name, prompt, sp), seq in zip(jobs, seqs):
        assert seq.output_ids == ref_run(refs[name][1], prompt, sp)[0], (name, sp)


def test_min_tokens_masks_eos_and_defers_stop_strings(tmp_path, refs):
    serving = serving_for(tmp_path, refs)
    prompt = prompts()[1]
    first = ref_run(refs[None][1], prompt, _with(SamplingParams()))[0][0]
    serving.engine.eos = {first}  # the model's favourite first token is now EOS
    seqs, _ = collect_logprobs(serving, [(None, prompt, SamplingParams(max_new_tokens=NEW)),
                                         (None, prompt, SamplingParams(max_new_tokens=NEW, min_tokens=4))])
    assert seqs[0].output_ids == [first] and seqs[0].finish_reason.value == "eos"
    expected = ref_run(refs[None][1], prompt, _with(SamplingParams(min_tokens=4)), eos=[first])[0]
    got = seqs[1].output_ids
    assert got[:4] == expected[:4] and first not in got[:4]
    # stop strings: StubTokenizer renders token t as chr(65 + t % 26); stop on the first letter
    serving.engine.eos = set()
    plain = ref_run(refs[None][1], prompt, _with(SamplingParams()))[0]
    stop = chr(65 + plain[0] % 26)
    seqs, _ = collect_logprobs(serving, [(None, prompt, SamplingParams(max_new_tokens=NEW, stop=(stop,))),
                                         (None, prompt, SamplingParams(max_new_tokens=NEW, stop=(stop,),
                                                                       min_tokens=3))])
    assert len(seqs[0].output_ids) == 1 and seqs[0].finish_reason.value == "stop"
    assert len(seqs[1].output_ids) >= 3
