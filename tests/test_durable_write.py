"""server/durable_write.py: every size, both paths (O_DIRECT from the reused buffer, and the
buffered fallback), leave exactly the bytes given; the direct path is really taken where the
filesystem supports it (otherwise the first test would pass on the fallback alone)."""

from __future__ import annotations

import errno
import os

import pytest

from peftserve.server import durable_write as dw

SIZES = [0, 1, dw.ALIGN - 1, dw.ALIGN, dw.ALIGN + 1, dw.DIRECT_MIN_BYTES, dw.DIRECT_MIN_BYTES + 3,
         3 * dw.DIRECT_MIN_BYTES + 5]


def payload(n: int, seed: int) -> bytes:
    return bytes((i * 131 + seed) % 251 for i in range(n)) if n < 4096 else os.urandom(n)


def require_o_direct(where) -> None:
    try:
        os.close(os.open(where / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
    except (OSError, AttributeError):
        pytest.skip("no O_DIRECT on this filesystem")


@pytest.mark.parametrize("n", SIZES)
def test_the_file_holds_exactly_the_data(tmp_path, n):
    path = tmp_path / "f"
    path.write_bytes(b"x" * (n + 10_000))  # an older, longer file: truncated, never left as a tail
    data = payload(n, 1)
    dw.write_durable(path, data)
    assert path.read_bytes() == data


def test_the_reused_buffer_never_leaks_an_earlier_files_bytes(tmp_path):
    big, small = os.urandom(3 * dw.DIRECT_MIN_BYTES), os.urandom(dw.DIRECT_MIN_BYTES + 7)
    dw.write_durable(tmp_path / "big", big)
    dw.write_durable(tmp_path / "small", small)  # same thread: same buffer, stale tail beyond it
    assert (tmp_path / "big").read_bytes() == big
    assert (tmp_path / "small").read_bytes() == small


def test_without_o_direct_the_buffered_path_writes_it(tmp_path, monkeypatch):
    real_open = os.open
    seen = []

    def no_direct(path, flags, *a):
        if flags & getattr(os, "O_DIRECT", 0):
            seen.append(path)
            raise OSError(errno.EINVAL, "O_DIRECT not supported")  # what tmpfs answers
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", no_direct)
    data = os.urandom(2 * dw.DIRECT_MIN_BYTES + 1)
    dw.write_durable(tmp_path / "f", data)
    assert (tmp_path / "f").read_bytes() == data
    assert seen or not hasattr(os, "O_DIRECT")  # guard: the direct path was tried first


def test_the_direct_path_is_taken_where_the_filesystem_has_it(tmp_path, monkeypatch):
    require_o_direct(tmp_path)
    fallbacks, made = [], []
    monkeypatch.setattr(dw, "_write_buffered", lambda *a: fallbacks.append(a))
    real_finish = dw.StreamedWrite.finish  # the direct path's own fallback (to the page cache) shows here
    monkeypatch.setattr(dw.StreamedWrite, "finish", lambda self, n: made.append(self) or real_finish(self, n))
    data = os.urandom(dw.DIRECT_MIN_BYTES + 1)
    dw.write_durable(tmp_path / "f", data)
    assert not fallbacks and made and all(w.direct for w in made)
    assert (tmp_path / "f").read_bytes() == data


def test_several_files_are_all_written_then_all_fsynced(tmp_path, monkeypatch):
    """write_all_durable: one journal commit for all (every write before the first fsync), each
    file fsync'd, each holding exactly its bytes (one direct, one buffered)."""
    events = []
    real_write, real_pwrite, real_fsync = os.write, os.pwrite, os.fsync
    monkeypatch.setattr(os, "write", lambda fd, b: events.append(("write", fd)) or real_write(fd, b))
    monkeypatch.setattr(os, "pwrite", lambda fd, b, at: events.append(("write", fd)) or real_pwrite(fd, b, at))
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", fd)) or real_fsync(fd))
    files = [(tmp_path / "big", os.urandom(dw.DIRECT_MIN_BYTES + 5)), (tmp_path / "small", b"{}")]
    dw.write_all_durable(files)
    kinds = [e for e, _ in events]
    assert kinds.index("fsync") > max(i for i, k in enumerate(kinds) if k == "write")
    assert len({fd for e, fd in events if e == "fsync"}) == 2
    assert all(path.read_bytes() == data for path, data in files)


def test_sync_dir_fsyncs_the_directory(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    dw.sync_dir(tmp_path)
    assert synced == [str(tmp_path)]


# -- StreamedWrite: a file written while its buffer fills -------------------------------------
def _streamed(path, data: bytes, fills: list[int]) -> dw.StreamedWrite:
    """Fill a page-aligned buffer in steps, advancing after each; finish and fsync."""
    import mmap

    buf = mmap.mmap(-1, max(dw.ALIGN, -(-len(data) // dw.ALIGN) * dw.ALIGN))
    buf[:] = os.urandom(len(buf))  # stale bytes past the data: must never reach the file
    w = dw.StreamedWrite(path, buf)
    for end in fills:
        buf[:end] = data[:end]
        w.advance(end)
    buf[:len(data)] = data
    dw.write_all_durable([], written=(w.finish(len(data)),))
    return w


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("direct", [True, False])
def test_a_streamed_file_holds_exactly_the_data(tmp_path, monkeypatch, n, direct):
    import random

    real_open, seen = os.open, []

    def open_(path, flags, *a):
        if flags & getattr(os, "O_DIRECT", 0):
            seen.append(path)
            if not direct:
                raise OSError(errno.EINVAL, "O_DIRECT not supported")
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", open_)
    path = tmp_path / "f"
    path.write_bytes(b"x" * (n + 3 * dw.ALIGN))  # an older, longer file: truncated
    data = payload(n, 3)
    fills = sorted(random.Random(n).randrange(n + 1) for _ in range(5))  # pages and bits of pages
    _streamed(path, data, fills)
    assert path.read_bytes() == data
    assert seen or not hasattr(os, "O_DIRECT")  # guard: the direct open was tried


def test_a_streamed_file_goes_direct_where_it_can_and_falls_back_on_a_short_write(tmp_path, monkeypatch):
    require_o_direct(tmp_path)
    data = os.urandom(5 * dw.ALIGN + 17)
    assert _streamed(tmp_path / "a", data, [2 * dw.ALIGN + 5]).direct  # direct to the end
    assert (tmp_path / "a").read_bytes() == data
    real_pwrite, calls = os.pwrite, []

    def short_once(fd, buf, offset):
        calls.append(offset)
        if len(calls) == 1:  # a direct write that stops mid-page (done here through a plain descriptor)
            plain = os.open(tmp_path / "b", os.O_WRONLY)
            try:
                return real_pwrite(plain, buf[:dw.ALIGN + 100], offset)
            finally:
                os.close(plain)
        return real_pwrite(fd, buf, offset)

    monkeypatch.setattr(os, "pwrite", short_once)
    w = _streamed(tmp_path / "b", data, [3 * dw.ALIGN])
    assert not w.direct and calls[:2] == [0, dw.ALIGN + 100]  # the rest went on, buffered, where it stopped
    assert (tmp_path / "b").read_bytes() == data


def test_a_streamed_file_falls_back_when_a_direct_write_is_refused(tmp_path, monkeypatch):
    require_o_direct(tmp_path)
    data = os.urandom(4 * dw.ALIGN + 3)
    real_pwrite, refused = os.pwrite, []

    def refuse_direct(fd, buf, offset):
        if fcntl_flags(fd) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")  # what some filesystems answer at write time
        return real_pwrite(fd, buf, offset)

    monkeypatch.setattr(os, "pwrite", refuse_direct)
    w = _streamed(tmp_path / "f", data, [dw.ALIGN * 2])
    assert (tmp_path / "f").read_bytes() == data and not w.direct
    assert refused


def fcntl_flags(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GETFL)
