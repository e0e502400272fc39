"""An upload's weights received into an aligned buffer, hashed and written to disk while they arrive.

Why: with the whole body in hand first, the registry's content hash (~5 ms per 7.4 MB) and its
durable store write (~8 ms, most of it the disk) ran after the transfer, competing with
validation for 2 cores: upload -> first token paid them. Fed while the transfer is still under
way (the API's multipart parser calls `extend` per piece of the weights part), they finish with
it, and what is left for `registry.add` is validation plus the last page and the fsyncs.

- The buffer is an anonymous mapping (page-aligned), at least the declared body size: the weights part
  starts at its beginning, so the safetensors data that follows the (8-byte padded) header is
  element-aligned and validation reads it in place (no scratch copy), and whole pages go to disk
  with O_DIRECT straight from it (server/durable_write.py `StreamedWrite`, no copy either).
- The hash is `content_hash(config, weights)`, which starts with the config: it streams only when
  the config part came before the weights (what our client and the README's curl send). Given
  the other way round, `complete` hands back no hash and the registry hashes as before.
- Buffers are reused (`ReceiveBuffers`): writing 7.4 MB into fresh pages cost the event loop
  ~7 ms of page faults (the whole-body read paid the same), into a resident buffer ~0.6 ms. A
  buffer goes back to use only once nothing views it any more (`_unexported`).
- Work goes to the registry's writer pool in steps of `STEP` bytes, on two ordered chains (hash,
  disk) that hold no thread between steps: a slow client never ties up a pool thread.
- Nothing here commits anything: the file lives in a private staging directory that
  `registry.add` renames into the store only after every check passed, and `discard` removes.
"""

from __future__ import annotations

import mmap
import shutil
import threading
from collections import deque
from concurrent.futures import Executor, Future
from pathlib import Path

from peftserve.adapters.artifact import content_hasher

from .durable_write import ALIGN, StreamedWrite, sync_dir, write_all_durable

STEP = 1 << 20  # bytes per hash / write job: few pool submissions, little left for the end


def _unexported(buf: mmap.mmap) -> bool:
    """Whether no view of `buf` is alive (memoryview, numpy, torch: each holds a buffer export).
    CPython refuses to resize a mapping with exports; resizing to its own size changes nothing
    else (tests/test_streamed_upload.py holds this for every kind of view we make)."""
    try:
        buf.resize(len(buf))
    except BufferError:
        return False
    except (OSError, ValueError, SystemError):  # no resize on this platform: never reuse, to be safe
        return False
    return True


