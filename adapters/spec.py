"""What an adapter is validated against: a static description of the served base model, plus
PEFT's module-targeting rules re-implemented over that description (no model, no peft import).

Module paths are the base model's `named_modules()` names, i.e. exactly what appears inside a
PEFT checkpoint key after the `base_model.model.` prefix (`model.layers.0.self_attn.q_proj`).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import ALL_LINEAR, check_regex
from .errors import INVALID_CONFIG, UNKNOWN_MODULE, UNSUPPORTED_ADAPTER, AdapterError

# PEFT's per-architecture defaults (peft/utils/constants.py), used when a config leaves
# target_modules / feedforward_modules unset. Copied, not imported: importing peft is slow and
# these tables change rarely; checkpoints written by save_pretrained always carry explicit values.
_LORA_DEFAULT_TARGETS = {
    "llama": ("q_proj", "v_proj"), "mistral": ("q_proj", "v_proj"), "mixtral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"), "qwen3": ("q_proj", "v_proj"), "gemma": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"), "opt": ("q_proj", "v_proj"), "gpt2": ("c_attn",),
    "gpt_bigcode": ("c_attn",), "gpt_neox": ("query_key_value",), "falcon": ("query_key_value",),
    "bloom": ("query_key_value",), "phi": ("q_proj", "v_proj", "fc1", "fc2"),
}
_IA3_DEFAULT_TARGETS = {
    "llama": ("k_proj", "v_proj", "down_proj"), "mistral": ("k_proj", "v_proj", "down_proj"),
    "mixtral": ("k_proj", "v_proj", "w2"), "qwen2": ("q_proj", "v_proj", "down_proj"),
    "qwen3": ("q_proj", "v_proj", "down_proj"), "gemma": ("q_proj", "v_proj", "down_proj"),
    "gemma2": ("q_proj", "v_proj", "down_proj"), "gpt2": ("c_attn", "mlp.c_proj"),
    "opt": ("q_proj", "k_proj", "fc2"), "phi": ("q_proj", "v_proj", "fc2"),
}
_IA3_DEFAULT_FEEDFORWARD = {
    "llama": ("down_proj",), "mistral": ("down_proj",), "mixtral": ("w2",), "qwen2": ("down_proj",),
    "qwen3": ("down_proj",), "gemma": ("down_proj",), "gemma2": ("down_proj",), "gpt2": ("mlp.c_proj",),
    "opt": ("fc2",), "phi": ("fc2",),
}


def _conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers absent: no GPT-2 style layers can exist either
        return None
    return Conv1D


@dataclass(frozen=True)
class BaseModelSpec:
    """Shapes and names of the served base model that adapters must agree with."""

    name_or_path: str | None
    model_type: str
    # path -> (in_features, out_features); lm_head excluded. hash=False keeps the spec hashable.
    linear_modules: dict[str, tuple[int, int]] = field(hash=False)
    conv1d_modules: frozenset[str]  # subset of linear_modules stored as transformers Conv1D (GPT-2)
    other_modules: frozenset[str]  # every other named submodule (embeddings, norms, lm_head, containers)
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_model_len: int
    lora_default_targets: tuple[str, ...] | None = None
    ia3_default_targets: tuple[str, ...] | None = None
    ia3_feedforward_modules: tuple[str, ...] | None = None  # IA3 default "feedforward" suffixes
    dtype: str = "float32"  # serving dtype of the weights (adapters/admission.py bounds against its range)

    @classmethod
    def from_model(cls, model: nn.Module, name_or_path: str | None = None, *,
                   max_model_len: int | None = None) -> BaseModelSpec:
        """Describe an HF causal LM (`LlamaForCausalLM`, `GPT2LMHeadModel`, ...)."""
        cfg = model.config
        if hasattr(cfg, "get_text_config"):
            cfg = cfg.get_text_config()

        def attr(*names: str) -> Any:
            for n in names:
                v = getattr(cfg, n, None)
                if v is not None:
                    return v
            raise ValueError(f"model config has none of {names}")

        hidden = int(attr("hidden_size", "n_embd", "d_model"))
        heads = int(attr("num_attention_heads", "n_head", "num_heads"))
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        conv1d = _conv1d_class()

        linear: dict[str, tuple[int, int]] = {}
        conv: set[str] = set()
        other: set[str] = set()
        for name, module in model.named_modules():
            if not name:
                continue
            if isinstance(module, nn.Linear) and module is not output:
                linear[name] = (module.in_features, module.out_features)
            elif conv1d is not None and isinstance(module, conv1d) and module is not output:
                in_f, out_f = module.weight.shape  # Conv1D stores weight as [in, out]
                linear[name] = (int(in_f), int(out_f))
                conv.add(name)
            else:
                other.add(name)
        model_type = str(getattr(cfg, "model_type", "") or "")
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        if max_model_len is None:
            max_model_len = int(attr("max_position_embeddings", "n_positions"))
        return cls(
            name_or_path=name_or_path or getattr(model, "name_or_path", None) or None,
            model_type=model_type,
            linear_modules=linear,
            conv1d_modules=frozenset(conv),
            other_modules=frozenset(other),
            num_layers=int(attr("num_hidden_layers", "n_layer", "num_layers")),
            hidden_size=hidden,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=int(attr("vocab_size")),
            max_model_len=int(max_model_len),
            lora_default_targets=_LORA_DEFAULT_TARGETS.get(model_type),
            ia3_default_targets=_IA3_DEFAULT_TARGETS.get(model_type),
            ia3_feedforward_modules=_IA3_DEFAULT_FEEDFORWARD.get(model_type),
            dtype=str(dtype).removeprefix("torch."),
        )

    @property
    def kv_dim(self) -> int:
        """Width of one layer's K (or V) projection: what a prefix stores per token."""
        return self.num_key_value_heads * self.head_dim

    @staticmethod
    def layer_index(module_path: str) -> int | None:
        """Decoder layer of a module path (`model.layers.3.mlp.up_proj` -> 3), None outside layers.

        Same rule as PEFT's default layer matching: the first all-digit path component that
        follows at least two other components.
        """
        m = _DEFAULT_LAYER_RE.match(module_path + ".")
        return int(m.group("idx")) if m else None


