"""Restart policy for the engine loop: when to rebuild it after it died, and when to give up.

The step isolates per-request failures (engine.py), so what kills the loop is a bug in shared
state, a device error or an out-of-memory. Restarting is cheap (the model, KV tensors and the
adapter registry are kept; only per-request bookkeeping is rebuilt), but a loop that dies again
and again would turn every request into a 503 after a partial generation: so restarts back off
exponentially and stop after `max_restarts` within `window_s` — then the engine stays dead and
`/health` answers 503, which is what an orchestrator needs to replace the process.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass


class EngineState(str, enum.Enum):
    CREATED = "created"  # not started yet
    RUNNING = "running"
    RESTARTING = "restarting"  # the loop died; in-flight requests failed; rebuilding after a backoff
    DEAD = "dead"  # gave up restarting (or the reset itself failed)
    STOPPED = "stopped"  # stopped on purpose (shutdown)


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 5  # within window_s; one more crash and the engine stays dead
    window_s: float = 60.0
    backoff_s: float = 0.05  # delay before the first restart; doubles with each crash in the window
    max_backoff_s: float = 2.0


class RestartTracker:
    """Crash times within the policy's window -> the delay before the next restart, or None."""

    def __init__(self, policy: RestartPolicy, clock=time.monotonic):
        self.policy = policy
        self.clock = clock
        self._crashes: deque[float] = deque()

    def next_delay(self) -> float | None:
        """Record a crash now; return seconds to wait before restarting, or None to give up."""
        now = self.clock()
        while self._crashes and now - self._crashes[0] > self.policy.window_s:
            self._crashes.popleft()
        if len(self._crashes) >= self.policy.max_restarts:
            return None
        self._crashes.append(now)
        return min(self.policy.backoff_s * 2 ** (len(self._crashes) - 1), self.policy.max_backoff_s)