class ReceiveBuffers:
    """Page-aligned receive buffers, reused while resident. `take(n)` -> a buffer of >= n bytes
    (a kept one if it fits, else a new mapping); `give_back(buf)` once its upload is over: it is
    reused only after every view of it is gone (checked at the next `take`). At most `keep`
    buffers of at most `max_bytes` each are kept."""

    def __init__(self, keep: int = 2, max_bytes: int = 64 << 20):
        self.keep, self.max_bytes = keep, max_bytes
        self._lock = threading.Lock()
        self._kept: list[mmap.mmap] = []  # oldest first; each may still be viewed

    def take(self, n: int) -> mmap.mmap:
        size = max(ALIGN, -(-n // ALIGN) * ALIGN)
        with self._lock:
            fits = [b for b in self._kept if len(b) >= size and _unexported(b)]
            if fits:
                best = min(fits, key=len)
                self._kept.remove(best)
                return best
        return mmap.mmap(-1, size)

    def give_back(self, buf: mmap.mmap) -> None:
        if len(buf) > self.max_bytes:
            return
        with self._lock:
            self._kept.append(buf)
            del self._kept[:-self.keep]

    def nbytes(self) -> int:
        """Bytes of the buffers kept for reuse (resident; what `peftserve_host_buffer_bytes` shows)."""
        with self._lock:
            return sum(len(b) for b in self._kept)


RECEIVE_BUFFERS = ReceiveBuffers()


class StreamOverflow(ValueError):
    """More weights bytes than the declared body size."""


class _Chain:
    """Jobs run in submission order on `pool`, one at a time, no pool thread held between them.
    After a failure the later jobs are skipped (their futures carry that first error), except
    those submitted with `always` (clean-up)."""

    def __init__(self, pool: Executor):
        self.pool, self.lock, self.pending, self.running = pool, threading.Lock(), deque(), False
        self.error: BaseException | None = None

    def submit(self, fn, *args, always: bool = False) -> Future:
        done: Future = Future()
        with self.lock:
            self.pending.append((done, fn, args, always))
            if self.running:
                return done
            self.running = True
        self.pool.submit(self._drain)
        return done

    def _drain(self) -> None:
        while True:
            with self.lock:
                if not self.pending:
                    self.running = False
                    return
                done, fn, args, always = self.pending.popleft()
            if self.error is not None and not always:
                done.set_exception(self.error)
                continue
            try:
                done.set_result(fn(*args))
            except BaseException as exc:  # the stream is broken: every later job reports this
                self.error = self.error or exc
                done.set_exception(exc)


class StreamedUpload:
    """The weights of one upload: `begin` once when the weights part starts, `extend` per piece,
    `view()` for the bytes, then `complete` (by `registry.add`) or `discard`."""

    def __init__(self, staging: Path, capacity: int, pool: Executor, weights_file: str, config_file: str,
                 buffers: ReceiveBuffers | None = None):
        self.staging, self.weights_file, self.config_file = staging, weights_file, config_file
        # >= capacity rounded up to a page: room for the direct write of the last, whole page
        self._buffers = buffers or RECEIVE_BUFFERS
        self.buffer = self._buffers.take(capacity)
        self._buf = memoryview(self.buffer)
        self.capacity = capacity
        self.size = self._queued = 0
        self._hash = _Chain(pool)
        self._disk = _Chain(pool)
        self._hasher = None
        self._hashed_config: bytes | None = None
        self._file: StreamedWrite | None = None
        self._finished = False
        # after `complete`, staging belongs to the registry's `add` (which removes or commits it):
        # a clean-up racing its commit must not delete files from under the rename
        self._handed_over = False

    # -- the receiving side (the event loop) ---------------------------------------------------
    def begin(self, config: bytes | None) -> None:
        """The weights part starts; `config`: the config part's bytes if it came first."""
        self._disk.submit(self._open)
        if config is not None:
            self._hashed_config = bytes(config)
            self._hasher = content_hasher(self._hashed_config)

    def extend(self, piece: memoryview) -> None:
        n = len(piece)
        if self.size + n > self.capacity:
            raise StreamOverflow(f"the weights part exceeds the declared body size ({self.capacity} bytes)")
        self._buf[self.size:self.size + n] = piece
        self.size += n
        if self.size - self._queued >= STEP:
            self._queue()

    def view(self) -> memoryview:
        """The weights received so far (read-only)."""
        return self._buf[:self.size].toreadonly()

    # -- the registry's side ---------------------------------------------------------------------
    def complete(self, config: bytes, weights) -> tuple[Future, Future | None]:
        """The body is in: -> (the durable write of weights + config into `staging`, fsync'd with
        the directory; the content hash, or None when it could not stream: config came late or
        differs). `weights` must be this upload's own `view()`."""
        if self._finished:
            raise RuntimeError("this streamed upload was already completed or discarded")
        if not isinstance(weights, memoryview) or weights.obj is not self.buffer or len(weights) != self.size:
            raise ValueError("weights are not this streamed upload's bytes")
        self._finished = self._handed_over = True  # the staging directory is the caller's now
        self._queue()
        writing = self._disk.submit(self._finish, bytes(config))
        hashing = None
        if self._hasher is not None and bytes(config) == self._hashed_config:
            hashing = self._hash.submit(self._hasher.hexdigest)
        return writing, hashing

    def release(self) -> None:
        """After a successful `registry.add`: it renamed the staging directory into the store and
        its write closed the file, so no disk work is left; only the buffer goes back."""
        self._finished = True
        self._give_back()

    def discard(self) -> Future:
        """Close the file and remove the staging directory (unless `complete` handed it to the
        registry), after the queued jobs; idempotent -> a future of that clean-up (await it
        before answering: the store is then as it was)."""
        self._finished = True
        return self._disk.submit(self._remove, always=True)

    # -- jobs (pool threads, in order per chain) ----------------------------------------------------
    def _queue(self) -> None:
        start, end = self._queued, self.size
        if end == start:
            return
        self._queued = end
        if self._hasher is not None:
            self._hash.submit(self._hasher.update, self._buf[start:end])  # sha256 releases the GIL
        self._disk.submit(self._advance, end)

    def _open(self) -> None:
        self.staging.mkdir(parents=True)
        self._file = StreamedWrite(self.staging / self.weights_file, self.buffer)

    def _advance(self, end: int) -> None:
        self._file.advance(end)

    def _finish(self, config: bytes) -> None:
        if self._file is None:
            raise RuntimeError("the weights part never began")
        fd, self._file = self._file.finish(self.size), None  # write_all_durable closes it
        write_all_durable([(self.staging / self.config_file, config)], written=(fd,))
        sync_dir(self.staging)  # the two names: the directory is renamed into the store as it is

    def _remove(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if not self._handed_over:
            shutil.rmtree(self.staging, ignore_errors=True)
        self._give_back()

    def _give_back(self) -> None:
        if self._buf is None:
            return
        try:  # our own view goes; the buffer is reused once the caller's views are gone too
            self._buf.release()
        except BufferError:  # something was made from this very view: leave the buffer to the GC
            return
        finally:
            self._buf = None
        self._buffers.give_back(self.buffer)

