"""Tiny seeded models for fast tests (shared by tests/test_training.py and tests/test_bottleneck.py).

The tokenizer is the default model's (offline, cached by base_model); the model is a random
2-layer Llama with hidden size 64 over the same vocabulary, so every method trains in seconds.
"""

from __future__ import annotations

from pathlib import Path


def tiny_llama_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=512,
              tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    kw.update(overrides)
    return LlamaConfig(**kw)


def default_tokenizer():
    from transformers import AutoTokenizer

    from peftserve.adapters.base_model import resolve_model_dir

    model_dir = resolve_model_dir("default")
    return AutoTokenizer.from_pretrained(model_dir), model_dir


def tiny_base(seed: int = 0, tokenizer=None, model_dir=None):
    """(model, tokenizer, model_dir) like load_base_model, with a tiny random model.
    model_dir is the tokenizer's directory (PEFT prompt-tuning text init reads it)."""
    import torch
    from transformers import LlamaForCausalLM

    if tokenizer is None:
        tokenizer, model_dir = default_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer)))
    model.eval().requires_grad_(False)
    return model, tokenizer, Path(model_dir)


def save_tiny_model_dir(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny model + tokenizer as a local HF directory (for `--model DIR` / torchrun tests)."""
    model, tok, _ = tiny_base(seed)
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
