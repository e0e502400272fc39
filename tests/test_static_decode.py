"""Fixed-shape decode steps (server/engine/static_decode.py) against the dynamic step and PEFT.

The fixed path is what a CUDA graph replays; on CPU it runs the same code eagerly
(`decode_mode="static"`). Its tokens must be the dynamic path's — greedy and seeded sampling,
padded batch buckets, LoRAs gathered from fixed stacks, slots reused by other adapters — and a
step it cannot serve (a LoRA above `max_lora_rank`) or that fails on it runs dynamically.
"""

from __future__ import annotations

import pytest
import torch

from peftserve.server.build import build_engine
from peftserve.server.engine.config import EngineConfig
from peftserve.server.engine.request import SamplingParams
from peftserve.server.engine.static_decode import DecodeMode, bucket_for, buckets, resolve_mode
from tests.test_lora_parity import NEW, StubTokenizer, _prompts, lora_dirs, reference  # noqa: F401  (fixtures)
from tests.tiny import tiny_llama

SMALL = ["r4-qv", "r8-mlp", "r2-all", "layer1"]  # ranks <= 8: all in the stacks at max_lora_rank=8


def _serving(tmp_path, lora_dirs, mode: str, slots=8, device="cpu", **kw):  # noqa: F811
    cfg = EngineConfig(max_batch_size=16, max_model_len=128, max_num_batched_tokens=64, max_adapters_per_batch=slots,
                       kv_block_size=8, decode_mode=mode, max_lora_rank=8, device=device, **kw)
    serving = build_engine(tiny_llama(0).to(device), StubTokenizer(), cfg, store=tmp_path / f"store-{mode}")
    for name, d in lora_dirs.items():
        serving.registry.import_dir(d, name)
    return serving


def _jobs():
    """(adapter | None, prompt index, sampling params): greedy and seeded sampled rows, 13 in all
    (a padded bucket of 16 while all run, smaller odd sizes as they finish)."""
    names = SMALL + [None]
    jobs = []
    for k in range(13):
        sampled = k % 3 == 1
        params = SamplingParams(max_new_tokens=NEW - (k % 4), ignore_eos=True, temperature=0.9 if sampled else 0.0,
                                top_p=0.9 if sampled else 1.0, seed=1000 + k if sampled else None)
        jobs.append((names[k % len(names)], k % 6, params))
    return jobs


def _run(serving, jobs):
    prompts = _prompts()
    handles = [serving.registry.resolve(a) if a else None for a, _, _ in jobs]
    seqs = serving.engine.generate([prompts[i] for _, i, _ in jobs], [p for _, _, p in jobs], adapters=handles)
    return [s.output_ids for s in seqs]


def test_fixed_shape_steps_give_the_dynamic_steps_tokens(tmp_path, lora_dirs, reference):  # noqa: F811
    jobs = _jobs()
    dynamic = _serving(tmp_path, lora_dirs, "dynamic")
    static = _serving(tmp_path, lora_dirs, "static")
    want, got = _run(dynamic, jobs), _run(static, jobs)
    assert got == want
    assert dynamic.engine.runner.static is None and dynamic.engine.runner.static_steps == 0
    assert static.engine.runner.static_steps >= NEW - 4  # the decode-only steps ran fixed-shape
    for (name, i, params), out in zip(jobs, got):  # and the greedy rows are PEFT's tokens
        if params.greedy:
            assert out == reference[name, i][:params.max_new_tokens], (name, i)


def test_slots_reused_by_other_adapters_rewrite_their_stacks(tmp_path, lora_dirs, reference):  # noqa: F811
    """2 slots for 4 adapters: adapters wait, evict and install into slots another adapter used;
    the stacks (what a graph reads) must hold the new owner, with no stale rank columns."""
    serving = _serving(tmp_path, lora_dirs, "static", slots=2)
    jobs = [(name, i, SamplingParams(max_new_tokens=NEW, ignore_eos=True)) for i in (0, 3) for name in SMALL]
    for (name, i, _), out in zip(jobs, _run(serving, jobs)):
        assert out == reference[name, i], (name, i)
    assert serving.runtime.stats["evictions"] >= 2 and serving.engine.runner.static_steps > 0


def test_a_lora_above_the_stacks_rank_runs_dynamic_steps_and_matches_peft(tmp_path, lora_dirs, reference):  # noqa: F811
    serving = _serving(tmp_path, lora_dirs, "static")
    jobs = [(name, 2, SamplingParams(max_new_tokens=NEW, ignore_eos=True)) for name in ("r16-rslora", "pattern", "r4-qv")]
    for (name, i, _), out in zip(jobs, _run(serving, jobs)):
        assert out == reference[name, i], name
    runtime = serving.runtime
    big = runtime.slots.key_slot[serving.registry.resolve("r16-rslora").key]
    small = runtime.slots.key_slot[serving.registry.resolve("r4-qv").key]
    assert not runtime.gather_ready({0, big}) and runtime.gather_ready({0, small})
    assert serving.engine.runner.static_steps == 0  # every decode step had a rank-16/12 row


