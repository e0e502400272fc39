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
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch

from .config import LoraConfig
from .errors import MISSING_WEIGHTS, SHAPE_MISMATCH, UNKNOWN_MODULE, UNSUPPORTED_ADAPTER, AdapterError
from .host_arena import ARENA
from .spec import BaseModelSpec, RegexBudget, check_fan_in_fan_out, get_pattern_key, resolve_targets
from .transposed_copy import CopyPlan, copy_transposed, layout_key, plan_copy

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

    A: torch.Tensor  # [r, in]  float32, CPU (from `load_lora`: the transposed view of a contiguous [in, r])
    B: torch.Tensor  # [out, r] float32, CPU (from `load_lora`: the transposed view of a contiguous [r, out])
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


def _group_by_module(tensors: Mapping[str, torch.Tensor], spec: BaseModelSpec,
                     targets: set[str]) -> dict[str, dict[str, str]]:
    """-> module path -> {"A": tensor name, "B": tensor name}."""
    grouped: dict[str, dict[str, str]] = {}
    for key in tensors:
        path, which = _split_key(key)
        if path not in spec.linear_modules:
            raise AdapterError(UNKNOWN_MODULE, f"tensor {key!r}: base model has no linear module {path!r}")
        if path not in targets:
            raise AdapterError(UNKNOWN_MODULE, f"tensor {key!r}: module {path!r} is not targeted by the config")
        grouped.setdefault(path, {})[which] = key
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


def load_lora(cfg: LoraConfig, tensors: Mapping[str, torch.Tensor], spec: BaseModelSpec, *,
              regex_budget_s: float = 1.0) -> LoraAdapterWeights:
    """Validate LoRA tensors against the config and base model; return float32 CPU weights, copied
    (`tensors` may be borrowed views of the caller's buffer: see safetensors_io.borrowed_safetensors).

    The checks depend on the config, the base model and the tensors' names and shapes, not their
    values: adapters of one configuration share them, so a `_Plan` is kept per layout (a
    platform's adapters mostly share one) and a repeat pays only the copy.

    The one copy: every A and B, transposed, into one float32 buffer (warm when one was prepared:
    host_arena.py) by runs of evenly spaced same-shape tensors (transposed_copy.py). `A`/`B` are
    the transposed views of those copies: [in, r] / [r, out] is the layout the serving matmuls
    read (LoraSlotWeights.At/Bt are these very tensors for a float32 adapter dtype)."""
    layout = layout_key(tensors)
    key = _plan_key(cfg, layout, spec)
    plan = None
    if key is not None:
        with _PLANS_LOCK:
            plan = _PLANS.get(key)
            if plan is not None:
                _PLANS.move_to_end(key)
    if plan is None:
        plan = _plan(cfg, tensors, spec, regex_budget_s, shared=layout[0])  # raises AdapterError: nothing is kept
        if key is not None:
            with _PLANS_LOCK:
                _PLANS[key] = plan
                while len(_PLANS) > _MAX_PLANS:
                    _PLANS.popitem(last=False)
    copies = copy_transposed(plan.copy, tensors, ARENA.take(plan.copy.numel))
    return LoraAdapterWeights(modules={path: LoraModule(A=copies[a].T, B=copies[b].T, scale=scale)
                                       for path, a, b, scale in plan.modules})


@dataclass(frozen=True)
class _Plan:
    modules: tuple[tuple[str, str, str, float], ...]  # (module path, lora_A name, lora_B name, scale), spec order
    copy: CopyPlan


_PLANS: OrderedDict[tuple, _Plan] = OrderedDict()  # (spec, config, layout) -> plan, least recent first
_PLANS_LOCK = threading.Lock()
_MAX_PLANS = 32


def _plan_key(cfg: LoraConfig, layout: tuple, spec: BaseModelSpec) -> tuple | None:
    """What a plan depends on (`layout`: the tensors' `layout_key`); None (plan every time) if
    some part is not hashable."""
    key = (spec, _config_key(cfg), layout)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _config_key(cfg: LoraConfig) -> tuple:
    """Every field of the config but the informational ones, hashable (dicts as item tuples:
    their order matters, the first matching pattern wins)."""
    return tuple((f.name, tuple(v.items()) if isinstance(v, dict) else v)
                 for f in fields(cfg) if f.name not in ("base_model_name_or_path", "warnings")
                 for v in [getattr(cfg, f.name)])


def _plan(cfg: LoraConfig, tensors: Mapping[str, torch.Tensor], spec: BaseModelSpec, regex_budget_s: float,
          shared: bool) -> _Plan:
    """Every check of a LoRA checkpoint against its config and the base model (values aside)."""
    rx = RegexBudget(regex_budget_s)
    targets = resolve_targets(spec, target_modules=cfg.target_modules, exclude_modules=cfg.exclude_modules,
                              layers_to_transform=cfg.layers_to_transform, layers_pattern=cfg.layers_pattern,
                              default_targets=spec.lora_default_targets, rx=rx)
    check_fan_in_fan_out(spec, targets, cfg.fan_in_fan_out)
    grouped = _group_by_module(tensors, spec, set(targets))

    modules = []
    for path in targets:  # spec order: deterministic
        pair = grouped.get(path, {})
        if set(pair) != {"A", "B"}:
            missing = sorted({"A", "B"} - set(pair))
            raise AdapterError(MISSING_WEIGHTS, f"{path}: missing lora_{'/lora_'.join(missing)} weights "
                               "for a module the config targets")
        r, alpha = _module_rank_alpha(cfg, path, rx)
        in_f, out_f = spec.linear_modules[path]
        _check_pair(path, tensors[pair["A"]], tensors[pair["B"]], r, in_f, out_f)
        scale = alpha / math.sqrt(r) if cfg.use_rslora else alpha / r
        modules.append((path, pair["A"], pair["B"], float(scale)))
    names = [n for _, a, b, _ in modules for n in (a, b)]
    return _Plan(tuple(modules), plan_copy(tensors, names, shared=shared))
