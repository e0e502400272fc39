"""Device tier of the adapter registry: slots for weight adapters, shared KV prefixes for
soft-prompt / prefix adapters. Implements the engine's `AdapterRuntime`; runs on the engine thread.

- Weight adapters (LoRA, (IA)3, bottleneck) live in one of `num_slots` device slots (slot 0 =
  none). A slot is pinned while any running sequence uses it; unpinned slots are evicted LRU.
  When every slot is pinned by other adapters, a new adapter's request waits (never fails).
- Prompt adapters become a per-layer KV prefix computed once per adapter *version* (content
  hash, never the name) and copied into each sequence's cache row at admission: after the
  first request, a soft-prompt or prefix row costs no extra prefill.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .adapter_layers import AdapterLayers
from .kv_cache import KVCache
from .request import Sequence

log = logging.getLogger(__name__)


@dataclass
class KVPrefix:
    k: list[torch.Tensor]  # per layer [kv_heads, n, head_dim]
    v: list[torch.Tensor]
    rope_offset: int = 0

    @property
    def length(self) -> int:
        return self.k[0].shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class AdapterSlots:
    def __init__(self, layers: AdapterLayers, num_slots: int, compute_prefix, device_weights,
                 max_prefix_bytes: int = 512 << 20, observer=None):
        """compute_prefix(adapter) -> KVPrefix; device_weights(adapter) -> installer(layers, slot)."""
        self.layers = layers
        self.num_slots = num_slots
        self._compute_prefix = compute_prefix
        self._device_weights = device_weights
        self.slot_key: dict[int, str] = {}  # slot -> adapter version key
        self.key_slot: dict[str, int] = {}
        self.pins: dict[int, int] = {}
        self.lru: OrderedDict[int, None] = OrderedDict()  # unpinned resident slots, oldest first
        self.prefixes: OrderedDict[str, KVPrefix] = OrderedDict()
        self.prefix_pins: dict[str, int] = {}
        self.max_prefix_bytes = max_prefix_bytes
        self._held: dict[int, tuple[int, str | None]] = {}  # seq_id -> (slot, prefix key)
        self._dropped: set[str] = set()  # deleted/replaced versions still pinned by running requests
        self.observer = observer
        self.stats = {"loads": 0, "evictions": 0, "hits": 0, "prefix_computes": 0}

    # -- AdapterRuntime -------------------------------------------------------------------
    def reserve(self, seq: Sequence, running: list[Sequence]) -> bool:
        adapter = seq.adapter
        if adapter is None:
            return True
        slot, prefix_key = 0, None
        if adapter.uses_slot:
            slot = self._acquire_slot(adapter)
            if slot is None:
                return False
        if adapter.uses_prefix:
            prefix_key = adapter.key
            try:
                prefix = self._prefix(adapter)
            except BaseException:  # the request fails alone (scheduler.rejected): give its slot back
                if slot:
                    self._unpin(slot)
                raise
            self.prefix_pins[prefix_key] = self.prefix_pins.get(prefix_key, 0) + 1
            seq.kv_prefix_len = prefix.length
            seq.rope_offset = prefix.rope_offset
        seq.adapter_slot = slot
        self._held[seq.seq_id] = (slot, prefix_key)
        return True

    def on_admit(self, seq: Sequence, cache: KVCache) -> None:
        held = self._held.get(seq.seq_id)
        if held and held[1] is not None:
            prefix = self.prefixes[held[1]]
            cache.write_prefix(seq.kv_slot, prefix.k, prefix.v)

    def release(self, seq: Sequence) -> None:
        held = self._held.pop(seq.seq_id, None)
        if held is None:
            return
        slot, prefix_key = held
        if slot:
            self._unpin(slot)
        if prefix_key is not None:
            self.prefix_pins[prefix_key] -= 1
            if prefix_key in self._dropped:
                self.drop(prefix_key)
            self._trim_prefixes()

    # -- slots ----------------------------------------------------------------------------
    def _unpin(self, slot: int) -> None:
        self.pins[slot] -= 1
        if self.pins[slot] == 0:
            self.lru[slot] = None
            if self.slot_key[slot] in self._dropped:
                self.drop(self.slot_key[slot])

    def _acquire_slot(self, adapter) -> int | None:
        slot = self.key_slot.get(adapter.key)
        if slot is not None:
            self.stats["hits"] += 1
        else:
            slot = self._free_slot()
            if slot is None:
                return None  # all slots pinned by running requests of other adapters: wait
            t0 = time.perf_counter()
            try:
                self._device_weights(adapter)(self.layers, slot)
            except BaseException:  # a half-installed slot must not leak modules into its next owner
                self.layers.clear(slot)
                raise
            self.slot_key[slot], self.key_slot[adapter.key] = adapter.key, slot
            self.stats["loads"] += 1
            if self.observer:
                self.observer.on_adapter_load(adapter, time.perf_counter() - t0)
        self.lru.pop(slot, None)
        self.pins[slot] = self.pins.get(slot, 0) + 1
        return slot

    def _free_slot(self) -> int | None:
        for slot in range(1, self.num_slots + 1):
            if slot not in self.slot_key:
                return slot
        if not self.lru:
            return None
        slot, _ = self.lru.popitem(last=False)  # least recently used unpinned slot
        self.evict_slot(slot)
        return slot

    def evict_slot(self, slot: int) -> None:
        key = self.slot_key.pop(slot)
        del self.key_slot[key]
        self.pins.pop(slot, None)
        self.lru.pop(slot, None)
        self.layers.clear(slot)
        self.stats["evictions"] += 1
        if self.observer:
            self.observer.on_adapter_evict()

    def drop(self, key: str) -> None:
        """Forget an adapter version (deleted/replaced) once nothing running uses it."""
        slot = self.key_slot.get(key)
        slot_busy = slot is not None and self.pins.get(slot, 0) > 0
        prefix_busy = self.prefix_pins.get(key, 0) > 0
        if slot is not None and not slot_busy:
            self.evict_slot(slot)
        if key in self.prefixes and not prefix_busy:
            del self.prefixes[key]
        if slot_busy or prefix_busy:
            self._dropped.add(key)  # free it when its last running request finishes
        else:
            self._dropped.discard(key)

    def reset(self) -> None:
        """Forget every pin and empty every slot (the engine supervisor, after the loop died).

        The loop can die anywhere — between a reserve and its admission, half-way through an
        install or a merge — so nothing per-sequence is trusted: merged weights are restored,
        every device slot is cleared (adapters reinstall on their next request) and shared
        prefixes stay cached (immutable per version) unless their version was dropped meanwhile.
        """
        self.layers.merger.unmerge()
        for slot in range(1, self.num_slots + 1):
            self.layers.clear(slot)
        self.slot_key.clear()
        self.key_slot.clear()
        self.pins.clear()
        self.lru.clear()
        self._held.clear()
        self.prefix_pins.clear()
        for key in self._dropped:
            self.prefixes.pop(key, None)
        self._dropped.clear()

    @property
    def resident(self) -> int:
        return len(self.slot_key)

    # -- KV prefixes ----------------------------------------------------------------------
    def _prefix(self, adapter) -> KVPrefix:
        prefix = self.prefixes.get(adapter.key)
        if prefix is None:
            prefix = self._compute_prefix(adapter)
            self.stats["prefix_computes"] += 1
            self.prefixes[adapter.key] = prefix
        self.prefixes.move_to_end(adapter.key)
        self._trim_prefixes()
        return prefix

    def _trim_prefixes(self) -> None:
        total = sum(p.nbytes for p in self.prefixes.values())
        for key in list(self.prefixes):
            if total <= self.max_prefix_bytes:
                break
            if self.prefix_pins.get(key, 0) == 0:
                total -= self.prefixes.pop(key).nbytes