def test_a_failing_fixed_step_reruns_dynamically(tmp_path, lora_dirs, reference, monkeypatch):  # noqa: F811
    serving = _serving(tmp_path, lora_dirs, "static")
    static = serving.engine.runner.static

    def broken(plan):
        raise RuntimeError("injected fault in the fixed-shape step")

    monkeypatch.setattr(static, "run", broken)
    jobs = [(name, 1, SamplingParams(max_new_tokens=NEW, ignore_eos=True)) for name in ("r4-qv", None)]
    for (name, i, _), out in zip(jobs, _run(serving, jobs)):
        assert out == reference[name, i]
    runner = serving.engine.runner
    assert runner.static_steps == 0
    assert runner.static is None  # failing every time: switched off after MAX_STATIC_FAILURES, not retried forever


def test_modes_and_buckets():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_mode("auto", cpu) is DecodeMode.DYNAMIC and resolve_mode("auto", cuda) is DecodeMode.GRAPH
    assert resolve_mode("static", cpu) is DecodeMode.STATIC
    with pytest.raises(ValueError, match="CUDA"):
        resolve_mode("graph", cpu)
    with pytest.raises(ValueError):
        EngineConfig(decode_mode="fast")
    assert buckets(48) == [1, 2, 4, 8, 16, 32, 48] and buckets(1) == [1]
    assert bucket_for(5, buckets(48)) == 8 and bucket_for(33, buckets(48)) == 48


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_steps_give_the_eager_steps_tokens(tmp_path, lora_dirs):  # noqa: F811
    """Graph replay vs the dynamic eager step on the GPU: identical tokens, greedy and seeded."""
    jobs = _jobs()
    eager = _serving(tmp_path, lora_dirs, "dynamic", device="cuda")
    graph = _serving(tmp_path, lora_dirs, "graph", device="cuda")
    static = graph.engine.runner.static
    assert static.mode is DecodeMode.GRAPH
    assert len(static.graphs) == len(static.batch_buckets) * len(static.block_buckets)
    assert _run(graph, jobs) == _run(eager, jobs)
    assert graph.engine.runner.static_steps >= NEW - 4
    assert static.recaptures > 0  # the LoRAs' stacks made the start-up graphs stale: buckets recorded again
    assert _run(graph, jobs) == _run(eager, jobs)  # and replayed from those, with the adapters installed


def test_every_bucket_a_graph_would_capture_runs_on_padding_and_touches_only_the_null_block(tmp_path, lora_dirs):  # noqa: F811
    """What `capture` records, run eagerly for every (batch, blocks) bucket with LoRAs installed:
    the shapes hold for each bucket, the padding rows' logits are finite, and they write nowhere
    but the null block (a graph captured at start-up must not touch live KV)."""
    serving = _serving(tmp_path, lora_dirs, "static")
    _run(serving, [("r4-qv", 0, SamplingParams(max_new_tokens=2, ignore_eos=True))])  # install a LoRA first
    engine = serving.engine
    static, cache = engine.runner.static, engine.cache
    before = [t[1:].clone() for t in cache.k + cache.v]  # every block but the null block
    buckets_run = 0
    for b, nb in static.all_buckets():
        logits = static.run_padding(b, nb)
        assert logits.shape == (b, engine.model.vocab_size) and torch.isfinite(logits).all()
        buckets_run += 1
    assert buckets_run == len(static.batch_buckets) * len(static.block_buckets) > 10
    assert all(torch.equal(t[1:], old) for t, old in zip(cache.k + cache.v, before))


def test_stacks_exist_only_where_an_installed_adapter_reaches_and_growth_is_counted(tmp_path, lora_dirs):  # noqa: F811
    """Modules no adapter targets cost no stack and no gathered op; each growth bumps the
    generation that tells captured graphs they are stale (and nothing else does)."""
    serving = _serving(tmp_path, lora_dirs, "static")
    runtime = serving.runtime
    assert runtime.gather_generation == 0 and not any(lin.gathered for lin in runtime.layers.linears.values())
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)

    def stacked() -> set[str]:
        return {path.rsplit(".", 1)[-1] for path, lin in runtime.layers.linears.items() if lin.gathered}

    _run(serving, [("r4-qv", 0, params)])
    assert stacked() == {"q_proj", "v_proj"} and runtime.gather_generation == 1
    _run(serving, [("r4-qv", 1, params)])
    assert runtime.gather_generation == 1  # installed already: nothing new
    _run(serving, [("r8-mlp", 0, params)])
    assert stacked() == {"q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"} and runtime.gather_generation == 2
