"""Random workloads against solo runs: what a request gets never depends on what else runs.

Each case draws an engine configuration — batch size, token budget, KV block size, a pool from
one sequence's worth up (so admission waits and growth preempts), adapter slots from 1
(eviction), decode mode, emit timing, merge policy, stack limits below some adapters' (fixed-shape
steps fall back) — and a workload: requests of every adapter kind, of weighted LoRA combinations
and of the base, arriving over the steps, greedy or seeded sampling with top-k/top-p, penalties,
logprobs, stop strings, EOS, min_tokens; some cancelled part way, some poisoned (every forward
they are part of raises), while the registry deletes and replaces adapters (combination members
too) under running requests.

Invariants per request: exactly one final event, last; the events' ids are its output ids; ids,
finish reason, text and logprobs equal the same request run alone on a roomy engine with the
adapter versions it was admitted with (a cancelled one: a prefix of them); a poisoned one fails
alone with `generation_failed` (or was cancelled first). Per case: every KV block back in the pool
(but the prefixes the runtime caches), no slot pin left, nothing running or waiting. The solo runs
are tied to PEFT by tests/test_kinds_parity.py (combinations by tests/test_lora_parity.py); here
the property is batch independence under every interleaving the scheduler can produce. Guards at
the end make sure the cases exercised what this docstring claims (preemption, eviction, merges,
replacement in flight, ...).

One exception is allowed, and checked: the forward is not bitwise batch-invariant (on CPU a
matmul's rows depend on the row count; docs/openai.md, "seed"), so a token may differ where a
last-bit change of the logits decides it: two greedy logits that close, or a draw that close to
the boundary between the two tokens (`_last_bit_flip`, on the solo run's logits and uniform).
Such a request is counted, not compared further.

Set PEFTSERVE_RANDOM_CASES to run more cases than the suite's 20 (an exploration, not CI; with
`--timeout=0`: the suite's per-test limit is 600 s, ~1.5 s a case).
"""

from __future__ import annotations

import collections
import os
import random
from dataclasses import dataclass, replace

import pytest
import torch
from peft import LoraConfig, get_peft_model

from peftserve.server.build import build_engine
from peftserve.server.engine import engine as engine_mod
from peftserve.server.engine.config import EngineConfig
from peftserve.server.engine.request import ErrorCode, FinishReason, SamplingParams, Sequence, SeqStatus
from peftserve.server.engine.sampler import filter_logits
from tests.margin_audit import peek_uniform, top_k_gap, top_p_margin
from tests.test_kinds_parity import VOCAB, artifacts, base  # noqa: F401 (module-scoped fixture)
from tests.test_lora_parity import StubTokenizer

LORAS = {"lora-b": dict(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"]),
         "lora-c": dict(r=8, lora_alpha=8, target_modules=["v_proj", "up_proj", "down_proj"])}

SEEDS = range(int(os.environ.get("PEFTSERVE_RANDOM_CASES", "20")))
MAX_LEN = 96
EOS = set(range(0, VOCAB, 23))  # ~4 % of the vocabulary: EOS ends some requests early
STOPS = ["A", "QZ", "M", "XY", "BB", "K"]  # StubTokenizer's text is one letter per token


@pytest.fixture(scope="module")
def adapters(artifacts, tmp_path_factory):  # noqa: F811
    """The kinds' artifacts (name -> (dir, oracle)) and two more LoRAs, so combinations of three
    LoRAs of different ranks and targets can be drawn."""
    root = tmp_path_factory.mktemp("loras")
    out = dict(artifacts)
    for i, (name, kw) in enumerate(LORAS.items()):
        model = base()
        torch.manual_seed(500 + i)
        get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **kw)).save_pretrained(root / name)
        out[name] = (root / name, {})
    return out


@dataclass
class Job:
    adapter: str | None | tuple  # a name, the base, or ((name, weight), ...): a LoRA combination
    prompt: list[int]
    params: SamplingParams
    arrives: int  # engine step at which it is added
    cancel_after: int | None  # cancelled once it has this many output tokens
    poisoned: bool  # every forward it is part of raises: it must fail alone


def _serving(store, adapters, **cfg):
    serving = build_engine(base(), StubTokenizer(), EngineConfig(max_model_len=MAX_LEN, **cfg), store=store)
    for name, (d, _) in adapters.items():
        if name is not None:
            serving.registry.import_dir(d, name)
    serving.engine.eos = set(EOS)
    return serving


