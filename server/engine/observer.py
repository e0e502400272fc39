"""What the engine tells the rest of the server: events through an observer, state through a snapshot.

Both channels point one way, out of the engine thread, so nothing outside it ever reads the
structures the engine thread mutates (the scheduler's queues, the KV-slot allocator, the adapter
device tier) — reading them from the event loop raced with the step (a `deque mutated during
iteration` RuntimeError was caught and hidden in the scrape).

- `EngineObserver`: per-event callbacks, called synchronously on the engine thread (a step ran,
  a token was emitted, a request finished, an adapter was installed in / evicted from a device
  slot). Implementations must be cheap and thread-safe towards their own readers;
  `peftserve.server.metrics.Metrics` implements it with prometheus_client.
- `EngineSnapshot`: the live state other threads may read (queue depths, KV-slot and adapter-slot
  use), built by the engine thread (`LLMEngine.snapshot()`) and published by `AsyncEngine` after
  every loop iteration that changed something and after a supervisor reset, by rebinding one
  attribute. The snapshot is frozen and holds only immutable values, and rebinding an attribute
  is atomic in CPython, so a reader takes `engine.snapshot` once and gets one consistent state,
  without a lock and without ever blocking the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol, runtime_checkable

from .request import Sequence


@runtime_checkable
class EngineObserver(Protocol):
    """Engine-thread event callbacks. An exception raised here fails at most the request it
    concerns (engine.py), never the step; keep them cheap: they run inside the step."""

    def on_step(self, batch_size: int, num_tokens: int, seconds: float) -> None:
        """A step ran `batch_size` rows, `num_tokens` tokens in all, in `seconds` (forward to emit)."""

    def on_token(self, seq: Sequence, now: float) -> None:
        """`seq` emitted a token at `now` (time.monotonic); `seq.last_token_at` is still the previous one."""

    def on_finish(self, seq: Sequence, now: float) -> None:
        """`seq` finished (`seq.finish_reason` is set); `now` is 0.0 when the supervisor failed it."""

    def on_adapter_load(self, adapter, seconds: float) -> None:
        """The device tier installed `adapter` (a registry version) in a slot, taking `seconds`."""

    def on_adapter_evict(self) -> None:
        """The device tier evicted an adapter from a slot."""


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's live state as of one moment on the engine thread (every field immutable).

    Counts are of sequences (requests, or one `n` choice each); `waiting` is the scheduler's
    queue only — `AsyncEngine.num_waiting` adds the submissions not drained into it yet.
    """

    running: int = 0  # sequences admitted to the batch (each holds KV blocks)
    waiting: int = 0  # sequences queued in the scheduler, not admitted yet
    kv_blocks_free: int = 0  # KV pool blocks not held by a sequence or a KV prefix
    kv_blocks_total: int = 0  # the pool's blocks (engine/kv_cache.py; --kv-cache-bytes)
    kv_block_size: int = 0  # tokens per block
    kv_prefix_blocks: int = 0  # ... of the used ones, those of cached KV prefixes (shared, reclaimable)
    preemptions: int = 0  # running sequences whose KV blocks were taken back (pool full)
    running_adapters: tuple[str, ...] = ()  # sorted distinct adapter names of the running sequences
    waiting_adapters: tuple[str, ...] = ()  # same for the waiting ones
    max_adapters_per_batch: int = 0  # EngineConfig.max_adapters_per_batch
    # adapter device tier; None when the engine runs without one (base model only)
    adapter_slots_total: int | None = None
    device_versions: frozenset[str] = frozenset()  # version keys installed in a device slot
    pinned_versions: frozenset[str] = frozenset()  # ... of which a running sequence uses these
    adapter_device_bytes: int = 0  # device bytes reserved by the installed weight adapters
    adapter_device_budget: int | None = None  # --max-adapter-bytes (None: no byte bound)
    steps: int = 0  # engine steps that processed tokens since the AsyncEngine was made
    resets: int = 0  # supervisor resets of the engine's per-request state (crashed loops)

    @property
    def kv_blocks_used(self) -> int:
        return self.kv_blocks_total - self.kv_blocks_free

    @property
    def kv_blocks_requests(self) -> int:
        """Blocks held by requests themselves (0 whenever the engine is idle: a leak check)."""
        return self.kv_blocks_used - self.kv_prefix_blocks

    @property
    def kv_usage(self) -> float:
        """Fraction of KV pool blocks in use, 0..1 (0 for an engine without a pool)."""
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0

    @property
    def adapter_slots_resident(self) -> int:
        """Device slots holding an adapter (pinned or not)."""
        return len(self.device_versions)


def adapter_names(seqs: Iterable[Sequence]) -> tuple[str, ...]:
    """Sorted distinct names of the adapters `seqs` use (base-model sequences add none)."""
    return tuple(sorted({seq.adapter.name for seq in seqs if seq.adapter is not None}))


@dataclass(frozen=True)
class DeviceResidency:
    """The adapter device tier's slots as of one moment (engine thread builds it)."""

    slots_total: int  # device slots for weight adapters (slot 0 = none is not counted)
    versions: frozenset[str]  # version keys installed in a slot
    pinned: frozenset[str]  # ... of which a running sequence uses these
    prefix_blocks: int = 0  # KV pool blocks held by cached KV prefixes
    device_bytes: int = 0  # bytes reserved by the installed weight adapters
    device_budget: int | None = None  # their byte budget (None: none)


def device_residency(residency: DeviceResidency | None) -> dict:
    """EngineSnapshot fields for the runtime's `residency()` (None: base model only, no tier)."""
    if residency is None:
        return {}
    return {"adapter_slots_total": residency.slots_total, "device_versions": residency.versions,
            "pinned_versions": residency.pinned, "kv_prefix_blocks": residency.prefix_blocks,
            "adapter_device_bytes": residency.device_bytes, "adapter_device_budget": residency.device_budget}
