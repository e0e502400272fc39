"""Write a file's bytes durably (written and fsync'd), fast for the adapter store's large files.

Why not just `write` + `fsync`: an upload's weights are written while the client waits for its
201 (upload -> first token). A buffered write into the page cache first allocates and faults in
a page per 4 KiB, which on the VMs we measured costs more than the disk: 7.4 MB took 18-23 ms
to write + fsync buffered, vs 4.5 ms for the same bytes written with O_DIRECT from a buffer that
is already resident (copying into a fresh buffer alone costs 7.5 ms of page faults). So large
files are copied into a per-thread, page-aligned, reused buffer (`_DirectBuffer`, kept up to
`KEEP_BYTES`) and written with O_DIRECT, then the file is cut to its length and fsync'd (the
size and the metadata become durable too).

`sync_dir(path)` makes a directory's entries durable (a created, renamed or removed name):
fsyncing a file does not persist its name, and a rename is only durable once its directory is
fsync'd.

Anything the direct path cannot do — a filesystem without O_DIRECT (tmpfs answers EINVAL), a
short write, a file beyond what the buffer keeps — falls back to the plain buffered write +
fsync. Either way, when `write_durable` returns, `path` holds exactly `data` on stable storage.
`write_all_durable` does the same for several files, fsyncing them together (see there why).

`StreamedWrite` writes one file from a page-aligned buffer *while that buffer is still being
filled* (an upload's weights as they arrive): the disk work overlaps the transfer instead of
following it. Whole pages go out with O_DIRECT straight from the caller's buffer (no copy);
where the filesystem refuses O_DIRECT, the same calls write through the page cache.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading
import weakref

import numpy as np

ALIGN = 4096  # O_DIRECT wants buffer, offset and length aligned to the logical block size (<= 4 KiB)
DIRECT_MIN_BYTES = 1 << 20  # below this the page-cache path costs little
KEEP_BYTES = 64 << 20  # largest buffer a writer thread keeps (the store writes on 2 threads)
_local = threading.local()
_BUFFERS: "weakref.WeakSet[_DirectBuffer]" = weakref.WeakSet()  # every thread's, for `kept_bytes`
_BUFFERS_LOCK = threading.Lock()  # (a set must not grow while a scrape iterates it)


class _DirectBuffer:
    """A page-aligned anonymous mapping, grown on demand and reused by one thread."""

    def __init__(self):
        self.map: mmap.mmap | None = None
        with _BUFFERS_LOCK:
            _BUFFERS.add(self)

    def hold(self, data) -> None:
        """Copy `data` to the buffer's start, which is at least len(data) rounded up to ALIGN long
        (the bytes past len(data) are stale: a direct write cuts the file to len(data))."""
        n = len(data)
        padded = -(-n // ALIGN) * ALIGN
        if self.map is None or len(self.map) < padded:
            if self.map is not None:
                self.map.close()
            self.map = mmap.mmap(-1, padded)  # anonymous mappings are page-aligned
        # numpy's copy releases the GIL (a slice assignment into the mmap holds it for the ~1 ms
        # of a 7.4 MB memcpy, while validation of the same upload waits for it on another core)
        np.copyto(np.frombuffer(self.map, dtype=np.uint8, count=n), np.frombuffer(data, dtype=np.uint8))


def kept_bytes() -> int:
    """Bytes of the writer threads' reused O_DIRECT buffers (resident)."""
    with _BUFFERS_LOCK:
        buffers = list(_BUFFERS)
    total = 0
    for b in buffers:
        m = b.map
        try:
            total += len(m) if m is not None else 0
        except ValueError:  # closed: being replaced by a larger one right now
            pass
    return total


def write_durable(path: str | os.PathLike, data: bytes | bytearray | memoryview) -> None:
    """Create/truncate `path`, write `data`, fsync. Raises OSError like a plain write would."""
    write_all_durable([(path, data)])


