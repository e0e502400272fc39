"""A warm host buffer for the next adapter load: faulting in fresh memory costs more than the copy.

Why: a loaded LoRA's weights are one copy of the upload (adapters/lora.py), into memory the
process has never touched. On the 2-core VM we measure on, the page faults of 7.4 MB cost ~3.5 ms
(the copy itself ~2 ms), on the thread that answers the upload: upload -> first token has a
20 ms budget. So after each load a spare of the same size is faulted in on a background thread,
off that path (`replenish`: when the next upload starts streaming in, or once an in-process
load's answer is out), and the next load of a similar size takes it (a platform's adapters
usually share a configuration, hence a size). A load that finds no fitting spare allocates as
before.

`take(numel)` -> a float32 [>= numel] CPU tensor (contents unspecified; the caller overwrites what
it uses). A spare is taken when `numel <= spare <= numel * (1 + SLACK)`, so a load never keeps
more than SLACK beyond its own bytes alive; spares are at most `MAX_BYTES`, one at a time. The
cost: one idle spare of the last load's size (at most MAX_BYTES) stays resident.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

MAX_BYTES = 64 << 20
SLACK = 1 / 8
WAIT_S = 0.02  # longest `take` waits for a fitting prefault under way (faulting in 64 MB: ~30 ms)
_PAGE_FLOATS = 1024  # float32 per 4 KiB page: touching one per page faults the whole buffer in


class HostArena:
    def __init__(self, max_bytes: int = MAX_BYTES, slack: float = SLACK):
        self.max_bytes, self.slack = max_bytes, slack
        self._spare: torch.Tensor | None = None  # [n] float32, resident
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-prefault",
                                        initializer=_idle_priority)
        self._wanted: int | None = None  # the size last taken: the next spare's
        self._pending: Future | None = None  # the prefault under way, of `_pending_numel` floats
        self._pending_numel = 0
        self.stats = {"warm": 0, "cold": 0}

    def take(self, numel: int) -> torch.Tensor:
        pending = self._pending
        if pending is not None and self._fits_size(self._pending_numel, numel):
            # A fitting spare is being faulted in (e.g. started when this upload began): finish
            # it rather than fault in a fresh buffer here. Waiting frees this core for the
            # prefault thread, so the wait is at most what faulting in our own would cost.
            try:
                pending.result(timeout=WAIT_S)
            except Exception:  # (a timeout, or a failed prefault: allocate below as before)
                pass
        with self._lock:
            spare = self._spare
            fits = self._fits(spare, numel)
            if fits:
                self._spare = None
            self._wanted = numel
            self.stats["warm" if fits else "cold"] += 1
        return spare if fits else torch.empty(numel, dtype=torch.float32)

    def replenish(self) -> None:
        """Prepare, in the background, a spare of the size last taken (unless one fitting is
        there or under way). Called when a streamed upload starts (its transfer hides the work)
        and once a load's answer is out (an in-process add, a store load); not from `take`:
        faulting pages in is CPU work, and beside the load it would take a core from the very
        request it is meant to speed up. A `take` that finds a fitting prefault still under way
        waits for it (at most WAIT_S) rather than faulting in a buffer of its own."""
        with self._lock:
            numel = self._wanted
            if numel is None or numel * 4 > self.max_bytes or self._fits(self._spare, numel):
                return
            if self._pending is not None and not self._pending.done() and self._pending_numel == numel:
                return  # that one is under way
            self._pending_numel = numel
            self._pending = self._pool.submit(self._prepare, numel)

    def _fits(self, spare: torch.Tensor | None, numel: int) -> bool:
        """A load of `numel` may take `spare`: large enough, and no more than SLACK beyond it."""
        return spare is not None and self._fits_size(spare.numel(), numel)

    def _fits_size(self, spare_numel: int, numel: int) -> bool:
        return numel <= spare_numel <= numel * (1 + self.slack)

    def _prepare(self, numel: int) -> None:
        buf = torch.empty(numel, dtype=torch.float32)
        # numpy's strided store: no OpenMP team on this thread, and the GIL is released meanwhile
        buf.numpy()[::_PAGE_FLOATS] = 0
        with self._lock:
            self._spare = buf  # the newest load's size: the likeliest next one

    def nbytes(self) -> int:
        """Bytes of the spare held resident for the next load."""
        with self._lock:
            return 0 if self._spare is None else self._spare.numel() * self._spare.element_size()

    def drain(self) -> None:
        """Wait for the spare being prepared (tests)."""
        self._pool.submit(lambda: None).result()


def _idle_priority() -> None:
    """The prefault thread runs at the lowest priority (Linux: a thread's nice value is its own):
    it must not take a core from the request it prepares for, e.g. the first request of the
    adapter just uploaded, which arrives while the spare is being faulted in."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # no per-thread priority here: it only runs sooner
        pass


ARENA = HostArena()
