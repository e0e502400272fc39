"""What the engine needs from the adapter runtime, as a Protocol: the engine never imports the
runtime package (server/runtime/ implements this; base-only serving uses `NoAdapters`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from .observer import DeviceResidency
from .request import Sequence
from .step_state import AdapterBatch

if TYPE_CHECKING:
    from .runner import ModelRunner


class AdapterRuntime(Protocol):
    def reserve(self, seq: Sequence, running: list[Sequence]) -> bool:
        """Scheduler, per waiting sequence: pin a device slot (bookkeeping only); False = wait."""

    def activate(self, admitted: list[Sequence], runner: ModelRunner) -> list[tuple[Sequence, Exception]]:
        """Engine, once per step, after admission: install weights, attach KV prefixes (blocks).
        -> the sequences that failed with why (already released); the engine fails those rows."""

    def prepare(self, batch: AdapterBatch) -> None:
        """Runner, before every forward: adaptive merge, then the batch to the wrapped layers."""

    def release(self, seq: Sequence) -> None: ...

    def enable_gather(self, max_rank: int, max_bottleneck: int) -> None:
        """Engine, at start-up, for fixed-shape decode steps: keep adapters in gathered-op stacks
        (LoRA up to `max_rank`, bottleneck up to `max_bottleneck`)."""

    def gather_ready(self, slots: set[int]) -> bool:
        """Runner, per decode step: can the gathered ops serve these adapter slots?"""

    gather_generation: int  # changes whenever the gathered ops of a step change (graphs go stale)

    def reclaim_kv(self, blocks: int) -> int:
        """Scheduler, when the KV pool is full: free up to `blocks` pool blocks held by idle KV
        prefixes (not pinned by a running sequence); -> blocks freed."""

    def reset(self) -> None:
        """Forget every pin and slot (after the engine loop died)."""

    def residency(self) -> DeviceResidency | None:
        """What the device tier holds, for the engine snapshot; None = no device tier."""


class NoAdapters:
    """The base-only runtime: admits base requests, refuses none, attaches nothing."""

    def reserve(self, seq, running):
        return seq.adapter is None

    def activate(self, admitted, runner):
        return []

    def prepare(self, batch):
        pass

    def release(self, seq):
        pass

    def enable_gather(self, max_rank, max_bottleneck):
        pass

    def gather_ready(self, slots):
        return slots <= {0}

    gather_generation = 0

    def reclaim_kv(self, blocks):
        return 0

    def reset(self):
        pass

    def residency(self):
        return None