def write_all_durable(files: list[tuple[str | os.PathLike, bytes | bytearray | memoryview]],
                      written: tuple[int, ...] = ()) -> None:
    """`write_durable` for several files: all written first, then all fsync'd. Why: each fsync of
    a freshly written file commits the filesystem's journal, and a commit waits for the one
    before it; measured beside an upload's validation, a small file's write + fsync ahead of the
    weights' took 4-6 ms. Written first, the files' metadata share one commit, and the later
    fsyncs find little left to do. Raises OSError like a plain write would (files may then be
    partly written: the caller discards them). `written`: descriptors of files already written
    (`StreamedWrite.finish`), fsync'd and closed with these."""
    fds: list[int] = list(written)
    try:
        for path, data in files:
            fds.append(_write(path, data))
        for fd in fds:
            os.fsync(fd)
    finally:
        for fd in fds:
            os.close(fd)


def _write(path, data) -> int:
    """Create/truncate `path` and write `data` -> the open descriptor (not yet fsync'd)."""
    n = len(data)
    if DIRECT_MIN_BYTES <= n <= KEEP_BYTES and hasattr(os, "O_DIRECT"):
        try:
            return _write_direct(path, data)
        except OSError:
            pass  # (the direct path already falls back itself where O_DIRECT is refused) rewrite it plainly
    return _write_buffered(path, data)


def _write_buffered(path, data) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        view, done = memoryview(data).cast("B"), 0
        while done < len(view):
            done += os.write(fd, view[done:])
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_direct(path, data) -> int:
    """`data` copied into this thread's page-aligned buffer, then written from it as a
    `StreamedWrite` of that buffer: O_DIRECT, or the page cache where the filesystem refuses it."""
    buf = getattr(_local, "buffer", None)
    if buf is None:
        buf = _local.buffer = _DirectBuffer()
    buf.hold(data)
    w = StreamedWrite(path, buf.map)
    try:
        return w.finish(len(data))
    except BaseException:
        w.close()
        raise


class StreamedWrite:
    """A file written progressively from `buf` (page-aligned, e.g. an anonymous mmap, and at
    least `finish`'s length rounded up to ALIGN long): `advance(filled)` writes what the buffer
    holds so far (whole pages only, in direct mode), `finish(length)` the rest -> the open
    descriptor, written but not yet fsync'd (the caller fsyncs it with the files it belongs
    with, see `write_all_durable(..., written=)`). Calls must be sequential (one thread at a
    time); an OSError leaves the descriptor for `close` and the file for the caller to discard."""

    def __init__(self, path: str | os.PathLike, buf):
        self.buf, self.done, self.direct = memoryview(buf).cast("B"), 0, False
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        if hasattr(os, "O_DIRECT"):
            try:
                self.fd, self.direct = os.open(path, flags | os.O_DIRECT, 0o644), True
                return
            except OSError:  # tmpfs and others answer EINVAL: the page cache it is
                pass
        self.fd = os.open(path, flags, 0o644)

    def advance(self, filled: int) -> None:
        """Write up to `filled` (in direct mode: down to a page boundary; the rest waits)."""
        self._write_to(filled // ALIGN * ALIGN if self.direct else filled)

    def finish(self, length: int) -> int:
        """Write the rest of the file's `length` bytes -> the descriptor (not fsync'd)."""
        padded = -(-length // ALIGN) * ALIGN
        if self.direct and len(self.buf) >= padded:
            self._write_to(padded)  # the last page whole (stale bytes past `length`), then cut off
            os.ftruncate(self.fd, length)
        else:
            self._to_buffered()
            self._write_to(length)
        return self.fd

    def close(self) -> None:
        os.close(self.fd)

    def _to_buffered(self) -> None:
        if self.direct:  # the page cache takes any offset and length
            fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            self.direct = False

    def _write_to(self, end: int) -> None:
        while self.done < end:
            try:
                wrote = os.pwrite(self.fd, self.buf[self.done:end], self.done)
            except OSError as exc:
                if not self.direct or exc.errno != errno.EINVAL:
                    raise
                wrote = 0  # O_DIRECT refused at write time (some filesystems open it, then say no)
            if wrote == 0 and not self.direct:
                raise OSError(errno.EIO, "write made no progress")
            if self.direct and (wrote == 0 or wrote % ALIGN):
                self._to_buffered()  # a short or refused direct write: the rest through the page cache
            self.done += wrote


def sync_dir(path: str | os.PathLike) -> None:
    """fsync a directory: its entries (names created or renamed into it) become durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
