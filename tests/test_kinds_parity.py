"""Every adapter kind against its oracle, alone and all kinds mixed in one continuous batch.

Oracles (tests/oracle.py): PEFT's no-cache `PeftModel.forward` loop for prompt tuning (random +
text init), P-tuning (MLP, LSTM) and prefix tuning (with/without projection); `PeftModel.generate`
for (IA)3 and LoRA; our plain-torch reference forward (`attach_bottleneck`) for bottleneck
adapters, which PEFT lacks. That PEFT's generate agrees with the forward loop for the
prompt-learning kinds is tests/test_oracle_plumbing.py's job.
"""

from __future__ import annotations

import pytest
import torch
from peft import (IA3Config, LoraConfig, PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig,
                  get_peft_model)

from peftserve.adapters.bottleneck import BottleneckConfig, attach_bottleneck, init_bottleneck, read_bottleneck, save_bottleneck
from peftserve.server.engine.config import EngineConfig
from peftserve.server.build import build_engine
from peftserve.server.engine.request import SamplingParams
from tests.oracle import generate_oracle, oracle
from tests.test_lora_parity import StubTokenizer
from tests.tiny import tiny_llama

NEW = 10
VOCAB = 512


def base():
    return tiny_llama(0, vocab_size=VOCAB)


def _prompts():
    g = torch.Generator().manual_seed(11)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (1, 5, 13, 26)]


def _randomise(model, seed):
    """PEFT initialises some kinds to identity; make every trainable tensor matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                if "ia3" in name:
                    p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
                elif "embedding" in name or "prompt" in name:
                    p.copy_(torch.randn(p.shape, generator=g))


PEFT_KINDS = {
    "prompt-random": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
    "p-tuning-mlp": lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=32,
                                                encoder_reparameterization_type="MLP"),
    "p-tuning-lstm": lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=16,
                                                 encoder_reparameterization_type="LSTM"),
    "prefix": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6),
    "prefix-proj": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True,
                                              encoder_hidden_size=32),
    "ia3": lambda: IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                             feedforward_modules=["down_proj"]),
    "lora": lambda: LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, init_lora_weights=False,
                               target_modules=["q_proj", "v_proj", "up_proj"]),
}
BOTTLENECKS = {
    "bn-houlsby": dict(placement="houlsby", bottleneck_size=8, non_linearity="relu", scaling=1.0),
    "bn-pfeiffer": dict(placement="pfeiffer", reduction_factor=4, non_linearity="gelu", scaling=0.5),
    "bn-parallel": dict(placement="parallel", bottleneck_size=16, non_linearity="silu", scaling=2.0),
}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """name -> (adapter dir, {prompt index: oracle continuation})."""
    root = tmp_path_factory.mktemp("kinds")
    prompts = _prompts()
    out = {}
    for i, (name, make_cfg) in enumerate(PEFT_KINDS.items()):
        model = base()  # seeds torch itself: seed each adapter after building its base
        torch.manual_seed(200 + i)
        pm = get_peft_model(model, make_cfg())
        _randomise(pm, 300 + i)
        pm.save_pretrained(root / name)
        ref = PeftModel.from_pretrained(base(), root / name).eval()
        ref.generation_config.eos_token_id = None
        out[name] = (root / name, {j: oracle(ref, p, NEW) for j, p in enumerate(prompts)})
    for i, (name, kw) in enumerate(BOTTLENECKS.items()):
        model = base()
        cfg = BottleneckConfig.from_dict({"peft_type": "BOTTLENECK", **kw})
        weights = init_bottleneck(cfg, model, seed=400 + i, random_up=True) if _accepts_random_up() else \
            init_bottleneck(cfg, model, seed=400 + i)
        save_bottleneck(root / name, cfg, weights)
        cfg2, w2 = read_bottleneck(root / name, model)
        attach_bottleneck(model, cfg2, w2)
        model.generation_config.eos_token_id = None
        out[name] = (root / name, {j: generate_oracle(model, p, NEW) for j, p in enumerate(prompts)})
    model = base()
    model.generation_config.eos_token_id = None
    out[None] = (None, {j: generate_oracle(model, p, NEW) for j, p in enumerate(prompts)})
    return out


def _accepts_random_up() -> bool:
    import inspect

    return "random_up" in inspect.signature(init_bottleneck).parameters


def _serving(tmp_path, artifacts, slots=8, **kv):
    cfg = EngineConfig(max_batch_size=48, max_model_len=96, max_num_batched_tokens=64, max_adapters_per_batch=slots,
                       **kv)
    serving = build_engine(base(), StubTokenizer(), cfg, store=tmp_path / "store")
    for name, (d, _) in artifacts.items():
        if name is not None:
            serving.registry.import_dir(d, name)
    return serving


def _run(serving, jobs):
    prompts = _prompts()
    handles = [serving.registry.resolve(a) if a else None for a, _ in jobs]
    seqs = serving.engine.generate([prompts[i] for _, i in jobs], SamplingParams(max_new_tokens=NEW, ignore_eos=True),
                                   adapters=handles)
    return [s.output_ids for s in seqs]


def test_every_adapter_changes_the_output(artifacts):
    base_out = artifacts[None][1]
    for name in list(PEFT_KINDS) + list(BOTTLENECKS):
        assert artifacts[name][1] != base_out, f"{name}: adapter had no effect, test would be vacuous"


@pytest.mark.parametrize("name", list(PEFT_KINDS) + list(BOTTLENECKS))
def test_kind_alone_matches_oracle(tmp_path, artifacts, name):
    serving = _serving(tmp_path, artifacts)
    ref = artifacts[name][1]
    for i in ref:
        assert _run(serving, [(name, i)])[0] == ref[i], (name, i)


def test_every_kind_in_one_mixed_batch(tmp_path, artifacts):
    serving = _serving(tmp_path, artifacts)
    names = list(artifacts)
    jobs = [(n, i) for i in range(len(_prompts())) for n in names]  # interleaved kinds
    outs = _run(serving, jobs)
    for job, out in zip(jobs, outs):
        assert out == artifacts[job[0]][1][job[1]], job
    # soft prompts / prefixes were computed once per adapter version and then shared
    assert serving.runtime.stats["prefix_computes"] == 5
    # the device byte budget reserves what each weight kind's installed entries really take
    runtime = serving.runtime
    assert runtime.resident >= 3 and runtime.slots.resident_bytes == runtime.device_bytes()


def test_every_kind_mixed_under_kv_pressure_shares_prefixes_and_still_matches(tmp_path, artifacts):
    """A pool far smaller than the batch: admission waits, running sequences are preempted and
    recompute, idle prefixes are reclaimed; 4-token blocks put every prefix's tail in a partial
    block. Tokens stay the oracle's, and sequences of one prompt adapter share its prefix blocks."""
    from peftserve.server.engine.request import Sequence, SeqStatus

    probe = _serving(tmp_path / "probe", artifacts, kv_block_size=4)
    block_bytes = probe.engine.cache.block_nbytes
    serving = _serving(tmp_path, artifacts, kv_block_size=4, kv_cache_bytes=40 * block_bytes)
    engine = serving.engine
    assert engine.cache.pool.capacity == 40
    names = list(artifacts)
    jobs = [(n, i) for i in range(len(_prompts())) for n in names]
    prompts = _prompts()
    seqs = [Sequence(prompts[i], SamplingParams(max_new_tokens=NEW, ignore_eos=True), on_event=lambda ev: None,
                     adapter=serving.registry.resolve(n) if n else None) for n, i in jobs]
    for seq in seqs:
        engine.add(seq)
    shared_seen = False
    while engine.has_work():
        engine.step()
        by_key: dict[str, list] = {}
        for seq in engine.scheduler.running:
            if seq.kv_prefix_blocks:
                by_key.setdefault(seq.adapter.key, []).append(seq.kv_prefix_blocks)
        for tables in by_key.values():
            assert all(t == tables[0] for t in tables)  # one copy of the prefix, referenced by all
            shared_seen |= len(tables) > 1
    assert all(seq.status is SeqStatus.FINISHED for seq in seqs)
    for (name, i), seq in zip(jobs, seqs):
        assert seq.output_ids == artifacts[name][1][i], (name, i, seq.preemptions)
    assert shared_seen and engine.preemptions > 0  # or the test did not exercise what it claims
    assert engine.cache.pool.num_free + sum(len(p.blocks) for p in serving.runtime.prefixes.prefixes.values()) \
        == engine.cache.pool.capacity  # every sequence block came back


