"""Runs the synchronous LLMEngine in its own thread and bridges it to asyncio.

torch releases the GIL inside its kernels, so the event loop stays responsive (health checks,
uploads, SSE writes) while a step runs. The only way into the engine thread is the command
queue; events come back onto one asyncio.Queue per request through a per-loop mailbox: the
engine thread appends, and only the first event of a batch schedules a hand-over
(`loop.call_soon_threadsafe`), so a step's tokens for all requests cost one loop wake-up. A
step's hand-overs wait until the snapshot that reflects the step is published (`_Gate`), so a
consumer that sees its request end never reads a snapshot that still counts it.

Supervision: if the loop dies anyway (an exception escaping `step()`), the requests in flight
get an `engine_restarted` error, the engine's per-request state is reset (same model, KV
tensors and registry) and the loop runs again after a backoff, in the same thread; after too
many crashes in a window (supervisor.RestartPolicy) it stays dead.

State for other threads: `snapshot` (observer.EngineSnapshot), rebuilt by the engine thread
after every loop iteration that changed something (commands applied, a step run) and after a
reset. Readers (/metrics, GET /adapters, `num_running`) take it without a lock (`num_waiting`
pairs it with the not-yet-drained submissions under `_lock`) and never touch the scheduler, the
KV allocator or the adapter tier themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import weakref
from collections.abc import AsyncIterator

from . import intra_op
from .engine import LLMEngine
from .observer import EngineSnapshot
from .request import ErrorCode, FinishReason, SamplingParams, Sequence, SeqStatus, TokenEvent
from .supervisor import EngineState, RestartPolicy, RestartTracker

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    pass


class EngineDeadError(RuntimeError):
    pass


class EngineRestartingError(EngineDeadError):
    """The loop died and is being rebuilt: retry shortly."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine, idle_wait_s: float = 0.05, restart_policy: RestartPolicy | None = None):
        self.engine = engine
        self.state = EngineState.CREATED
        self.restarts = 0  # successful restarts of the loop (peftserve_engine_restarts_total)
        self._tracker = RestartTracker(restart_policy or RestartPolicy())
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._pending = 0  # submitted but not yet counted by a published snapshot
        self._drained = 0  # of those, added to the scheduler since the last snapshot (engine thread)
        self._steps = 0  # steps that processed tokens (engine thread)
        self._resets = 0
        self._live: set[Sequence] = set()  # not finished yet (engine thread + event loop)
        self._lock = threading.Lock()
        self._mailboxes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> _Mailbox
        self._gate = _Gate()  # hand-overs held while a step runs, until its snapshot is published
        self.idle_wait_s = idle_wait_s
        self.dead_reason: str | None = None  # internal (logs, tests); clients get a generic message
        # no engine thread yet: built here, then only ever by the engine thread (_publish)
        self.snapshot: EngineSnapshot = engine.snapshot()

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        # The engine thread is where torch's intra-op parallelism should run at full speed: the
        # starting thread (which loaded the model) gives its OpenMP team back (intra_op.py).
        intra_op.release()
        self.state = EngineState.RUNNING
        self._thread = threading.Thread(target=self._run, name="peftserve-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._commands.put(("wake", None))
        if self._thread:
            self._thread.join(timeout)
        if self.state is not EngineState.DEAD:
            self.state = EngineState.STOPPED
        self._fail_all(ErrorCode.ENGINE_STOPPED, "engine stopped")  # nobody may wait forever on a stream

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.state is EngineState.RUNNING

    @property
    def restarting(self) -> bool:
        return self.state is EngineState.RESTARTING

    @property
    def num_waiting(self) -> int:
        """Queued requests: the published snapshot's plus submissions it does not count yet.
        Never under the live count (a submission leaves `_pending` only in the snapshot that
        counts it), so the queue-full check stays a hard bound."""
        with self._lock:
            return self.snapshot.waiting + self._pending

    @property
    def num_running(self) -> int:
        return self.snapshot.running

    def call(self, fn) -> None:
        """Run `fn(engine)` on the engine thread between steps (registry swaps, merges...)."""
        self._commands.put(("call", fn))

    # -- requests ------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, adapter=None) -> "RequestStream":
        if not self.running:
            if self.restarting:
                raise EngineRestartingError("engine restarting")
            raise EngineDeadError(self.dead_reason or "engine not running")
        if self.num_waiting >= self.engine.config.max_waiting:
            raise QueueFullError("request queue is full")
        loop = asyncio.get_running_loop()
        mailbox = self._mailboxes.get(loop)
        if mailbox is None:
            mailbox = self._mailboxes[loop] = _Mailbox(loop, self._gate)
        events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        seq = Sequence(list(prompt_ids), params, on_event=_deliver_to(mailbox, events), adapter=adapter)
        seq.on_event.seq = weakref.ref(seq)  # no seq <-> callback cycle: a finished request (and
        # the adapter or combination it holds) is freed by refcount, not at the next cyclic GC
        with self._lock:
            self._pending += 1
            self._live.add(seq)
        self._commands.put(("add", seq))
        return RequestStream(self, seq, events)

    def abort(self, seq: Sequence) -> None:
        self._commands.put(("abort", seq))

    def abort_all(self, timeout: float = 2.0) -> None:
        """Abort every request the engine holds (on the engine thread); wait until it ran, at
        most `timeout` seconds. For shutdown: the streams end with `abort` events."""
        done = threading.Event()

        def run(engine: LLMEngine) -> None:
            try:
                for seq in list(engine.scheduler.running) + list(engine.scheduler.waiting):
                    engine.abort(seq)
            finally:
                done.set()

        self.call(run)
        done.wait(timeout)

    # -- engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        """The supervisor: run the loop; when it dies, fail what it held, reset, back off, rerun."""
        intra_op.own()
        while True:
            try:
                self._loop()
                return  # stopped on purpose
            except BaseException as exc:  # the loop died: nothing escapes this thread
                detail = f"{type(exc).__name__}: {exc}"[:500]
                log.exception("engine loop died", extra={"error": detail, "restarts": self.restarts})
            if not self._recover(detail):
                return

    def _loop(self) -> None:
        while not self._stop.is_set():
            changed = self._drain(block=not self.engine.has_work())
            if self.engine.has_work():
                # the step's events wait for the snapshot that reflects it: a consumer that sees
                # its request end finds /metrics and num_running already past it
                self._gate.hold()
                try:
                    if self.engine.step():
                        self._steps += 1
                    self._publish()
                finally:
                    self._gate.release()
            elif changed:
                self._publish()

    def _publish(self) -> None:
        """Build the engine's snapshot and make it the one readers see (engine thread)."""
        snap = self.engine.snapshot(steps=self._steps, resets=self._resets)
        with self._lock:  # num_waiting reads snapshot + _pending as one pair
            self._pending -= self._drained  # the adds drained since the last snapshot are in this one
            self._drained = 0
            self.snapshot = snap

    def _recover(self, detail: str) -> bool:
        """After a crash: True once the loop may run again, False when the engine stays dead."""
        delay = None if self._stop.is_set() else self._tracker.next_delay()
        self.state = EngineState.RESTARTING if delay is not None else EngineState.DEAD
        try:
            self.engine.reset()
            self._resets += 1
            self._publish()  # readers see the emptied engine, not the crashed step's state
        except BaseException as exc:  # cannot rebuild: stay dead
            log.exception("engine reset failed")
            detail, delay = f"{detail}; reset failed: {type(exc).__name__}", None
            self.state = EngineState.DEAD
        if delay is None:
            self.dead_reason = f"engine loop died: {detail}"
            log.error("engine loop stays dead", extra={"error": detail, "restarts": self.restarts})
            self._fail_all(ErrorCode.ENGINE_STOPPED, self.dead_reason)
            return False
        self._fail_all(ErrorCode.ENGINE_RESTARTED, f"engine loop died and is restarting: {detail}")
        if self._stop.wait(delay):
            return False
        self.restarts += 1
        self.state = EngineState.RUNNING
        log.warning("engine loop restarted", extra={"restarts": self.restarts, "backoff_s": delay})
        return True

    def _drain(self, block: bool) -> bool:
        """Apply every queued command; True when there was at least one."""
        try:
            cmd, arg = self._commands.get(timeout=self.idle_wait_s) if block else self._commands.get_nowait()
        except queue.Empty:
            return False
        while True:
            self._apply(cmd, arg)
            try:
                cmd, arg = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _apply(self, cmd: str, arg) -> None:
        if cmd == "add":
            self._drained += 1  # leaves _pending when the next snapshot counts it
            if arg.status is SeqStatus.FINISHED:  # failed while queued (engine restart)
                return
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

    def _fail_all(self, code: ErrorCode, detail: str) -> None:
        """End every request not finished yet (queued, waiting or running) with `code`."""
        with self._lock:
            live = [seq for seq in self._live if seq.finish_reason is None]
        observer = getattr(self.engine, "observer", None)
        for seq in live:
            seq.status, seq.finish_reason = SeqStatus.FINISHED, FinishReason.ERROR
            if observer is not None:
                try:
                    observer.on_finish(seq, 0.0)
                except Exception:
                    log.exception("observer failed")
            seq.on_event(TokenEvent(None, "", finish_reason=FinishReason.ERROR, error=detail, code=code))

    def _forget(self, seq: Sequence) -> None:
        with self._lock:
            self._live.discard(seq)


class _Gate:
    """Holds the mailboxes' hand-overs while the engine thread runs a step, until the snapshot
    that reflects the step is published (`release`). Only around a step, never while the engine
    thread blocks for commands, so posts from elsewhere wait at most one step."""

    def __init__(self):
        self._lock = threading.Lock()
        self._held = False
        self._deferred: list[_Mailbox] = []

    def hold(self) -> None:
        with self._lock:
            self._held = True

    def defer(self, mailbox: "_Mailbox") -> bool:
        """True when held: the mailbox's held events go at `release` (`_Mailbox.flush_held`)."""
        with self._lock:
            if self._held and mailbox not in self._deferred:
                self._deferred.append(mailbox)
            return self._held

    def release(self) -> None:
        with self._lock:
            self._held, deferred, self._deferred = False, self._deferred, []
        for mailbox in deferred:
            try:
                mailbox.flush_held()
            except RuntimeError:  # its loop closed: nobody reads those events any more
                pass


class _Mailbox:
    """Events from the engine thread for one event loop, handed over in batches: the first event
    posted after a hand-over schedules the next one (at once, or when the gate opens); every
    event posted until it runs rides along. Per request, events keep their order (one FIFO list,
    hand-overs run in order). An event posted while the gate is held waits apart (`_held`): a
    batch scheduled at the last release may not have run yet, and it must not carry this
    step's events out before this step's snapshot."""

    def __init__(self, loop: asyncio.AbstractEventLoop, gate: _Gate | None = None):
        self.loop = loop
        self.gate = gate
        self._pending: list[tuple[asyncio.Queue, TokenEvent]] = []  # for the next hand-over
        self._held: list[tuple[asyncio.Queue, TokenEvent]] = []  # posted while the gate was held
        self._lock = threading.Lock()  # taken before the gate's, never while holding it

    def post(self, events: asyncio.Queue, ev: TokenEvent) -> None:
        """Raises RuntimeError when the loop is closed (nobody will ever read the event)."""
        if self.loop.is_closed():
            raise RuntimeError("event loop is closed")
        with self._lock:
            if self.gate is not None and self.gate.defer(self):
                self._held.append((events, ev))
                return
            first = not self._pending
            self._pending.append((events, ev))
        if first:
            self.schedule()

    def flush_held(self) -> None:
        """At the gate's release: the held events join the next hand-over (after anything
        posted before them, which the snapshot already covered)."""
        with self._lock:
            if not self._held:
                return
            first = not self._pending
            self._pending.extend(self._held)
            self._held = []
        if first:
            self.schedule()

    def schedule(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self._hand_over)
        except RuntimeError:  # closed meanwhile: drop the batch, the next post fails at once
            with self._lock:
                self._pending.clear()
            raise

    def _hand_over(self) -> None:  # on the event loop
        with self._lock:
            batch, self._pending = self._pending, []
        for events, ev in batch:
            events.put_nowait(ev)


class _deliver_to:
    """A request's event callback: posts each TokenEvent for the consumer's asyncio queue."""

    def __init__(self, mailbox: _Mailbox, events: asyncio.Queue):
        self.mailbox, self.events = mailbox, events
        self.seq = lambda: None  # weakref to the Sequence, set by submit()

    def __call__(self, ev: TokenEvent) -> None:
        try:
            self.mailbox.post(self.events, ev)
        except RuntimeError:  # the consumer's event loop is closed: nobody listens any more
            seq = self.seq()
            if seq is not None:
                seq.cancelled = True


class RequestStream:
    """Async iterator over one request's events; closing it early cancels the request."""

    def __init__(self, engine: AsyncEngine, seq: Sequence, events: asyncio.Queue):
        self.engine, self.seq, self.events = engine, seq, events
        self.finished = False

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self._iter()

    async def _iter(self):
        # one event at a time over `batches()`; aclosing: a consumer that stops early closes the
        # batches generator now (its cleanup cancels the request), not at garbage collection
        async with contextlib.aclosing(self.batches()) as batches:
            async for batch in batches:
                for ev in batch:
                    yield ev

    async def batches(self) -> AsyncIterator[list[TokenEvent]]:
        """The events in arrival order, grouped: each list holds every event already delivered
        when the consumer got to it (at least one), so a consumer that fell behind catches up in
        one go (one SSE write for several tokens). The final event ends the last list."""
        events = self.events
        try:
            while True:
                ev = await events.get()
                batch = [ev]
                while ev.finish_reason is None and not events.empty():
                    ev = events.get_nowait()
                    batch.append(ev)
                if ev.finish_reason is not None:
                    self.finished = True
                yield batch
                if self.finished:
                    return
        finally:
            self.engine._forget(self.seq)
            if not self.finished:  # consumer went away (client disconnect, task cancelled)
                self.cancel()

    def cancel(self) -> None:
        self.seq.cancelled = True
        self.engine.abort(self.seq)
