"""Bookkeeping of the device tier: which adapter version holds which device slot, and the shared
KV prefixes of prompt adapters. Pure bookkeeping: nothing here copies weights or runs the model
(server/runtime/runtime.py does, in `activate`).

- Weight adapters (LoRA, (IA)3, bottleneck) live in one of `num_slots` device slots (slot 0 =
  none), and together in at most `max_bytes` of device memory (`--max-adapter-bytes`: the
  entries' bytes, reserved when the slot is). A slot is pinned while any running sequence uses
  it; unpinned slots are evicted LRU, for a free slot or for bytes. When pinned adapters leave
  no slot or no room, a new adapter's request waits (never fails); one adapter larger than the
  whole budget still runs, alone.
- Prompt adapters become a per-layer KV prefix computed once per adapter *version* (content
  hash, never the name) into blocks of the engine's paged KV pool, and referenced in place by
  every sequence of that version (`Sequence.kv_prefix_blocks`): after the first request a
  soft-prompt or prefix row costs no extra prefill and no KV memory of its own for the prefix.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable


@dataclass
class KVPrefix:
    """A prompt adapter's virtual tokens, K/V at positions 0..length-1 of `blocks` in the pool."""

    blocks: list[int]
    length: int
    nbytes: int  # pool bytes the blocks hold
    release: Callable[[list[int]], None]  # gives the blocks back to the pool (KVCache.free)


class DeviceSlots:
    """slot <-> version key, pins and the LRU order of unpinned resident slots."""

    def __init__(self, num_slots: int, max_bytes: int | None = None):
        self.num_slots = num_slots
        self.max_bytes = max_bytes  # None: slots alone bound the device tier
        self.slot_key: dict[int, str] = {}  # slot -> adapter version key
        self.key_slot: dict[str, int] = {}
        self.slot_bytes: dict[int, int] = {}  # slot -> device bytes reserved for its adapter
        self.pins: dict[int, int] = {}  # slot -> running sequences using it
        self.lru: OrderedDict[int, None] = OrderedDict()  # unpinned resident slots, oldest first

    def free_slot(self) -> tuple[int | None, str | None]:
        """-> (a slot to assign, the key it held before or None); (None, None) when every slot
        is pinned. Taking an occupied slot only unassigns it: its owner's entries stay in the
        layers until the new owner is installed over them."""
        for slot in range(1, self.num_slots + 1):
            if slot not in self.slot_key:
                return slot, None
        if not self.lru:
            return None, None
        slot, _ = self.lru.popitem(last=False)  # least recently used unpinned slot
        return slot, self.unassign(slot)

    @property
    def resident_bytes(self) -> int:
        return sum(self.slot_bytes.values())

    def room_for(self, nbytes: int) -> list[int] | None:
        """Unpinned slots to evict, least recently used first, so that `nbytes` more fit the byte
        budget; None when they cannot (pinned adapters hold the room: wait). Nothing changes here."""
        if self.max_bytes is None:
            return []
        resident, victims = self.resident_bytes, []
        for slot in self.lru:
            if resident + nbytes <= self.max_bytes:
                break
            victims.append(slot)
            resident -= self.slot_bytes.get(slot, 0)
        if resident + nbytes <= self.max_bytes or resident == 0:  # resident == 0: it runs alone
            return victims
        return None

    def assign(self, slot: int, key: str, nbytes: int = 0) -> None:
        self.slot_key[slot], self.key_slot[key] = key, slot
        self.slot_bytes[slot] = nbytes

    def unassign(self, slot: int) -> str:
        key = self.slot_key.pop(slot)
        del self.key_slot[key]
        self.slot_bytes.pop(slot, None)
        self.pins.pop(slot, None)
        self.lru.pop(slot, None)
        return key

    def pin(self, slot: int) -> None:
        self.lru.pop(slot, None)
        self.pins[slot] = self.pins.get(slot, 0) + 1

    def unpin(self, slot: int) -> bool:
        """-> True when no running sequence uses the slot any more (it joins the LRU)."""
        self.pins[slot] -= 1
        if self.pins[slot]:
            return False
        self.lru[slot] = None
        return True

    def busy(self, slot: int) -> bool:
        return self.pins.get(slot, 0) > 0

    def reset(self) -> None:
        self.slot_key.clear()
        self.key_slot.clear()
        self.slot_bytes.clear()
        self.pins.clear()
        self.lru.clear()


class PrefixCache:
    """KV prefixes per version key, LRU under a byte budget; pinned ones are never evicted.

    Entries own their pool blocks: evicting or discarding one gives its blocks back."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.prefixes: OrderedDict[str, KVPrefix] = OrderedDict()
        self.pins: dict[str, int] = {}

    def get(self, key: str) -> KVPrefix | None:
        prefix = self.prefixes.get(key)
        if prefix is not None:
            self.prefixes.move_to_end(key)
        return prefix

    def put(self, key: str, prefix: KVPrefix) -> None:
        self.discard(key)
        self.prefixes[key] = prefix

    def pin(self, key: str) -> None:
        self.pins[key] = self.pins.get(key, 0) + 1

    def unpin(self, key: str) -> None:
        self.pins[key] -= 1

    def busy(self, key: str) -> bool:
        return self.pins.get(key, 0) > 0

    def discard(self, key: str) -> None:
        prefix = self.prefixes.pop(key, None)
        if prefix is not None:
            prefix.release(prefix.blocks)

    def trim(self) -> None:
        """Evict unpinned prefixes, least recently used first, until the budget holds."""
        total = sum(p.nbytes for p in self.prefixes.values())
        self._evict_idle(total - self.max_bytes, lambda p: p.nbytes)

    def reclaim(self, blocks: int) -> int:
        """Evict unpinned prefixes, least recently used first, until `blocks` pool blocks are
        freed (the KV pool is full); -> blocks freed."""
        return self._evict_idle(blocks, lambda p: len(p.blocks))

    def _evict_idle(self, need: int, size: Callable[[KVPrefix], int]) -> int:
        """Discard unpinned prefixes, LRU first, until their `size`s add up to `need`; -> that sum."""
        freed = 0
        for key in list(self.prefixes):
            if freed >= need:
                break
            if not self.busy(key):
                freed += size(self.prefixes[key])
                self.discard(key)
        return freed

    def forget(self) -> None:
        """Drop every entry without releasing blocks: the pool itself was reset (engine reset)."""
        self.prefixes.clear()
        self.pins.clear()
