"""Runs the synchronous LLMEngine in its own thread and bridges it to asyncio.

torch releases the GIL inside its kernels, so the event loop stays responsive (health checks,
uploads, SSE writes) while a step runs. The only way into the engine thread is the command
queue; events come back through `loop.call_soon_threadsafe` onto one asyncio.Queue per request.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator

from .engine import LLMEngine
from .request import FinishReason, SamplingParams, Sequence, TokenEvent

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    pass


class EngineDeadError(RuntimeError):
    pass


class AsyncEngine:
    def __init__(self, engine: LLMEngine, idle_wait_s: float = 0.05):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._pending = 0  # submitted but not yet seen by the engine thread
        self._live: set[Sequence] = set()  # not finished yet (engine thread + event loop)
        self._lock = threading.Lock()
        self.idle_wait_s = idle_wait_s
        self.dead_reason: str | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="peftserve-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._commands.put(("wake", None))
        if self._thread:
            self._thread.join(timeout)
        self._fail_all("engine stopped")  # nobody may wait forever on a stream

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead_reason is None

    @property
    def num_waiting(self) -> int:
        return self.engine.num_waiting + self._pending

    @property
    def num_running(self) -> int:
        return self.engine.num_running

    def call(self, fn) -> None:
        """Run `fn(engine)` on the engine thread between steps (registry swaps, merges...)."""
        self._commands.put(("call", fn))

    # -- requests ------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, adapter=None) -> "RequestStream":
        if not self.running:
            raise EngineDeadError(self.dead_reason or "engine not running")
        if self.num_waiting >= self.engine.config.max_waiting:
            raise QueueFullError("request queue is full")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        def deliver(ev: TokenEvent) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, ev)
            except RuntimeError:  # the consumer's event loop is closed: nobody listens any more
                seq.cancelled = True

        seq = Sequence(list(prompt_ids), params, on_event=deliver, adapter=adapter)
        with self._lock:
            self._pending += 1
            self._live.add(seq)
        self._commands.put(("add", seq))
        return RequestStream(self, seq, events)

    def abort(self, seq: Sequence) -> None:
        self._commands.put(("abort", seq))

    # -- engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain(block=not self.engine.has_work())
                if self.engine.has_work():
                    self.engine.step()
        except BaseException as exc:  # engine loop death: fail everything fast, flag unhealthy
            log.exception("engine loop died")
            self.dead_reason = f"engine loop died: {type(exc).__name__}"
            self._fail_all(self.dead_reason)

    def _drain(self, block: bool) -> None:
        try:
            cmd, arg = self._commands.get(timeout=self.idle_wait_s) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(cmd, arg)
            try:
                cmd, arg = self._commands.get_nowait()
            except queue.Empty:
                return

    def _apply(self, cmd: str, arg) -> None:
        if cmd == "add":
            with self._lock:
                self._pending -= 1
            if arg.cancelled:
                self.engine.abort(arg)
            else:
                self.engine.add(arg)
        elif cmd == "abort":
            self.engine.abort(arg)
        elif cmd == "call":
            try:
                arg(self.engine)
            except Exception:
                log.exception("engine-thread call failed")

    def _fail_all(self, reason: str) -> None:
        with self._lock:
            live = list(self._live)
        for seq in live:
            seq.on_event(TokenEvent(None, "", finish_reason=FinishReason.ERROR, error=reason))

    def _forget(self, seq: Sequence) -> None:
        with self._lock:
            self._live.discard(seq)


class RequestStream:
    """Async iterator over one request's events; closing it early cancels the request."""

    def __init__(self, engine: AsyncEngine, seq: Sequence, events: asyncio.Queue):
        self.engine, self.seq, self.events = engine, seq, events
        self.finished = False

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self._iter()

    async def _iter(self):
        try:
            while True:
                ev = await self.events.get()
                if ev.finish_reason is not None:
                    self.finished = True
                yield ev
                if self.finished:
                    return
        finally:
            self.engine._forget(self.seq)
            if not self.finished:  # consumer went away (client disconnect, task cancelled)
                self.cancel()

    def cancel(self) -> None:
        self.seq.cancelled = True
        self.engine.abort(self.seq)
