"""`--model DIR` families: tiny seeded Qwen2, Mistral and GPT-2 (Llama is covered everywhere
else) — base greedy tokens equal transformers' generate; a LoRA and a soft prompt equal PEFT."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from peftserve.server.engine.config import EngineConfig
from peftserve.server.build import build_engine
from peftserve.server.engine.request import SamplingParams
from tests.oracle import oracle
from tests.tiny import tiny_causal_lm, tiny_gpt2
from tests.test_lora_parity import StubTokenizer

NEW = 8
COMMON = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)


def qwen2():
    return tiny_causal_lm(Qwen2ForCausalLM, Qwen2Config, 0, intermediate_size=128, num_key_value_heads=2,
                          max_position_embeddings=256, use_sliding_window=False, **COMMON)


def mistral():
    return tiny_causal_lm(MistralForCausalLM, MistralConfig, 0, intermediate_size=128, num_key_value_heads=1,
                          max_position_embeddings=256, sliding_window=None, **COMMON)


def gpt2():
    return tiny_gpt2(0, vocab_size=320, n_embd=64, n_layer=2, n_head=4, n_positions=256)


FAMILIES = {"qwen2": (qwen2, ["q_proj", "v_proj", "up_proj"]), "mistral": (mistral, ["k_proj", "o_proj", "down_proj"]),
            "gpt2": (gpt2, ["c_attn", "c_fc"])}


def build(name):
    return FAMILIES[name][0]()  # seeded (0) by the tests.tiny factory


def _prompts():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 320, (n,), generator=g).tolist() for n in (1, 6, 19)]


def _generate(model, p):
    model.generation_config.eos_token_id = None
    out = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                         max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    return out[0, -NEW:].tolist()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_base_lora_and_soft_prompt(family, tmp_path):
    targets = FAMILIES[family][1]
    adapters = {
        "lora": LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets,
                           fan_in_fan_out=family == "gpt2"),
        "prompt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    }
    refs = {None: [_generate(build(family), p) for p in _prompts()]}
    for name, cfg in adapters.items():
        torch.manual_seed(1)
        pm = get_peft_model(build(family), cfg)
        with torch.no_grad():  # prompt embeddings start small: make them matter
            for pname, param in pm.named_parameters():
                if param.requires_grad and "embedding" in pname:
                    param.normal_(0, 1)
        pm.save_pretrained(tmp_path / name)
        ref = PeftModel.from_pretrained(build(family), tmp_path / name).eval()
        ref.generation_config.eos_token_id = None
        refs[name] = [oracle(ref, p, NEW) for p in _prompts()]  # no-cache forward loop for soft prompts
        assert refs[name] != refs[None], f"{name} had no effect"
    serving = build_engine(build(family), StubTokenizer(), EngineConfig(max_batch_size=16, max_model_len=64),
                            store=tmp_path / "store")
    for name in adapters:
        serving.registry.import_dir(tmp_path / name, name)
    jobs = [(n, i) for i in range(len(_prompts())) for n in refs]
    seqs = serving.engine.generate([_prompts()[i] for _, i in jobs], SamplingParams(max_new_tokens=NEW, ignore_eos=True),
                                   adapters=[serving.registry.resolve(n) if n else None for n, _ in jobs])
    for (name, i), seq in zip(jobs, seqs):
        assert seq.output_ids == refs[name][i], (family, name, i)