_DEFAULT_LAYER_RE = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")


# ----------------------------------------------------------------------------------------------
# Regex evaluation with a time budget. Patterns come from untrusted configs; Python's `re` has no
# timeout, so a catastrophic-backtracking pattern could pin a core. The `regex` package (a
# transformers dependency) accepts a timeout; V0 mode keeps `re` semantics.

try:
    import regex as _regex
except ImportError:  # pragma: no cover - transformers always installs it
    _regex = None


@dataclass
class RegexBudget:
    """Shared wall-clock budget for all pattern evaluations done while loading one adapter."""

    seconds: float = 1.0
    _deadline: float = field(default=0.0, init=False)
    _cache: dict[str, Any] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self._deadline = time.monotonic() + self.seconds

    def _compiled(self, pattern: str) -> Any:
        c = self._cache.get(pattern)
        if c is None:
            check_regex(pattern)  # bounded size before the (expanding) regex compiler sees it
            try:
                c = _regex.compile(pattern, flags=_regex.V0) if _regex else re.compile(pattern)
            except Exception as exc:  # both engines raise their own error types
                raise AdapterError(INVALID_CONFIG, f"invalid regular expression {pattern[:60]!r}: {exc}") from None
            self._cache[pattern] = c
        return c

    def _run(self, method: str, pattern: str, text: str) -> Any:
        compiled = self._compiled(pattern)
        if _regex is None:
            return getattr(compiled, method)(text)
        remaining = self._deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            return getattr(compiled, method)(text, timeout=remaining)
        except TimeoutError:
            raise AdapterError(INVALID_CONFIG, f"regular expression {pattern[:60]!r} is too expensive "
                               f"to evaluate (budget {self.seconds}s)") from None

    def fullmatch(self, pattern: str, text: str) -> Any:
        return self._run("fullmatch", pattern, text)

    def match(self, pattern: str, text: str) -> Any:
        return self._run("match", pattern, text)


# ----------------------------------------------------------------------------------------------
# PEFT targeting rules (peft/tuners/tuners_utils.py: check_target_module_exists,
# _maybe_include_all_linear_layers; peft/utils/other.py: get_pattern_key)


