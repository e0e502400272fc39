"""Per-request weighted combination of LoRA adapters (`adapter: [{name, weight}, ...]`).

Exactly PEFT's `add_weighted_adapter(..., combination_type="cat")`: per module, the combined
adapter stacks `weight_i * scaling_i * A_i` along the rank axis and `B_i` alongside, so its
delta is `sum_i weight_i * scaling_i * B_i A_i` (exact, no SVD). Its own scaling follows PEFT's
new config (`r = lora_alpha = sum of ranks`, rsLoRA inherited from the first adapter). Combined
adapters are cached by (names, versions, weights), so a replaced adapter never reuses a stale
combination.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections import OrderedDict

import torch

from peftserve.adapters.artifact import LoadedAdapter
from peftserve.adapters.config import AdapterKind
from peftserve.adapters.lora import LoraAdapterWeights, LoraModule

from .errors import ApiError

MAX_COMBINED = 8
MAX_ABS_WEIGHT = 100.0


class InvalidCombination(ApiError):
    code, status = "invalid_adapter_combination", 422

    def __init__(self, message: str):
        super().__init__(None, message)


def check_items(items: list[tuple[str, float]]) -> None:
    if not 1 <= len(items) <= MAX_COMBINED:
        raise InvalidCombination(f"a combination takes 1..{MAX_COMBINED} adapters")
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        raise InvalidCombination("an adapter may appear only once in a combination")
    for name, w in items:
        if not isinstance(w, (int, float)) or not math.isfinite(w) or abs(w) > MAX_ABS_WEIGHT:
            raise InvalidCombination(f"weight of {name!r} must be finite with |weight| <= {MAX_ABS_WEIGHT}")


def _peft_rank(ver) -> int:
    """An adapter's rank as add_weighted_adapter counts it: max(r, *rank_pattern.values()) from
    its config (not the ranks of the modules it actually has; they differ when rank_pattern
    lowers every module below r or names a module the adapter does not target)."""
    cfg = ver.loaded.config
    return max(cfg.r, *cfg.rank_pattern.values()) if cfg.rank_pattern else cfg.r


def combine_lora(versions: list, weights: list[float]) -> LoadedAdapter:
    """versions: resolved AdapterVersions (all LoRA, loaded) -> one combined LoadedAdapter."""
    for ver in versions:
        if ver.kind is not AdapterKind.LORA:
            raise InvalidCombination(f"only LoRA adapters can be combined; {ver.name!r} is {ver.kind.value}")
    new_rank = sum(_peft_rank(v) for v in versions)
    rslora = bool(getattr(versions[0].loaded.config, "use_rslora", False))
    scale = new_rank / math.sqrt(new_rank) if rslora else 1.0
    paths = sorted({p for v in versions for p in v.loaded.weights.modules})
    modules = {}
    for path in paths:
        parts = [(v.loaded.weights.modules[path], w) for v, w in zip(versions, weights) if path in v.loaded.weights.modules]
        A = torch.cat([m.A * w * m.scale for m, w in parts], dim=0)  # [sum r, in]
        B = torch.cat([m.B for m, _ in parts], dim=1)  # [out, sum r]
        modules[path] = LoraModule(A, B, scale)
    weights_obj = LoraAdapterWeights(modules)
    key = "|".join(f"{v.name}@{v.version}*{w!r}" for v, w in zip(versions, weights))
    digest = hashlib.sha256(key.encode()).hexdigest()
    return LoadedAdapter(kind=AdapterKind.LORA, config=None, weights=weights_obj, content_hash=digest,
                         nbytes=weights_obj.nbytes)


class CombinationCache:
    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self._items: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get_or_make(self, versions: list, weights: list[float], make_version):
        key = tuple((v.name, v.version, float(w)) for v, w in zip(versions, weights))
        with self._lock:
            if key in self._items:
                self.hits += 1
                self._items.move_to_end(key)
                return self._items[key]
        self.misses += 1
        t0 = time.perf_counter()
        ver = make_version(combine_lora(versions, weights), versions)
        ver.summary["merge_seconds"] = round(time.perf_counter() - t0, 6)
        with self._lock:
            self._items[key] = ver
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return ver
