"""LoRA parity with PEFT (the oracle): greedy tokens of our engine equal PeftModel.generate,
for each adapter alone AND for all adapters + base rows mixed in one continuous batch."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from peftserve.adapters.lora_ops import LoraSlotWeights, lora_add_segmented_, lora_delta_reference
from peftserve.server.engine.config import EngineConfig
from peftserve.server.build import build_engine
from peftserve.server.engine.request import SamplingParams
from tests.tiny import tiny_llama

NEW = 12

LORAS = {
    "r4-qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "r16-rslora": dict(r=16, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "r8-mlp": dict(r=8, lora_alpha=32, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "r2-all": dict(r=2, lora_alpha=4, target_modules="all-linear"),
    "pattern": dict(r=4, lora_alpha=4, target_modules=["q_proj", "down_proj"], rank_pattern={"down_proj": 12},
                    alpha_pattern={"q_proj": 2.0}),
    "layer1": dict(r=6, lora_alpha=3, target_modules=["o_proj", "up_proj"], layers_to_transform=[1]),
}


class StubTokenizer:
    eos_token_id = None

    def decode(self, ids, **kwargs):
        return "".join(chr(65 + i % 26) for i in ids)


def _prompts(n=6, seed=3):
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 4, 9, 17, 30, 47][:n]
    return [torch.randint(0, 256, (L,), generator=g).tolist() for L in lengths]


@pytest.fixture(scope="module")
def lora_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    dirs = {}
    for i, (name, kw) in enumerate(LORAS.items()):
        base = tiny_llama(0)  # seeds torch itself: seed each adapter after building its base
        torch.manual_seed(100 + i)
        peft_model = get_peft_model(base, LoraConfig(init_lora_weights=False, **kw))
        peft_model.save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


@pytest.fixture(scope="module")
def reference(lora_dirs):
    """(adapter name | None, prompt index) -> PEFT greedy continuation."""
    prompts = _prompts()
    names = list(lora_dirs)
    model = PeftModel.from_pretrained(tiny_llama(0), lora_dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(lora_dirs[name], adapter_name=name)
    # Compare full-length continuations: no EOS in the oracle (min_new_tokens would instead
    # *suppress* EOS logits, which the engine with ignore_eos rightly does not do).
    model.generation_config.eos_token_id = None
    out = {}
    for name in names:
        model.set_adapter(name)
        for i, p in enumerate(prompts):
            gen = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), max_new_tokens=NEW, do_sample=False)
            out[name, i] = gen[0, len(p):].tolist()
    with model.disable_adapter():
        for i, p in enumerate(prompts):
            gen = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), max_new_tokens=NEW, do_sample=False)
            out[None, i] = gen[0, len(p):].tolist()
    return out


def _serving(tmp_path, lora_dirs, slots=8, batch=32, **config):
    cfg = EngineConfig(max_batch_size=batch, max_model_len=128, max_num_batched_tokens=64, max_adapters_per_batch=slots,
                       **config)
    serving = build_engine(tiny_llama(0), StubTokenizer(), cfg, store=tmp_path / "store")
    for name, d in lora_dirs.items():
        serving.registry.import_dir(d, name)
    return serving


def _run(serving, jobs):
    """jobs: [(adapter name | None, prompt index)] -> generated ids, all in one continuous batch."""
    prompts = _prompts()
    handles = [serving.registry.resolve(a) if a else None for a, _ in jobs]
    seqs = serving.engine.generate([prompts[i] for _, i in jobs], SamplingParams(max_new_tokens=NEW, ignore_eos=True),
                                   adapters=handles)
    return [s.output_ids for s in seqs]


def test_each_lora_alone_matches_peft(tmp_path, lora_dirs, reference):
    serving = _serving(tmp_path, lora_dirs)
    for name in list(lora_dirs) + [None]:
        for i in range(len(_prompts())):
            assert _run(serving, [(name, i)])[0] == reference[name, i], (name, i)


def test_mixed_batch_matches_peft(tmp_path, lora_dirs, reference):
    serving = _serving(tmp_path, lora_dirs)
    jobs = [(name, i) for name in list(lora_dirs) + [None] for i in range(len(_prompts()))]
    jobs = jobs[::2] + jobs[1::2]  # interleave adapters so segments really get regrouped
    outs = _run(serving, jobs)
    for job, out in zip(jobs, outs):
        assert out == reference[job], job


def test_more_adapters_than_slots_wait_and_still_match(tmp_path, lora_dirs, reference):
    serving = _serving(tmp_path, lora_dirs, slots=2)
    jobs = [(name, i) for name in lora_dirs for i in (0, 3)]
    outs = _run(serving, jobs)
    for job, out in zip(jobs, outs):
        assert out == reference[job], job
    assert serving.runtime.stats["evictions"] > 0
    assert serving.runtime.resident <= 2


def test_a_device_byte_budget_evicts_and_waits_and_still_matches(tmp_path, lora_dirs, reference):
    """--max-adapter-bytes smaller than the adapters together (8 slots, room for about two):
    LRU idle adapters are evicted for bytes, requests wait while running ones hold the room,
    every output still equals PEFT's, and the reserved bytes are exactly what the installed
    entries take (the budget counts real bytes, not a guess)."""
    probe = _serving(tmp_path / "probe", lora_dirs)
    runtime = probe.runtime
    need = {name: runtime.kinds[v.kind].device_nbytes(v, torch.float32)
            for name in lora_dirs for v in [probe.registry.resolve(name)]}
    budget = sum(sorted(need.values())[-2:])
    assert budget < sum(need.values())  # guard: the adapters do not all fit
    serving = _serving(tmp_path, lora_dirs, max_adapter_bytes=budget)
    runtime = serving.runtime
    seen = []
    activate = runtime.activate

    def checked(admitted, runner):
        out = activate(admitted, runner)
        seen.append((runtime.slots.resident_bytes, runtime.device_bytes()))
        return out

    runtime.activate = checked
    jobs = [(name, i) for name in lora_dirs for i in (0, 3)]
    for job, out in zip(jobs, _run(serving, jobs)):
        assert out == reference[job], job
    assert runtime.stats["evictions"] > 0
    assert seen and all(reserved <= budget and installed == reserved for reserved, installed in seen), seen


def test_room_for_picks_lru_victims_waits_on_pins_and_lets_a_lone_giant_in():
    from peftserve.server.runtime.slots import DeviceSlots

    slots = DeviceSlots(4, max_bytes=100)
    for slot, (key, n) in enumerate([("a", 40), ("b", 30), ("c", 20)], start=1):
        slots.assign(slot, key, n)
        slots.pin(slot)
        slots.unpin(slot)  # idle, in LRU order a, b, c
    assert slots.room_for(10) == []  # 90 + 10 fits
    assert slots.room_for(50) == [1]  # evict a (oldest): 50 + 50
    assert slots.room_for(85) == [1, 2, 3]  # everything idle goes
    slots.pin(1)  # a now runs
    assert slots.room_for(61) is None  # a's 40 cannot be evicted: wait
    assert slots.room_for(60) == [2, 3]
    lone = DeviceSlots(2, max_bytes=100)
    assert lone.room_for(500) == []  # larger than the budget, nothing resident: it runs alone
    lone.assign(1, "x", 500)
    lone.pin(1)
    assert lone.room_for(1) is None


def test_segmented_op_matches_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 16, generator=g)
    weights = {1: LoraSlotWeights(torch.randn(4, 16, generator=g), torch.randn(8, 4, generator=g), 0.5),
               3: LoraSlotWeights(torch.randn(2, 16, generator=g), torch.randn(8, 2, generator=g), 2.0)}
    token_slots = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 0, 1])
    segments = [(1, 2, 5), (2, 5, 6), (3, 6, 8), (1, 9, 10)]
    fast = lora_add_segmented_(torch.zeros(10, 8), x, segments, weights)
    torch.testing.assert_close(fast, lora_delta_reference(x, token_slots, weights))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("segments", [[(1, 0, 6)], [(1, 0, 2), (3, 2, 5)], [(3, 1, 6)]],
                         ids=["every-row", "two", "inner"])
def test_segmented_op_is_pefts_arithmetic_bit_for_bit(dtype, segments):
    """PEFT's order of operations, rounding for rounding: the delta in float32 scaled on its own,
    added to the base output promoted to float32, cast back once. The segment covering every
    row (a lone request's prefill) takes the no-slicing path; it must not change a bit."""
    g = torch.Generator().manual_seed(2)
    # scales that round (a power of two would hide where the scaling happens)
    weights = {1: LoraSlotWeights(torch.randn(4, 16, generator=g), torch.randn(8, 4, generator=g), 0.3),
               3: LoraSlotWeights(torch.randn(2, 16, generator=g), torch.randn(8, 2, generator=g), 1.7)}
    x = torch.randn(6, 16, generator=g).to(dtype)
    base = torch.randn(6, 8, generator=g).to(dtype)
    want = base.clone()
    for slot, s, e in segments:
        w = weights[slot]
        delta = (x[s:e].float() @ w.At) @ w.Bt * w.scale
        want[s:e] = (want[s:e].float() + delta).to(dtype)
    got = lora_add_segmented_(base.clone(), x, segments, weights)
    assert torch.equal(got, want)
    assert not torch.equal(got, base)  # guard: the op added something


def test_weighted_combination_equals_peft_cat(tmp_path, lora_dirs):
    names, weights = ["r4-qv", "r16-rslora", "r8-mlp"], [0.7, 0.3, -0.5]
    model = PeftModel.from_pretrained(tiny_llama(0), lora_dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(lora_dirs[name], adapter_name=name)
    model.add_weighted_adapter(names, weights, "mix", combination_type="cat")
    model.set_adapter("mix")
    model.generation_config.eos_token_id = None
    serving = _serving(tmp_path, lora_dirs)
    spec = [{"name": n, "weight": w} for n, w in zip(names, weights)]
    mix = serving.registry.resolve(spec)
    assert serving.registry.resolve(spec) is mix  # cached by (names, versions, weights)
    prompts = _prompts()
    seqs = serving.engine.generate(prompts, SamplingParams(max_new_tokens=NEW, ignore_eos=True), adapters=[mix] * len(prompts))
    for p, s in zip(prompts, seqs):
        ref = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=NEW, do_sample=False)[0, len(p):].tolist()
        assert s.output_ids == ref
    # the byte budget's reservation is what the install really takes: a combination's A and B
    # are plain [r, in] / [out, r] (their transposes are copies), a loaded LoRA's are views of them
    runtime = serving.runtime
    for ver in (mix, serving.registry.resolve(names[0])):
        kind = runtime.kinds[ver.kind]
        entries = kind.to_device(ver, torch.float32, torch.device("cpu")).values()
        assert kind.device_nbytes(ver, torch.float32) == sum(w.nbytes for w in entries) > 0
    assert kind.device_nbytes(mix, torch.float32) == 2 * mix.loaded.nbytes  # guard: both layouts seen
    assert kind.device_nbytes(ver, torch.float32) == ver.loaded.nbytes


def test_adaptive_merge_equals_unmerged_path(tmp_path, lora_dirs, reference):
    from dataclasses import replace

    serving = _serving(tmp_path, lora_dirs)
    cfg = replace(serving.engine.config, merge_policy="single-adapter", merge_min_steps=1)
    merged = build_engine(tiny_llama(0), StubTokenizer(), cfg, store=tmp_path / "store2")
    for name, d in lora_dirs.items():
        merged.registry.import_dir(d, name)
    # single-adapter batches get merged ...
    for i in range(len(_prompts())):
        assert _run(merged, [("r2-all", i)])[0] == reference["r2-all", i]
    assert merged.runtime.merger.cycles > 0
    # ... and a mixed batch afterwards unmerges exactly
    jobs = [("r2-all", 0), (None, 1), ("r8-mlp", 2)]
    for job, out in zip(jobs, _run(merged, jobs)):
        assert out == reference[job], job


def test_merge_unmerge_cycles_do_not_drift(tmp_path, lora_dirs):
    from peftserve.server.engine.step_state import AdapterBatch

    serving = _serving(tmp_path, lora_dirs)
    runtime = serving.runtime
    layers = runtime.layers
    runtime.merger.policy = type(runtime.merger.policy)("single-adapter")
    runtime.merger.min_steps = 1
    serving.engine.generate([_prompts()[0]], SamplingParams(max_new_tokens=1), adapters=[serving.registry.resolve("r2-all")])
    slot = runtime.slots.key_slot[serving.registry.resolve("r2-all").key]
    single = AdapterBatch.build([slot], [3], torch.device("cpu"))
    mixed = AdapterBatch.build([0, slot], [1, 2], torch.device("cpu"))
    runtime.prepare(mixed)  # the generate above left it merged: start from the base weights
    before = {p: lin.base.weight.clone() for p, lin in layers.linears.items()}
    for _ in range(1000):
        runtime.prepare(single)
        assert runtime.merger.merged_slot == slot
        runtime.prepare(mixed)
        assert runtime.merger.merged_slot == 0
    for p, lin in layers.linears.items():
        assert torch.equal(lin.base.weight, before[p]), p


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_op_matches_reference(dtype):
    from peftserve.adapters.lora_ops import lora_add_grouped_

    g = torch.Generator().manual_seed(1)
    ranks = {1: 4, 2: 8, 3: 4, 4: 16, 5: 8, 6: 4}
    weights = {s: LoraSlotWeights(torch.randn(r, 16, generator=g), torch.randn(8, r, generator=g), 0.25 * s)
               for s, r in ranks.items()}
    lengths = [3, 1, 1, 5, 1, 2, 1, 4]  # prefill chunks and decode tokens mixed
    slots = [0, 1, 2, 3, 4, 5, 6, 1]
    segments, start = [], 0
    for slot, n in zip(slots, lengths):
        if slot:
            segments.append((slot, start, start + n))
        start += n
    x = torch.randn(start, 16, generator=g).to(dtype)
    token_slots = torch.repeat_interleave(torch.tensor(slots), torch.tensor(lengths))
    base = torch.randn(start, 8, generator=g).to(dtype)
    stacks, plans = {}, {}
    for _ in range(2):  # second pass runs from the caches
        got = lora_add_grouped_(base.clone(), x, segments, weights, stacks, plans)
        want = (base.float() + lora_delta_reference(x, token_slots, weights)).to(dtype)
        torch.testing.assert_close(got, want, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)
    assert stacks and plans
