"""LoRA checkpoints -> validated per-module (A, B, scale), matching PEFT's `lora.Linear` exactly.

PEFT adds `lora_B(lora_A(x)) * scaling` to a targeted Linear's output, with
scaling = alpha / r (or alpha / sqrt(r) for rsLoRA), where r and alpha may be overridden per
module by `rank_pattern` / `alpha_pattern`. `save_pretrained` strips the adapter name, so the only
key forms it writes are:
    base_model.model.<module path>.lora_A.weight   [r, in]
    base_model.model.<module path>.lora_B.weight   [out, r]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import LoraConfig
from .errors import MISSING_WEIGHTS, SHAPE_MISMATCH, UNKNOWN_MODULE, UNSUPPORTED_ADAPTER, AdapterError
from .spec import BaseModelSpec, RegexBudget, check_fan_in_fan_out, get_pattern_key, resolve_targets

KEY_PREFIX = "base_model.model."
_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B"}
# Tensors PEFT writes for LoRA features we refuse: name fragment -> why.
_UNSERVED_FRAGMENTS = {
    "lora_magnitude_vector": "DoRA magnitude vectors",
    "lora_embedding_A": "LoRA on embedding layers",
    "lora_embedding_B": "LoRA on embedding layers",
    "lora_B.bias": "lora_bias",
    "modules_to_save": "modules_to_save",
    "trainable_tokens": "trainable tokens",
    "base_layer": "saved base-layer weights",
}


@dataclass(frozen=True, eq=False)  # holds tensors: identity semantics
class LoraModule:
    """One adapted Linear: delta(x) = (x @ A.T) @ B.T * scale."""

    A: torch.Tensor  # [r, in]  float32, CPU
    B: torch.Tensor  # [out, r] float32, CPU
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def nbytes(self) -> int:
        return self.A.numel() * self.A.element_size() + self.B.numel() * self.B.element_size()


@dataclass(frozen=True, eq=False)  # holds tensors: identity semantics
class LoraAdapterWeights:
    modules: dict[str, LoraModule]  # module path (e.g. model.layers.0.self_attn.q_proj) -> weights

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.modules.values())

    @property
    def max_rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)


def _split_key(key: str) -> tuple[str, str]:
    """'base_model.model.<path>.lora_A.weight' -> (path, 'A'); anything else is an error."""
    if key.startswith(KEY_PREFIX):
        for suffix, which in _SUFFIXES.items():
            if key.endswith(suffix) and len(key) > len(KEY_PREFIX) + len(suffix):
                return key[len(KEY_PREFIX): -len(suffix)], which
    for fragment, what in _UNSERVED_FRAGMENTS.items():
        if fragment in key:
            raise AdapterError(UNSUPPORTED_ADAPTER, f"tensor {key!r}: {what} is not supported")
    if ".lora_A." in key or ".lora_B." in key:
        raise AdapterError(UNKNOWN_MODULE, f"tensor {key!r} is not in save_pretrained form "
                           f"'{KEY_PREFIX}<module>.lora_A.weight' (adapter name must be stripped)")
    raise AdapterError(UNKNOWN_MODULE, f"unexpected tensor {key!r} in a LoRA checkpoint")


def _group_by_module(tensors: dict[str, torch.Tensor], spec: BaseModelSpec,
                     targets: set[str]) -> dict[str, dict[str, torch.Tensor]]:
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        path, which = _split_key(key)
        if path not in spec.linear_modules:
            raise AdapterError(UNKNOWN_MODULE, f"tensor {key!r}: base model has no linear module {path!r}")
        if path not in targets:
            raise AdapterError(UNKNOWN_MODULE, f"tensor {key!r}: module {path!r} is not targeted by the config")
        grouped.setdefault(path, {})[which] = t
    return grouped


def _module_rank_alpha(cfg: LoraConfig, path: str, rx: RegexBudget) -> tuple[int, float]:
    # Same lookup as LoraModel._create_and_replace: first matching pattern key, else the defaults.
    r_key = get_pattern_key(cfg.rank_pattern.keys(), path, rx)
    alpha_key = get_pattern_key(cfg.alpha_pattern.keys(), path, rx)
    return cfg.rank_pattern.get(r_key, cfg.r), cfg.alpha_pattern.get(alpha_key, cfg.lora_alpha)


def _check_pair(path: str, a: torch.Tensor, b: torch.Tensor, r: int, in_f: int, out_f: int) -> None:
    if a.dim() != 2 or b.dim() != 2:
        raise AdapterError(SHAPE_MISMATCH, f"{path}: lora_A/lora_B must be 2-D, got {list(a.shape)} / {list(b.shape)}")
    if a.shape[0] != b.shape[1]:
        raise AdapterError(SHAPE_MISMATCH, f"{path}: rank mismatch, lora_A has {a.shape[0]} rows but "
                           f"lora_B has {b.shape[1]} columns")
    if a.shape[0] != r:
        raise AdapterError(SHAPE_MISMATCH, f"{path}: rank {a.shape[0]} in weights but config (r/rank_pattern) says {r}")
    if a.shape[1] != in_f:
        raise AdapterError(SHAPE_MISMATCH, f"{path}: lora_A is {list(a.shape)}, module in_features is {in_f}")
    if b.shape[0] != out_f:
        raise AdapterError(SHAPE_MISMATCH, f"{path}: lora_B is {list(b.shape)}, module out_features is {out_f}")


def load_lora(cfg: LoraConfig, tensors: dict[str, torch.Tensor], spec: BaseModelSpec, *,
              regex_budget_s: float = 1.0) -> LoraAdapterWeights:
    """Validate LoRA tensors against the config and base model; return float32 CPU weights."""
    rx = RegexBudget(regex_budget_s)
    targets = resolve_targets(spec, target_modules=cfg.target_modules, exclude_modules=cfg.exclude_modules,
                              layers_to_transform=cfg.layers_to_transform, layers_pattern=cfg.layers_pattern,
                              default_targets=spec.lora_default_targets, rx=rx)
    check_fan_in_fan_out(spec, targets, cfg.fan_in_fan_out)
    grouped = _group_by_module(tensors, spec, set(targets))

    modules: dict[str, LoraModule] = {}
    for path in targets:  # spec order: deterministic
        pair = grouped.get(path, {})
        if set(pair) != {"A", "B"}:
            missing = sorted({"A", "B"} - set(pair))
            raise AdapterError(MISSING_WEIGHTS, f"{path}: missing lora_{'/lora_'.join(missing)} weights "
                               "for a module the config targets")
        r, alpha = _module_rank_alpha(cfg, path, rx)
        in_f, out_f = spec.linear_modules[path]
        _check_pair(path, pair["A"], pair["B"], r, in_f, out_f)
        scale = alpha / math.sqrt(r) if cfg.use_rslora else alpha / r
        modules[path] = LoraModule(
            A=pair["A"].to(torch.float32).contiguous(),
            B=pair["B"].to(torch.float32).contiguous(),
            scale=float(scale),
        )
    return LoraAdapterWeights(modules=modules)