def module_is_targeted(key: str, *, target_modules: Any, exclude_modules: Any,
                       layers_to_transform: tuple[int, ...] | None,
                       layers_pattern: tuple[str, ...] | None, rx: RegexBudget) -> bool:
    """Mirror of check_target_module_exists for one module path (target_modules already resolved:
    a tuple/frozenset of names or a regex string; never ALL_LINEAR or None here)."""
    if exclude_modules:
        if isinstance(exclude_modules, str):
            if rx.fullmatch(exclude_modules, key):
                return False
        elif key in exclude_modules or any(key.endswith(f".{e}") for e in exclude_modules):
            return False
    if isinstance(target_modules, str):
        return bool(rx.fullmatch(target_modules, key))
    if key in target_modules:
        return True  # an exact path match bypasses layers_to_transform, as in PEFT
    found = any(key.endswith(f".{t}") for t in target_modules)
    if not (found and layers_to_transform):
        return found
    match = None
    if not layers_pattern:
        # Lazy `.*?`: the first numbered component is the layer index (not e.g. an expert index).
        match = rx.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in layers_pattern:
            match = rx.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    return int(match.group("idx")) in layers_to_transform


def get_pattern_key(pattern_keys: Any, key_to_match: str, rx: RegexBudget) -> str:
    """Mirror of peft.utils.other.get_pattern_key: first rank/alpha pattern matching the path's tail."""
    for key in pattern_keys:
        if rx.match(rf"(.*\.)?({key})$", key_to_match):
            return key
    return key_to_match


def all_module_paths(spec: BaseModelSpec) -> list[str]:
    return sorted(set(spec.linear_modules) | spec.other_modules)


def resolve_targets(spec: BaseModelSpec, *, target_modules: Any, exclude_modules: Any,
                    layers_to_transform: tuple[int, ...] | None, layers_pattern: tuple[str, ...] | None,
                    default_targets: tuple[str, ...] | None, rx: RegexBudget) -> list[str]:
    """Linear module paths an adapter config targets, exactly as PEFT would pick them.

    Raises unsupported_adapter if it also targets a module we cannot serve (embedding, lm_head,
    a whole attention block: PEFT would either wrap it with a layer type we do not implement or
    fail), and unknown_module if it targets nothing at all (PEFT: "Target modules not found").
    """
    if target_modules is None:
        if default_targets is None:
            raise AdapterError(INVALID_CONFIG, f"target_modules is not set and there is no default for "
                               f"model type {spec.model_type!r}")
        target_modules = default_targets
    if target_modules == ALL_LINEAR:
        # _maybe_include_all_linear_layers: every Linear/Conv1D except the output layer, which our
        # spec already leaves out of linear_modules.
        target_modules = frozenset(spec.linear_modules)
    selected, unservable = [], []
    for path in all_module_paths(spec):
        if module_is_targeted(path, target_modules=target_modules, exclude_modules=exclude_modules,
                              layers_to_transform=layers_to_transform, layers_pattern=layers_pattern, rx=rx):
            (selected if path in spec.linear_modules else unservable).append(path)
    if unservable:
        raise AdapterError(UNSUPPORTED_ADAPTER, f"config targets {len(unservable)} non-linear module(s) this "
                           f"server cannot adapt, e.g. {unservable[0]!r}")
    if not selected:
        raise AdapterError(UNKNOWN_MODULE, "config targets no linear module of the base model")
    return selected


def check_fan_in_fan_out(spec: BaseModelSpec, paths: list[str], fan_in_fan_out: bool) -> None:
    """PEFT rewrites fan_in_fan_out to match the layer type (True for GPT-2 Conv1D, False for Linear)
    before saving, so a mismatch means the adapter was made for a different architecture."""
    kinds = {p in spec.conv1d_modules for p in paths}
    if len(kinds) == 1 and kinds.pop() != fan_in_fan_out:
        want = not fan_in_fan_out
        raise AdapterError(INVALID_CONFIG, f"fan_in_fan_out={fan_in_fan_out} but the targeted modules are "
                           f"{'Conv1D' if want else 'nn.Linear'} (expected fan_in_fan_out={want})")