def _params(rng: random.Random) -> SamplingParams:
    kw = dict(max_new_tokens=rng.randint(1, 40), ignore_eos=rng.random() < 0.6)
    if rng.random() < 0.5:
        kw.update(temperature=rng.choice([0.0, 0.7, 1.3]), seed=rng.randint(0, 999))
        if rng.random() < 0.5:
            kw.update(top_k=rng.choice([0, 5]), top_p=rng.choice([1.0, 0.8]))
        if rng.random() < 0.3:
            kw.update(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2)
        if rng.random() < 0.2:
            kw.update(logprobs=rng.choice([0, 3]))
    if rng.random() < 0.4:
        kw["stop"] = tuple(rng.choice(STOPS) for _ in range(rng.randint(1, 2)))
    if rng.random() < 0.3:
        kw["min_tokens"] = rng.randint(0, kw["max_new_tokens"])
    return SamplingParams(**kw)


def _adapter(rng: random.Random, names: list):
    if rng.random() < 0.15:  # a weighted combination of two or three LoRAs
        loras = rng.sample(["lora", *LORAS], rng.randint(2, 3))
        return tuple((n, rng.choice([-0.5, 0.7, 1.0, 1.5])) for n in loras)
    return rng.choice(names)


def _draw_case(seed: int, names: list, block_nbytes) -> tuple[dict, list[Job]]:
    rng = random.Random(seed)
    block = rng.choice([2, 4, 8, 16])
    batch = rng.choice([2, 3, 8, 32])
    blocks = rng.choice([None, MAX_LEN // block + 1, MAX_LEN // block + 2, 2 * MAX_LEN // block])
    cfg = dict(max_batch_size=batch, max_num_batched_tokens=max(batch, rng.choice([8, 16, 64])), kv_block_size=block,
               max_adapters_per_batch=rng.choice([1, 2, 3, 8]), decode_mode=rng.choice(["dynamic", "static"]),
               emit_timing=rng.choice(["immediate", "overlapped"]),
               merge_policy=rng.choice(["never", "single-adapter"]), merge_min_steps=rng.randint(1, 3),
               max_lora_rank=rng.choice([64, 2]), max_bottleneck_size=rng.choice([256, 8]))
    if blocks:
        cfg["kv_cache_bytes"] = blocks * block_nbytes(block)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (1, 2, 5, 9, 13, 26, 40)]
    jobs = [Job(_adapter(rng, names), rng.choice(prompts), _params(rng), rng.randint(0, 12),
                rng.randint(0, 8) if rng.random() < 0.15 else None, rng.random() < 0.08)
            for _ in range(rng.randint(4, 24))]
    return cfg, jobs


class Case:
    """One workload on one engine; `stats` counts what it exercised (for the guards)."""

    def __init__(self, seed, serving, adapters, jobs, stats):
        self.rng, self.serving, self.adapters, self.jobs, self.stats = random.Random(~seed), serving, adapters, jobs, stats
        self.weights = [n for n in adapters if n is not None]
        self.source = {n: n for n in self.weights}  # registry name -> the artifact it holds now
        self.mutates = self.rng.random() < 0.5
        self.runs: list[tuple[Job, Sequence, list[str], list]] = []  # job, sequence, artifacts, events
        self.poisoned: set[int] = set()  # seq ids
        self._poison(serving.engine)

    def _poison(self, engine) -> None:
        """A forward that has a poisoned request among its rows raises inside the model (after
        the step's buffers were filled), in the first decoder layer."""
        armed = [False]
        execute = engine.runner.execute

        def execute_marked(plan):
            armed[0] = any(seq.seq_id in self.poisoned for seq, _ in plan)
            try:
                return execute(plan)
            finally:
                armed[0] = False

        def raise_if_armed(module, args, kwargs):
            if armed[0]:
                raise RuntimeError("poisoned row in this forward")

        engine.runner.execute = execute_marked
        engine.model.layers[0].register_forward_pre_hook(raise_if_armed, with_kwargs=True)

    def run(self) -> None:
        engine, pending, step = self.serving.engine, sorted(self.jobs, key=lambda j: j.arrives), 0
        while pending or engine.has_work():
            if self.mutates and self.rng.random() < 0.15:
                self._mutate_registry()
            while pending and pending[0].arrives <= step:
                self._add(pending.pop(0))
            for job, seq, _, _ in self.runs:
                if job.cancel_after is not None and len(seq.output_ids) >= job.cancel_after:
                    seq.cancelled = True
            engine.step()
            step += 1
            assert step < 3000, "the engine stopped making progress"

    def _mutate_registry(self) -> None:
        """Delete an adapter while its requests may run; most times register another artifact
        under its name (running requests keep the version they were admitted with)."""
        victim = self.rng.choice(self.weights)
        if victim in self.source:
            running = [job for job, seq, _, _ in self.runs if seq.status is SeqStatus.RUNNING
                       and victim in _members(job.adapter)]
            self.serving.registry.delete(victim)
            self.stats["dropped while running"] += bool(running)
            self.stats["combination member dropped while running"] += any(isinstance(j.adapter, tuple) for j in running)
        if self.rng.random() < 0.7:
            new = self.rng.choice(self.weights)
            self.serving.registry.import_dir(self.adapters[new][0], victim)
            self.source[victim] = new
        else:
            self.source.pop(victim, None)

    def _add(self, job: Job) -> None:
        names = _members(job.adapter)
        if any(n not in self.source for n in names):
            return  # deleted: the API would answer 404
        sources = [self.source[n] for n in names]
        if isinstance(job.adapter, tuple) and any(src not in ("lora", *LORAS) for src in sources):
            return  # a member replaced by another kind: the API would answer 400
        events: list = []
        seq = Sequence(list(job.prompt), job.params, on_event=events.append,
                       adapter=_resolve(self.serving, job.adapter))
        self.runs.append((job, seq, sources, events))
        if job.poisoned:
            self.poisoned.add(seq.seq_id)
        self.serving.engine.add(seq)


def _members(adapter) -> list[str]:
    if adapter is None:
        return []
    return [n for n, _ in adapter] if isinstance(adapter, tuple) else [adapter]


def _resolve(serving, adapter):
    if adapter is None:
        return None
    if isinstance(adapter, tuple):
        return serving.registry.resolve([{"name": n, "weight": w} for n, w in adapter])
    return serving.registry.resolve(adapter)


def _alone(serving, adapters, sources: list[str], job: Job, draws: "DrawLog") -> tuple[list, list]:
    """The job alone on a roomy engine with the artifacts it was admitted with (a combination's
    members under names of their own there: two names may hold the same artifact) -> its events
    and what each of its tokens was drawn from."""
    adapter = job.adapter
    if isinstance(adapter, tuple):
        adapter = tuple((f"{n}.{src}", w) for (n, w), src in zip(adapter, sources))
        for (name, _), src in zip(adapter, sources):
            if name not in {v.name for v in serving.registry.list()}:
                serving.registry.import_dir(adapters[src][0], name)
    elif adapter is not None:
        adapter = sources[0]
    events: list = []
    seq = Sequence(list(job.prompt), job.params, on_event=events.append, adapter=_resolve(serving, adapter))
    serving.engine.add(seq)
    draws.rows = []
    try:
        for _ in range(3 * MAX_LEN):
            if seq.status is SeqStatus.FINISHED:
                return events, draws.rows
            serving.engine.step()
    finally:
        draws.rows = None
    raise AssertionError("a request alone on a roomy engine did not finish")


@dataclass
class Draw:
    """What a token of a solo run was drawn from: the row's logits as the sampler got them (after
    penalties) [V], its parameters and its uniform (None: greedy)."""

    logits: torch.Tensor
    params: SamplingParams
    u: float | None


class DrawLog:
    """The engine's `sample_step`, wrapped: while `rows` is a list, each row's Draw is appended
    (the solo engine samples one row a step, so they are the solo request's tokens in order)."""

    def __init__(self, monkeypatch):
        self.rows: list[Draw] | None = None
        real = engine_mod.sample_step

        def recording(logits, params, generators, flags=None):
            if self.rows is not None:
                for row, (p, gen) in enumerate(zip(params, generators)):
                    self.rows.append(Draw(logits[row].clone(), p, None if p.greedy else peek_uniform(gen)))
            return real(logits, params, generators, flags)

        monkeypatch.setattr(engine_mod, "sample_step", recording)


# How far a last-bit change of the logits reaches, with a wide margin: here the logits of a row
# alone and in a batch differ by <= 5e-7 (benchmarks/seed_flips.py), so a boundary of the draw's
# CDF moves by <= ~4e-7. A near-tie at the top-k or top-p cut gets the tighter FLIP_CUT_GAP (in
# logits for top-k, in probability mass for top-p): it excuses a divergence anywhere after the cut.
FLIP_LOGIT_GAP, FLIP_CDF_GAP, FLIP_CUT_GAP = 1e-4, 1e-5, 1e-5


def _last_bit_flip(draw: Draw, solo_token: int, token: int) -> bool:
    """Does a last-bit difference of the logits explain drawing `token` where the solo run drew
    `solo_token`? Greedy: their logits within FLIP_LOGIT_GAP. Sampled: the two tokens adjacent
    in the CDF (no mass between them) and the draw within FLIP_CDF_GAP of their boundary, or a
    near-tie at the row's top-k or top-p cut (`_cut_near_tie`: the kept set itself may change).
    A bug (a wrong generator, wrong penalties) diverges anywhere, so it passes this with a chance
    of ~1e-5 per request, more only for rows whose cut is a near-tie."""
    if draw.u is None:
        return bool(draw.logits[solo_token] - draw.logits[token] < FLIP_LOGIT_GAP)
    if _cut_near_tie(draw):
        return True
    probs = torch.softmax(filter_logits(draw.logits, draw.params), dim=-1).double()  # [V]
    lo, hi = sorted((solo_token, token))
    if probs[token] == 0 or probs[lo + 1:hi].sum() > 0:
        return False
    cdf = probs.cumsum(dim=-1)
    return bool(abs(draw.u * cdf[-1] - cdf[lo]) < FLIP_CDF_GAP * cdf[-1])


def _cut_near_tie(draw: Draw) -> bool:
    """Would a last-bit change of the logits change which tokens the row's top-k or top-p keep?
    Top-k: its k-th and (k+1)-th logits within FLIP_CUT_GAP. Top-p: the mass before some token
    (over what top-k kept, most likely first) within FLIP_CUT_GAP of top_p."""
    return any(gap is not None and gap < FLIP_CUT_GAP
               for gap in (top_k_gap(draw.logits, draw.params), top_p_margin(draw.logits, draw.params)))


def _lp_equal(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return (abs(a[0] - b[0]) <= 1e-4 and [t for t, _ in a[1]] == [t for t, _ in b[1]]
            and all(abs(x - y) <= 1e-4 for (_, x), (_, y) in zip(a[1], b[1])))


def _check(case: Case, solo, draws: DrawLog, stats) -> list:
    bad = []
    for i, (job, seq, sources, events) in enumerate(case.runs):
        stats["combinations"] += isinstance(job.adapter, tuple)
        finals = [e for e in events if e.finish_reason is not None]
        if len(finals) != 1 or events[-1] is not finals[0]:
            bad.append((i, "final events", [e.finish_reason for e in events]))
            continue
        stats[seq.finish_reason] += 1
        stats["preempted"] += seq.preemptions > 0
        if job.poisoned:
            if not (seq.finish_reason is FinishReason.ABORT
                    or (seq.finish_reason is FinishReason.ERROR and finals[0].code is ErrorCode.GENERATION_FAILED)):
                bad.append((i, "a poisoned request did not fail", seq.finish_reason, finals[0].code))
            stats["poisoned, failed alone"] += seq.finish_reason is FinishReason.ERROR
            continue
        tokens = [e for e in events if e.token_id is not None]
        got = [e.token_id for e in tokens]
        if seq.finish_reason is FinishReason.ERROR or got != seq.output_ids:
            bad.append((i, "error or event ids", events[-1].error))
            continue
        ref_events, solo_draws = _alone(solo, case.adapters, sources, job, draws)
        ref = [e for e in ref_events if e.token_id is not None]
        want = [e.token_id for e in ref]
        k = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), None)
        if k is not None and k < len(solo_draws) and _last_bit_flip(solo_draws[k], want[k], got[k]):
            stats["last-bit flips"] += 1  # the batch's logits differ in the last bit: not a bug
            continue
        if seq.finish_reason is FinishReason.ABORT:
            ref, want = ref[:len(got)], want[:len(got)]
        elif (seq.finish_reason, "".join(e.text for e in events)) != (ref_events[-1].finish_reason,
                                                                       "".join(e.text for e in ref_events)):
            bad.append((i, "finish reason or text", sources, seq.finish_reason, ref_events[-1].finish_reason))
        if got != want:
            bad.append((i, "tokens", sources, job.params, got, want))
        elif not all(_lp_equal(a.logprobs, b.logprobs) for a, b in zip(tokens, ref)):
            bad.append((i, "logprobs", sources))
        stats["logprobs compared"] += sum(a.logprobs is not None for a in tokens)
    return bad


