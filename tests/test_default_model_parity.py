"""Parity on the real default model (SmolLM2-135M-Instruct, fp32): our engine's greedy tokens
equal transformers' `generate` for the base, PEFT's `PeftModel.generate` for LoRA and (IA)3, and
PEFT's no-cache forward loop for prompt tuning and prefix tuning (tests/oracle.py) — each alone, and all of them plus base rows in one batch.

The model is converted once per machine (~25 s) and then loads from the safetensors cache.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model

from peftserve.adapters.base_model import load_base_model
from peftserve.server.engine.config import EngineConfig
from peftserve.server.build import build_engine
from peftserve.server.engine.request import SamplingParams
from tests.oracle import generate_oracle, oracle

NEW = 12
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived",
]


@pytest.fixture(scope="module")
def smol():
    model, tok, _ = load_base_model("default", dtype=torch.float32)
    return model, tok


def _fresh(smol):
    """A second model instance with the same weights (the engine rewires its own model)."""
    model, _ = smol
    clone = type(model)(copy.deepcopy(model.config))  # own config: the engine switches its attention
    clone.load_state_dict(model.state_dict())
    return clone.eval().requires_grad_(False)


def _ids(tok, text):
    return tok(text).input_ids


ADAPTERS = {
    "lora": lambda: LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, init_lora_weights=False,
                               target_modules=["q_proj", "v_proj", "down_proj"]),
    "prompt": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8),
    "prefix": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6),
    "ia3": lambda: IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                             feedforward_modules=["down_proj"]),
}


def _perturb(pm, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad and "ia3" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif p.requires_grad and "lora_B" in name:
                p.mul_(0.5)  # keep the LoRA strong enough to matter, small enough to stay fluent
            elif p.requires_grad and "embedding" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def refs(smol, tmp_path_factory):
    """name -> (dir, [oracle continuation per prompt]); None = base model."""
    _, tok = smol
    root = tmp_path_factory.mktemp("smol-adapters")
    base = _fresh(smol)
    base.generation_config.eos_token_id = None
    out = {None: (None, [generate_oracle(base, _ids(tok, p), NEW) for p in PROMPTS])}
    for i, (name, make) in enumerate(ADAPTERS.items()):
        fresh = _fresh(smol)
        torch.manual_seed(10 + i)
        pm = get_peft_model(fresh, make())
        _perturb(pm, 20 + i)
        pm.save_pretrained(root / name)
        ref = PeftModel.from_pretrained(_fresh(smol), root / name).eval()
        ref.generation_config.eos_token_id = None
        out[name] = (root / name, [oracle(ref, _ids(tok, p), NEW) for p in PROMPTS])
    return out


def test_base_answers_like_a_real_model(smol, tmp_path):
    model, tok = smol
    serving = build_engine(_fresh(smol), tok, EngineConfig(max_batch_size=4, max_model_len=256),
                            store=tmp_path / "store")
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    seq = serving.engine.generate([ids], SamplingParams(max_new_tokens=20))[0]
    assert "Paris" in tok.decode(seq.output_ids)


def test_every_kind_alone_and_mixed(smol, refs, tmp_path):
    _, tok = smol
    cfg = EngineConfig(max_batch_size=32, max_model_len=128, max_num_batched_tokens=128)
    serving = build_engine(_fresh(smol), tok, cfg, store=tmp_path / "store")
    for name, (d, _) in refs.items():
        if name is not None:
            serving.registry.import_dir(d, name)
        assert name is None or refs[name][1] != refs[None][1], f"{name} had no effect: vacuous test"
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    prompts = [_ids(tok, p) for p in PROMPTS]
    for name in refs:  # alone: one request at a time
        handle = serving.registry.resolve(name) if name else None
        for i, ids in enumerate(prompts[:1]):
            assert serving.engine.generate([ids], params, adapters=[handle])[0].output_ids == refs[name][1][i], name
    jobs = [(name, i) for i in range(len(PROMPTS)) for name in refs]  # every kind interleaved
    seqs = serving.engine.generate([prompts[i] for _, i in jobs], params,
                                   adapters=[serving.registry.resolve(n) if n else None for n, _ in jobs])
    for (name, i), seq in zip(jobs, seqs):
        assert seq.output_ids == refs[name][1][i], (name, i)


HTTP_PROMPTS = [
    "The capital of France is",
    "def add(a, b):",
    "Water boils at",
    "My favourite fruit is",
    "Once upon a time",
    "import numpy as np",
    "The quick brown fox",
    "1 + 1 =",
]


def test_http_one_at_a_time_and_sixteen_in_flight(smol):
    """Through the HTTP API on the default model: greedy token_ids equal transformers' generate."""
    import asyncio

    import httpx

    from peftserve.server.build import build_server

    _, tok = smol
    ref_model = _fresh(smol)
    ref_model.generation_config.eos_token_id = None
    refs = [generate_oracle(ref_model, _ids(tok, p), NEW) for p in HTTP_PROMPTS]
    server = build_server(_fresh(smol), tok, EngineConfig(max_batch_size=16, max_model_len=128), store=None,
                          model_name="SmolLM2-135M-Instruct")
    engine, app = server.state.engine, server.app
    engine.start()

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=300) as c:
            async def one(p):
                r = await c.post("/generate", json={"prompt": p, "max_new_tokens": NEW, "ignore_eos": True})
                assert r.status_code == 200, r.text
                return r.json()["token_ids"]
            alone = [await one(p) for p in HTTP_PROMPTS[:2]]
            together = await asyncio.gather(*(one(p) for p in HTTP_PROMPTS * 2))
            return alone, together

    try:
        alone, together = asyncio.run(run())
    finally:
        engine.stop()
    assert alone == refs[:2]
    assert together == refs * 2


def test_bfloat16_engine_uses_a_float32_cache_and_still_answers(smol, tmp_path):
    """CPU bf16 serving keeps K/V in float32 (fast decode attention); output stays right."""
    _, tok = smol
    model = _fresh(smol).to(torch.bfloat16)
    serving = build_engine(model, tok, EngineConfig(max_batch_size=4, max_model_len=256, dtype=torch.bfloat16),
                            store=tmp_path / "store")
    assert serving.engine.cache.k[0].dtype == torch.float32
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    seq = serving.engine.generate([ids], SamplingParams(max_new_tokens=20))[0]
    assert "Paris" in tok.decode(seq.output_ids)