@pytest.mark.parametrize("max_bottleneck_size", [256, 4])
def test_fixed_shape_decode_steps_match_every_oracle(tmp_path, artifacts, max_bottleneck_size, monkeypatch):
    """decode_mode="static": decode-only steps run on the fixed buffers a CUDA graph replays
    (static_decode.py) — LoRA, (IA)3 and bottleneck adapters gathered per token from fixed stacks,
    soft prompts and prefixes read through the block table (4-token blocks: multi-block tables,
    partial prefix tails). With a bottleneck size limit below these adapters' (8-16), their rows
    make every step fall back to the dynamic path. Every kind's tokens stay the oracle's either way."""
    from tests.test_static_decode import check_every_fill

    serving = _serving(tmp_path, artifacts, kv_block_size=4, decode_mode="static",
                       max_bottleneck_size=max_bottleneck_size)
    fills = check_every_fill(monkeypatch, serving.engine.runner.static)  # persistent vs fresh, every step
    jobs = [(n, i) for i in range(len(_prompts())) for n in artifacts]
    outs = _run(serving, jobs)
    for job, out in zip(jobs, outs):
        assert out == artifacts[job[0]][1][job[1]], job
    assert not [k for k in fills if k.startswith("mismatch")], fills
    runner = serving.engine.runner
    if max_bottleneck_size == 4:  # bottleneck rows decode to the end in every step: no step is fixed-shape
        assert runner.static_steps == 0
    else:  # the last NEW - 1 tokens of the batch are decode-only steps: all of them fixed-shape
        assert runner.static_steps >= NEW - 2, runner.static_steps


def test_prompt_tuning_text_init_matches_peft(tmp_path):
    """TEXT init needs a real tokenizer: the default model's (local dir), on a base with its vocab."""
    from peftserve.adapters.base_model import resolve_model_dir

    tok_dir = str(resolve_model_dir("default"))
    big = lambda: tiny_llama(0, vocab_size=49152)  # noqa: E731
    cfg = PromptTuningConfig(task_type="CAUSAL_LM", prompt_tuning_init="TEXT", num_virtual_tokens=6,
                             prompt_tuning_init_text="Classify the sentiment:", tokenizer_name_or_path=tok_dir)
    get_peft_model(big(), cfg).save_pretrained(tmp_path / "text")
    ref = PeftModel.from_pretrained(big(), tmp_path / "text").eval()
    ref.generation_config.eos_token_id = None
    serving = build_engine(big(), StubTokenizer(), EngineConfig(max_batch_size=4, max_model_len=64),
                            store=tmp_path / "store")
    serving.registry.import_dir(tmp_path / "text", "text")
    for p in _prompts():
        got = serving.engine.generate([p], SamplingParams(max_new_tokens=NEW, ignore_eos=True),
                                      adapters=[serving.registry.resolve("text")])[0].output_ids
        assert got == oracle(ref, p, NEW)
