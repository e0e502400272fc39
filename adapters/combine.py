"""Per-request weighted combination of LoRA adapters (`adapter: [{name, weight}, ...]`).

Exactly PEFT's `add_weighted_adapter(..., combination_type="cat")`: per module, the combined
adapter stacks `weight_i * scaling_i * A_i` along the rank axis and `B_i` alongside, so its
delta is `sum_i weight_i * scaling_i * B_i A_i` (exact, no SVD). Its own scaling follows PEFT's
new config (`r = lora_alpha = sum of ranks`, rsLoRA inherited from the first adapter). Combined
adapters are cached by (names, versions, weights), so a replaced adapter never reuses a stale
combination; the registry bounds them (host byte budget, `max_combinations`) and drops them with
their members.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections import OrderedDict

import torch

from .artifact import LoadedAdapter
from .config import AdapterKind
from .errors import InvalidCombination
from .lora import LoraAdapterWeights, LoraModule

MAX_COMBINED = 8
MAX_ABS_WEIGHT = 100.0


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


def combination_key(versions: list, weights: list[float]) -> tuple:
    """(name, version, weight) per member: a replaced member never reuses a stale combination."""
    return tuple((v.name, v.version, float(w)) for v, w in zip(versions, weights))


class CombinationCache:
    """Live combinations, most recently used last. Bounds (count, bytes) are the registry's:
    combinations live in its host-memory LRU next to adapters (the server's registry), which calls
    `discard` when it evicts one and `discard_member` when a member is replaced or deleted."""

    def __init__(self):
        self._items: OrderedDict[tuple, object] = OrderedDict()  # key -> combined AdapterVersion
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple):
        with self._lock:
            ver = self._items.get(key)
            if ver is not None:
                self.hits += 1
                self._items.move_to_end(key)
            return ver

    def make(self, versions: list, weights: list[float], make_version):
        """Combine (slow: call without the registry lock); not cached until `put`."""
        self.misses += 1
        t0 = time.perf_counter()
        ver = make_version(combine_lora(versions, weights), versions)
        ver.summary["combine_seconds"] = round(time.perf_counter() - t0, 6)
        return ver

    def put(self, key: tuple, ver) -> object:
        """Cache `ver` under `key`; if another thread won the race, keep and return its version."""
        with self._lock:
            existing = self._items.get(key)
            if existing is not None:
                return existing
            self._items[key] = ver
            return ver

    def oldest(self):
        with self._lock:
            return next(iter(self._items.values()), None)

    def discard(self, version: str) -> None:
        with self._lock:
            for key in [k for k, v in self._items.items() if v.version == version]:
                del self._items[key]

    def discard_member(self, name: str) -> list:
        """Forget every combination with member `name` (any version); -> the forgotten versions."""
        with self._lock:
            keys = [k for k in self._items if any(member == name for member, _, _ in k)]
            return [self._items.pop(k) for k in keys]
