"""The device tier: how a request's adapter reaches the frozen base model. Implements the
engine's `AdapterRuntime` (server/engine/adapter_runtime.py) and the registry's `DeviceTier`;
runs on the engine thread only.

Per request, in step order:

1. `reserve(seq, running)` — scheduler, pure bookkeeping: picks and pins a device slot for a
   weight adapter (or says "wait" when every slot is pinned by other adapters). No weight copy,
   no forward, cannot fail a request.
2. `activate(admitted, runner)` — engine, once per step for the newly admitted sequences:
   installs the weights of newly assigned slots (`kind.to_device` + `kind.install`), computes or
   fetches prompt adapters' KV prefixes (`kind.prefix`, blocks of the KV pool) and hands their
   blocks to the sequences by reference. Returns the sequences that failed, with their exception (already released here); the
   engine fails those rows alone.
3. `prepare(batch)` — runner, before every forward: the adaptive merge decision
   (server/runtime/merge.py), then the step's AdapterBatch goes to the wrapped layers.
4. `release(seq)` — engine, when a request finishes: unpins; a version dropped meanwhile
   leaves the device once its last request is done.

`drop(key)` (registry: a version was replaced or deleted) and `reset()` (supervisor, after the
engine loop died) complete the interface. Everything per kind goes through `KINDS`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

import torch

from peftserve.adapters.config import AdapterKind

from ..engine.kv_cache import KVCacheFull
from ..engine.observer import DeviceResidency
from ..engine.request import Sequence
from ..engine.step_state import AdapterBatch, AdapterMode
from .kinds import KINDS, KindHandler, WeightDtype, WeightKind
from .layers import AdapterLayers
from .merge import MergePolicy, Merger
from .slots import DeviceSlots, KVPrefix, PrefixCache

if TYPE_CHECKING:
    from ..engine.runner import ModelRunner

log = logging.getLogger(__name__)


@dataclass
class Hold:
    """What one running sequence pins: a device slot (0 = none) and a KV prefix key (or None)."""

    slot: int = 0
    prefix_key: str | None = None


class DeviceRuntime:
    def __init__(self, layers: AdapterLayers, num_slots: int, dtype: torch.dtype, device: torch.device,
                 merge_policy: MergePolicy = MergePolicy.NEVER, merge_min_steps: int = 4,
                 max_prefix_bytes: int = 512 << 20, observer=None,
                 kinds: Mapping[AdapterKind, KindHandler] = KINDS, adapter_dtype: torch.dtype = torch.float32,
                 max_adapter_bytes: int | None = None):
        """observer: `on_adapter_load(ver, seconds)`, `on_adapter_evict()` (metrics) or None.
        adapter_dtype: storage dtype of kinds with `weight_dtype == "adapter"` (LoRA); the others
        are stored in the model dtype `dtype`. max_adapter_bytes: device bytes all installed weight
        adapters may take together (None: only `num_slots` bounds them)."""
        self.layers = layers
        self.kinds = dict(kinds)
        self.dtype, self.device = dtype, device  # where and how weight adapters are installed
        self.adapter_dtype = adapter_dtype
        self.slots = DeviceSlots(num_slots, max_adapter_bytes)
        self.prefixes = PrefixCache(max_prefix_bytes)
        self.merger = Merger(merge_policy, merge_min_steps)
        self.mergeable: set[int] = set()  # slots holding a kind the merger may fold in (LoRA)
        # Gathered decode (enable_gather): the stacks' widths by kind (None = off) and the slots whose
        # adapter is wholly in the stacks, i.e. that a fixed-shape decode step can serve
        self.gather_widths: dict[str, int] | None = None
        self.gatherable: set[int] = set()
        self.gather_generation = 0  # grows whenever stacks are added (the ops of a gathered step change)
        self._pending: dict[int, object] = {}  # slot -> version reserved there, installed by activate
        self._held: dict[int, Hold] = {}  # seq_id -> its pins
        self._dropped: set[str] = set()  # deleted/replaced versions still pinned by running requests
        self.observer = observer
        self.stats = {"loads": 0, "evictions": 0, "hits": 0, "prefix_computes": 0, "staged_installs": 0}
        # key -> device weights precomputed off the engine thread (`stage`); consumed by `_install`
        self._staged: OrderedDict[str, tuple[object, int]] = OrderedDict()  # key -> (weights, host bytes)
        self._staging: dict[str, threading.Event] = {}  # key -> set when its staging ends
        self._stage_lock = threading.Lock()
        self.max_staged = max(2, num_slots)
        self.max_staged_bytes = 256 << 20  # staged copies waiting for an install (beyond the newest)

    @property
    def num_slots(self) -> int:
        return self.slots.num_slots

    @property
    def resident(self) -> int:
        """Versions holding a device slot."""
        return len(self.slots.slot_key)

    def is_resident(self, key: str) -> bool:
        return key in self.slots.key_slot

    def device_bytes(self) -> int:
        """Bytes of the installed weight-kind entries (in their storage dtype: LoRA's A, B (and
        their transposes, where those are copies) at `--adapter-dtype`; (IA)3 and bottleneck at
        the model dtype), not counting derived caches (LoRA's grouped stacks). Walks every wrapped
        module: for reports, not steps."""
        total = 0
        for module in (*self.layers.linears.values(), *self.layers.sublayers.values()):
            for per_slot in module.entries.values():
                for w in per_slot.values():
                    total += getattr(w, "nbytes", None) or sum(
                        t.numel() * t.element_size() for t in vars(w).values() if isinstance(t, torch.Tensor))
        return total

    def residency(self) -> DeviceResidency:
        """For the engine snapshot (engine thread): installed and pinned versions."""
        keys = self.slots.slot_key
        return DeviceResidency(self.num_slots, frozenset(keys.values()),
                               frozenset(k for slot, k in keys.items() if self.slots.busy(slot)),
                               sum(len(p.blocks) for p in self.prefixes.prefixes.values()),
                               self.slots.resident_bytes, self.slots.max_bytes)

    # -- 0. stage (any thread) -------------------------------------------------------------
    def stage(self, ver) -> bool:
        """Precompute `ver`'s device weights (`kind.to_device`: copies in the storage dtype, pre-transposed
        for the matmuls) on the calling thread — the registry calls it from a request's or an
        upload's worker thread — so that `activate` on the engine thread only installs. Only when
        the device is the CPU (the copy is host memory either way; on an accelerator device memory
        belongs to the slots) and the version is not installed already. At most `max_staged`
        copies and `max_staged_bytes` (by the versions' host sizes) wait, oldest dropped first; a
        drop or reset discards them. -> whether staged."""
        kind = self.kinds.get(ver.kind)
        if (self.device.type != "cpu" or kind is None or not kind.uses_slot or ver.loaded is None
                or ver.key in self.slots.key_slot):  # racy read, a hint only: installed versions need nothing
            return False
        with self._stage_lock:
            if ver.key in self._staged or ver.key in self._staging:
                return False
            done = self._staging[ver.key] = threading.Event()
        weights = None
        try:
            weights = kind.to_device(ver, self._weight_dtype(kind), self.device)
        finally:
            with self._stage_lock:
                self._staging.pop(ver.key, None)
                if weights is not None:
                    self._staged[ver.key] = (weights, int(getattr(ver, "nbytes", 0) or 0))
                    while len(self._staged) > 1 and (len(self._staged) > self.max_staged or sum(
                            n for _, n in self._staged.values()) > self.max_staged_bytes):
                        self._staged.popitem(last=False)
            done.set()
        return True

    def _weight_dtype(self, kind: WeightKind) -> torch.dtype:
        """The storage dtype `kind.to_device` gets: --adapter-dtype for the kinds that take it."""
        return self.adapter_dtype if kind.weight_dtype is WeightDtype.ADAPTER else self.dtype

    def _take_staged(self, key: str, wait_s: float = 0.25):
        """The staged copy of `key`, if any; one being staged right now is waited for (briefly:
        copying it here would take as long, on a core the stager is already using)."""
        with self._stage_lock:
            staged = self._staged.pop(key, None)
            pending = self._staging.get(key) if staged is None else None
        if pending is not None and pending.wait(wait_s):
            with self._stage_lock:
                staged = self._staged.pop(key, None)
        return None if staged is None else staged[0]

    def _discard_staged(self, key: str | None = None) -> None:
        with self._stage_lock:
            if key is None:
                self._staged.clear()
            else:
                self._staged.pop(key, None)

    # -- 1. reserve (scheduler) -----------------------------------------------------------
    def reserve(self, seq: Sequence, running: list[Sequence]) -> bool:
        """Pin what `seq` needs beyond a KV row; False = wait (every slot pinned by others)."""
        adapter = seq.adapter
        if adapter is None:
            return True
        slot = 0
        if self.kinds[adapter.kind].uses_slot:
            slot = self._reserve_slot(adapter)
            if slot is None:
                return False
        seq.adapter_slot = slot
        self._held[seq.seq_id] = Hold(slot)
        return True

    def _reserve_slot(self, ver) -> int | None:
        slot = self.slots.key_slot.get(ver.key)
        if slot is not None:
            self.stats["hits"] += 1
        else:
            nbytes = self._device_nbytes(ver)
            victims = self.slots.room_for(nbytes)
            if victims is None:
                return None  # pinned adapters of running requests hold the byte budget: wait
            for victim in victims:
                self._evict(victim)
            slot, evicted = self.slots.free_slot()
            if slot is None:
                return None  # all slots pinned by running requests of other adapters: wait
            if evicted is not None:
                self._count_eviction()
            self.slots.assign(slot, ver.key, nbytes)
            self._pending[slot] = ver
        self.slots.pin(slot)
        return slot

    def _device_nbytes(self, ver) -> int:
        """What `ver`'s install will take of the byte budget. Reserve runs in the scheduler, where
        an exception would stop the step for everyone: a version whose weights cannot be measured
        counts its host size (its install then fails for its own requests alone)."""
        kind = self.kinds[ver.kind]
        try:
            return kind.device_nbytes(ver, self._weight_dtype(kind))
        except Exception:
            return int(getattr(ver, "nbytes", 0) or 0)

    # -- 2. activate (engine, newly admitted sequences) -----------------------------------
    def activate(self, admitted: list[Sequence], runner: ModelRunner) -> list[tuple[Sequence, Exception]]:
        """Install new slots, attach KV prefixes; -> [(failed sequence, why)], already released."""
        broken = self._install_pending()
        failures = []
        for seq in admitted:
            hold = self._held.get(seq.seq_id)
            if hold is None:
                continue  # base request
            exc = broken.get(hold.slot)
            if exc is None:
                try:
                    self._attach_prefix(seq, hold, runner)
                except Exception as e:  # e.g. out of memory computing the prefix: this row only
                    exc = e
            if exc is not None:
                if hold.slot in broken:
                    hold.slot = 0  # the broken slot was already given back as a whole
                self.release(seq)
                failures.append((seq, exc))
        return failures

    def _install_pending(self) -> dict[int, Exception]:
        """Install every slot reserved this step; -> {slot: why} for those that failed (emptied
        and unassigned, so the adapter's next request tries again)."""
        broken: dict[int, Exception] = {}
        pending, self._pending = self._pending, {}
        for slot, ver in pending.items():
            try:
                self._install(slot, ver)
            except BaseException as exc:  # a half-installed slot must not leak modules into its next owner
                self._clear_slot(slot)
                self.slots.unassign(slot)
                if not isinstance(exc, Exception):
                    raise
                broken[slot] = exc
        return broken

    def _install(self, slot: int, ver) -> None:
        kind = self.kinds[ver.kind]
        t0 = time.perf_counter()
        if self.merger.merged_slot == slot:  # the slot's previous owner is folded into the base
            self.merger.unmerge()
        self._clear_slot(slot)  # the previous owner's entries (taken over at reserve)
        weights = self._take_staged(ver.key)
        if weights is None:
            weights = kind.to_device(ver, self._weight_dtype(kind), self.device)
        else:
            self.stats["staged_installs"] += 1
        self._grow_stacks(kind, weights)
        gathered = kind.install(self.layers, slot, weights)
        if kind.mergeable:
            self.mergeable.add(slot)
        if gathered:
            self.gatherable.add(slot)
        self.stats["loads"] += 1
        if self.observer:
            self.observer.on_adapter_load(ver, time.perf_counter() - t0)

    def _clear_slot(self, slot: int) -> None:
        """Empty a slot in every wrapped module (entries and gathered stacks) and forget its flags."""
        self.layers.clear(slot)
        self.mergeable.discard(slot)
        self.gatherable.discard(slot)

    def _attach_prefix(self, seq: Sequence, hold: Hold, runner: ModelRunner) -> None:
        """Prompt kinds: the version's KV prefix (computed once, then cached) into seq's KV row."""
        ver = seq.adapter
        kind = self.kinds[ver.kind]
        if not kind.uses_prefix:
            return
        prefix = self._prefix(ver, kind, runner)
        self.prefixes.pin(ver.key)
        hold.prefix_key = ver.key
        seq.kv_prefix_len = prefix.length
        seq.kv_prefix_blocks = prefix.blocks  # shared in place, never copied

    def _prefix(self, ver, kind: KindHandler, runner: ModelRunner) -> KVPrefix:
        prefix = self.prefixes.get(ver.key)
        if prefix is None:
            try:
                prefix = kind.prefix(ver, runner)
            except KVCacheFull:  # idle prefixes of other versions make room, once
                self.prefixes.reclaim(runner.cache.pool.capacity)
                prefix = kind.prefix(ver, runner)
            self.stats["prefix_computes"] += 1
            self.prefixes.put(ver.key, prefix)
        self.prefixes.trim()
        return prefix

    # -- gathered decode: fixed-address stacks for fixed-shape (graph) steps -------------
    def enable_gather(self, max_rank: int, max_bottleneck: int = 256) -> None:
        """Keep every slot of the gathering kinds (LoRA up to rank `max_rank`, (IA)3, bottleneck up
        to size `max_bottleneck`) in fixed-address `[slots + 1, ...]` stacks too, for fixed-shape
        decode steps. A wrapped module gets its stacks when the first adapter reaching it is
        installed (modules no adapter targets cost neither memory nor a gathered op per step:
        `(in + out) x max_rank x (slots + 1)` adapter-dtype values per LoRA-targeted linear); each
        time that adds stacks, `gather_generation` grows, and graphs captured before no longer match
        the step's ops."""
        self.gather_widths = {"max_lora_rank": max_rank, "max_bottleneck_size": max_bottleneck}

    def _sites(self, kind: KindHandler) -> dict:
        return self.layers.linears if kind.site == "linear" else self.layers.sublayers

    def _grow_stacks(self, kind: KindHandler, weights) -> None:
        """Stacks of `kind` at every site of `weights` that has none yet (before installing there)."""
        if self.gather_widths is None or not getattr(kind, "gathers", False):
            return
        grown = False
        sites = self._sites(kind)
        for site, w in weights.items():
            module = sites[site]
            if kind not in module.gathered:
                module.gathered[kind] = kind.new_stacks(module, self.num_slots, self.gather_widths[kind.gather_width],
                                                        self._weight_dtype(kind), self.device, w)
                grown = True
        if grown:
            self.gather_generation += 1
            log.info("adapter stacks added for fixed-shape decode", extra={"generation": self.gather_generation})

    def gather_ready(self, slots: set[int]) -> bool:
        """Can one gathered (fixed-shape) step serve rows of these slots? Slot 0 always can; an
        adapter wider than its stacks (LoRA rank, bottleneck size) cannot."""
        return self.gather_widths is not None and all(s == 0 or s in self.gatherable for s in slots)

    # -- 3. prepare (runner, before every forward) ----------------------------------------
    def prepare(self, batch: AdapterBatch) -> None:
        """Merge or unmerge a LoRA for this step, then hand the batch to the wrapped layers.
        A gathered step applies every slot from the stacks: nothing may be merged then."""
        if batch.mode is AdapterMode.GATHER:
            self.merger.unmerge()
            self.layers.set_batch(batch)
            return
        target = self.merger.decide(batch, self.mergeable)
        if target != self.merger.merged_slot:
            self.merger.unmerge()
            if target:
                self.merger.merge(self._mergeable_entries(target), target)
        # While merged, the LoRA lives in the base weights: the wrappers must not add it again.
        self.layers.set_batch(AdapterBatch(batch.token_slots, []) if target else batch)

    def _mergeable_entries(self, slot: int) -> list[tuple[object, object]]:
        """[(AdapterLinear, its entry for `slot`)] of the mergeable kind in that slot."""
        pairs = []
        for lin in self.layers.linears.values():
            for kind, per_slot in lin.entries.items():
                if kind.mergeable and slot in per_slot:
                    pairs.append((lin, per_slot[slot]))
        return pairs

    # -- 4. release, drop, reset ----------------------------------------------------------
    def release(self, seq: Sequence) -> None:
        hold = self._held.pop(seq.seq_id, None)
        if hold is None:
            return
        if hold.slot and self.slots.unpin(hold.slot):
            key = self.slots.slot_key[hold.slot]
            if key in self._dropped:
                self.drop(key)
        if hold.prefix_key is not None:
            self.prefixes.unpin(hold.prefix_key)
            if hold.prefix_key in self._dropped:
                self.drop(hold.prefix_key)
            self.prefixes.trim()

    def drop(self, key: str) -> None:
        """Forget an adapter version (deleted/replaced) once nothing running uses it."""
        self._discard_staged(key)
        slot = self.slots.key_slot.get(key)
        slot_busy = slot is not None and self.slots.busy(slot)
        prefix_busy = self.prefixes.busy(key)
        if slot is not None and not slot_busy:
            self._evict(slot)
        if not prefix_busy:
            self.prefixes.discard(key)
        if slot_busy or prefix_busy:
            self._dropped.add(key)  # free it when its last running request finishes
        else:
            self._dropped.discard(key)

    def _evict(self, slot: int) -> None:
        self.slots.unassign(slot)
        if self.merger.merged_slot == slot:
            self.merger.unmerge()
        self._clear_slot(slot)
        self._count_eviction()

    def _count_eviction(self) -> None:
        self.stats["evictions"] += 1
        if self.observer:
            self.observer.on_adapter_evict()

    def reset(self) -> None:
        """Forget every pin and empty every slot (the engine supervisor, after the loop died).

        The loop can die anywhere — between a reserve and its activation, half-way through an
        install or a merge — so nothing per-sequence is trusted: merged weights are restored,
        every device slot is cleared (adapters reinstall on their next request) and the shared
        prefixes are forgotten: the engine resets its KV pool, blocks included (they are
        recomputed on their next request).
        """
        self.merger.unmerge()
        self._discard_staged()
        for slot in range(1, self.num_slots + 1):
            self.layers.clear(slot)
        self.slots.reset()
        self.mergeable.clear()
        self.gatherable.clear()
        self._pending.clear()
        self._held.clear()
        self.prefixes.forget()  # their blocks went back with the engine's KV pool reset
        self._dropped.clear()

    def reclaim_kv(self, blocks: int) -> int:
        """The KV pool is full: evict idle (unpinned) prefixes, LRU first, until `blocks` pool
        blocks are free again; -> blocks freed."""
        return self.prefixes.reclaim(blocks)