def test_random_workloads_equal_solo_runs(tmp_path, adapters, monkeypatch):
    names = list(adapters)
    nbytes = {}

    def block_nbytes(block):
        if block not in nbytes:
            nbytes[block] = _serving(tmp_path / f"probe{block}", adapters, kv_block_size=block).engine.cache.block_nbytes
        return nbytes[block]

    solo = _serving(tmp_path / "solo", adapters, max_batch_size=2, max_num_batched_tokens=128)
    draws = DrawLog(monkeypatch)
    stats: collections.Counter = collections.Counter()
    failures = []
    for seed in SEEDS:
        cfg, jobs = _draw_case(seed, names, block_nbytes)
        serving = _serving(tmp_path / f"case{seed}", adapters, **cfg)
        case = Case(seed, serving, adapters, jobs, stats)
        case.run()
        bad = _check(case, solo, draws, stats)
        engine, runtime = serving.engine, serving.runtime
        cached = sum(len(p.blocks) for p in runtime.prefixes.prefixes.values())
        if engine.cache.pool.num_free + cached != engine.cache.pool.capacity:
            bad.append(("KV blocks not returned", engine.cache.pool.num_free, cached, engine.cache.pool.capacity))
        if any(runtime.slots.pins.values()) or engine.scheduler.running or engine.scheduler.waiting:
            bad.append(("left behind", runtime.slots.pins, len(engine.scheduler.running), len(engine.scheduler.waiting)))
        stats["evictions"] += runtime.stats["evictions"]
        stats["merges"] += runtime.merger.cycles
        stats["fixed-shape steps"] += engine.runner.static_steps
        if bad:
            failures.append((seed, cfg, bad[:3]))
    print("random workloads:", {str(k): v for k, v in stats.items()})  # shown with -s or on failure
    assert not failures, failures[:2]
    # guards: the cases did exercise what the docstring claims
    for what in (FinishReason.LENGTH, FinishReason.EOS, FinishReason.STOP, FinishReason.ABORT, "preempted",
                 "evictions", "merges", "fixed-shape steps", "dropped while running", "logprobs compared",
                 "combinations", "combination member dropped while running", "poisoned, failed alone"):
        assert stats[what] > 0, (what, stats)


