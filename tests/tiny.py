"""The one factory of tiny, deterministic base models for tests (built in-process, no downloads).

- `tiny_llama(seed, **overrides)`: a 2-layer Llama (hidden 64, vocab 256 unless overridden);
  conftest's `tiny_model` / `build_tiny_model` size it to the default tokenizer.
- `tiny_base(seed)`: the training tests' (model, tokenizer, tokenizer dir): the tiny random Llama
  of `peftserve.adapters.base_model` (`TINY_RANDOM_LLAMA`), which `save_tiny_model_dir` writes to
  disk for `--model DIR` runs (also used outside tests: compare_zh, the scale-out benchmark).
- `tiny_gpt2(seed, **overrides)`: a GPT-2 (Conv1D linears); `tiny_causal_lm(model_cls, config_cls,
  seed, **config)` any other family (tests/test_families.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from peftserve.adapters.base_model import (TINY_RANDOM_LLAMA, resolve_model_dir, save_tiny_model_dir,  # noqa: F401
                                           tiny_random_llama)

TINY_LLAMA_DEFAULTS = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA: prefix tuning must use kv heads, not query heads
    intermediate_size=128,
    vocab_size=256,
    max_position_embeddings=256,
)


def tiny_causal_lm(model_cls, config_cls, seed: int | None = 0, **config):
    """`model_cls(config_cls(**config))` with random weights drawn after `torch.manual_seed(seed)`
    (seed=None: torch's current RNG state), float32, in eval mode."""
    if seed is not None:
        torch.manual_seed(seed)
    return model_cls(config_cls(**config)).to(torch.float32).eval()


def tiny_llama(seed: int | None = 0, **overrides) -> LlamaForCausalLM:
    """A 2-layer Llama with random (seeded) weights, float32, in eval mode."""
    return tiny_causal_lm(LlamaForCausalLM, LlamaConfig, seed, **{**TINY_LLAMA_DEFAULTS, **overrides})


def tiny_llama_config(vocab_size: int, **overrides) -> LlamaConfig:
    """The config of `tiny_base`'s model (the tiny random Llama) for another vocabulary."""
    return LlamaConfig(**{**TINY_RANDOM_LLAMA, "vocab_size": vocab_size, **overrides})


def tiny_gpt2(seed: int | None = 0, **overrides):
    """A GPT-2 (transformers Conv1D linears) with random (seeded) weights, in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    return tiny_causal_lm(GPT2LMHeadModel, GPT2Config, seed, **overrides)


def default_tokenizer():
    """(the default model's tokenizer, its directory) — offline, cached by base_model."""
    from transformers import AutoTokenizer

    model_dir = resolve_model_dir("default")
    return AutoTokenizer.from_pretrained(model_dir), model_dir


def tiny_base(seed: int = 0, tokenizer=None, model_dir=None):
    """(model, tokenizer, model_dir) like load_base_model, with the tiny random model.
    model_dir is the tokenizer's directory (PEFT prompt-tuning text init reads it)."""
    if tokenizer is None:
        tokenizer, model_dir = default_tokenizer()
    return tiny_random_llama(len(tokenizer), seed), tokenizer, Path(model_dir)
