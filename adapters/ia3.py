"""(IA)^3 checkpoints -> validated per-module scaling vectors, matching PEFT's `ia3.Linear`.

PEFT stores one learned vector per targeted module, key `base_model.model.<path>.ia3_l`:
  * attention-style module: shape [out, 1]; forward is base(x) * l       (scales the output)
  * "feedforward" module:   shape [1, in];  forward is base(x * l)       (scales the input)
A module is feedforward when it matches `feedforward_modules`: regex fullmatch for a string, or
`path.endswith(name)` for a list (note: no "." boundary, exactly like
IA3Model._check_target_module_feedforward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import IA3Config
from .errors import INVALID_CONFIG, MISSING_WEIGHTS, SHAPE_MISMATCH, UNKNOWN_MODULE, AdapterError
from .spec import BaseModelSpec, RegexBudget, check_fan_in_fan_out, resolve_targets

KEY_PREFIX = "base_model.model."
KEY_SUFFIX = ".ia3_l"


@dataclass(frozen=True, eq=False)  # holds tensors: identity semantics
class IA3Module:
    vector: torch.Tensor  # [in] if scales_input else [out]; float32, CPU
    scales_input: bool  # True for feedforward modules (PEFT is_feedforward)

    @property
    def nbytes(self) -> int:
        return self.vector.numel() * self.vector.element_size()


@dataclass(frozen=True, eq=False)  # holds tensors: identity semantics
class IA3Weights:
    modules: dict[str, IA3Module]

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.modules.values())


def _is_feedforward(feedforward: object, path: str, rx: RegexBudget) -> bool:
    if isinstance(feedforward, str):
        return bool(rx.fullmatch(feedforward, path))
    return any(path.endswith(name) for name in feedforward)


def _module_path(key: str) -> str:
    if key.startswith(KEY_PREFIX) and key.endswith(KEY_SUFFIX) and len(key) > len(KEY_PREFIX) + len(KEY_SUFFIX):
        return key[len(KEY_PREFIX): -len(KEY_SUFFIX)]
    raise AdapterError(UNKNOWN_MODULE, f"unexpected tensor {key!r} in an IA3 checkpoint "
                       f"(expected '{KEY_PREFIX}<module>{KEY_SUFFIX}')")


def load_ia3(cfg: IA3Config, tensors: dict[str, torch.Tensor], spec: BaseModelSpec, *,
             regex_budget_s: float = 1.0) -> IA3Weights:
    rx = RegexBudget(regex_budget_s)
    targets = resolve_targets(spec, target_modules=cfg.target_modules, exclude_modules=cfg.exclude_modules,
                              layers_to_transform=None, layers_pattern=None,
                              default_targets=spec.ia3_default_targets, rx=rx)
    check_fan_in_fan_out(spec, targets, cfg.fan_in_fan_out)
    feedforward = cfg.feedforward_modules
    if feedforward is None:
        feedforward = spec.ia3_feedforward_modules
        if feedforward is None:
            raise AdapterError(INVALID_CONFIG, "feedforward_modules is not set and there is no default for "
                               f"model type {spec.model_type!r}")

    by_path: dict[str, torch.Tensor] = {}
    target_set = set(targets)
    for key, t in tensors.items():
        path = _module_path(key)
        if path not in spec.linear_modules:
            raise AdapterError(UNKNOWN_MODULE, f"tensor {key!r}: base model has no linear module {path!r}")
        if path not in target_set:
            raise AdapterError(UNKNOWN_MODULE, f"tensor {key!r}: module {path!r} is not targeted by the config")
        by_path[path] = t

    modules: dict[str, IA3Module] = {}
    for path in targets:
        t = by_path.get(path)
        if t is None:
            raise AdapterError(MISSING_WEIGHTS, f"{path}: missing ia3_l vector for a module the config targets")
        in_f, out_f = spec.linear_modules[path]
        ff = _is_feedforward(feedforward, path, rx)
        expected = (1, in_f) if ff else (out_f, 1)
        if tuple(t.shape) != expected:
            raise AdapterError(SHAPE_MISMATCH, f"{path}: ia3_l has shape {list(t.shape)}, expected "
                               f"{list(expected)} ({'feedforward: scales input' if ff else 'scales output'})")
        modules[path] = IA3Module(vector=t.reshape(-1).to(torch.float32).contiguous(), scales_input=ff)
    return IA3Weights(modules=modules)