def test_a_last_bit_flip_is_told_from_a_wrong_draw():
    """`_last_bit_flip` accepts only what a last-bit change explains (or the exception above
    would hide bugs): greedy ties within the gap, a draw at the boundary of adjacent tokens."""
    logits = torch.tensor([0.0, 2.0, 2.0 - 1e-6, 1.0, -5.0])
    greedy = SamplingParams(max_new_tokens=1)
    assert _last_bit_flip(Draw(logits, greedy, None), 1, 2)
    assert not _last_bit_flip(Draw(logits, greedy, None), 1, 3)
    sampled = SamplingParams(max_new_tokens=1, temperature=1.0, seed=0)
    probs = torch.softmax(logits, dim=-1).double()
    cdf = probs.cumsum(dim=-1)
    at = float(cdf[1])  # the boundary between tokens 1 and 2
    assert _last_bit_flip(Draw(logits, sampled, at - 1e-7), 1, 2)
    assert _last_bit_flip(Draw(logits, sampled, at + 1e-7), 2, 1)
    assert not _last_bit_flip(Draw(logits, sampled, at - 1e-3), 1, 2)  # far from the boundary
    assert not _last_bit_flip(Draw(logits, sampled, float(cdf[0]) + 1e-8), 1, 3)  # not adjacent
    top2 = SamplingParams(max_new_tokens=1, temperature=1.0, seed=0, top_k=2)  # token 3 filtered out
    kept = torch.softmax(torch.tensor([float("-inf"), 2.0, 2.0 - 1e-6, float("-inf"), float("-inf")]), -1).double()
    assert not _last_bit_flip(Draw(logits, top2, float(kept.cumsum(-1)[2]) - 1e-8), 2, 3)
    # a near-tie at the cut: top-1 keeps token 1 or token 2 by 1e-6, so any other draw is explained
    top1 = SamplingParams(max_new_tokens=1, temperature=1.0, seed=0, top_k=1)
    assert _last_bit_flip(Draw(logits, top1, 0.5), 1, 2)
    assert not _last_bit_flip(Draw(logits, SamplingParams(max_new_tokens=1, temperature=1.0, seed=0, top_k=3),
                                   0.5), 1, 4)  # 3rd and 4th logits 1.0 apart: no near-tie
    # top-p: the mass before token 3 (sorted: 1, 2, 3) is p1 + p2; a top_p that close is a near-tie
    near = float(probs[1] + probs[2])
    assert _last_bit_flip(Draw(logits, replace(sampled, top_p=near + 1e-7), 0.2), 1, 0)
    assert not _last_bit_flip(Draw(logits, replace(sampled, top_p=near + 1e-3), 0.2), 1, 0)
