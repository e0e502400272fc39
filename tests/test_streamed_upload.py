"""server/streamed_upload.py: an upload's weights received, hashed and written while they arrive.

What must hold: the file and the hash are exactly those of the bytes received, however they
were cut into pieces; the hash streams only when the config came first (and is never one of a
different config); clean-up always runs, even after a failed job; a receive buffer is reused
only once nothing views it (a reused buffer under a live view would change an adapter's
weights behind its back)."""

from __future__ import annotations

import errno
import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from peftserve.adapters.artifact import content_hash
from peftserve.server import streamed_upload as su

CONFIG = b'{"peft_type": "LORA", "r": 8}'


@pytest.fixture(scope="module")
def pool():
    with ThreadPoolExecutor(max_workers=2) as ex:
        yield ex


def receive(tmp_path, pool, data: bytes, config: bytes | None, seed: int = 0, capacity: int | None = None,
            buffers: su.ReceiveBuffers | None = None) -> su.StreamedUpload:
    up = su.StreamedUpload(tmp_path / "staging" / f"u{seed}", len(data) + 100 if capacity is None else capacity,
                           pool, "w.safetensors", "c.json", buffers=buffers or su.ReceiveBuffers())
    up.begin(config)
    rng, i = random.Random(seed), 0
    while i < len(data):  # pieces from 1 byte to past the job step
        n = rng.choice([1, 7, 4096, 65536, su.STEP + 3])
        up.extend(memoryview(data)[i:i + n])
        i += n
    return up


@pytest.mark.parametrize("seed", range(4))
def test_file_and_hash_are_those_of_the_bytes_however_they_arrive(tmp_path, pool, seed):
    data = random.Random(seed).randbytes([0, 5, 3 * su.STEP + 4097, su.STEP][seed])
    up = receive(tmp_path, pool, data, CONFIG, seed)
    assert bytes(up.view()) == data
    writing, hashing = up.complete(CONFIG, up.view())
    writing.result(10)
    assert hashing is not None and hashing.result(10) == content_hash(CONFIG, data)
    assert (up.staging / "w.safetensors").read_bytes() == data
    assert (up.staging / "c.json").read_bytes() == CONFIG
    up.discard().result(10)


def test_the_hash_streams_only_with_the_config_that_came_first(tmp_path, pool):
    data = os.urandom(2 * su.STEP)
    late = receive(tmp_path, pool, data, None, seed=1)  # the config came after the weights
    writing, hashing = late.complete(CONFIG, late.view())
    assert hashing is None and writing.result(10) is None
    assert (late.staging / "c.json").read_bytes() == CONFIG
    other = receive(tmp_path, pool, data, CONFIG, seed=2)  # hashed with one config, completed with another
    writing, hashing = other.complete(CONFIG + b" ", other.view())
    assert hashing is None and writing.result(10) is None
    assert (other.staging / "c.json").read_bytes() == CONFIG + b" "
    for up in (late, other):
        up.discard().result(10)


def test_complete_takes_only_its_own_bytes_and_only_once(tmp_path, pool):
    data = os.urandom(1000)
    up = receive(tmp_path, pool, data, CONFIG)
    with pytest.raises(ValueError):
        up.complete(CONFIG, memoryview(data))  # equal bytes, but not this upload's: its hash would not match them
    with pytest.raises(ValueError):
        up.complete(CONFIG, up.view()[:10])
    up.complete(CONFIG, up.view())[0].result(10)
    with pytest.raises(RuntimeError):
        up.complete(CONFIG, up.view())
    up.discard().result(10)


def test_once_completed_the_staging_directory_is_the_registrys(tmp_path, pool):
    """`add` commits (renames) or removes staging itself; a discard racing it (a cancelled
    request) must not delete files from under that rename."""
    data = os.urandom(2 * su.STEP + 5)
    up = receive(tmp_path, pool, data, CONFIG)
    writing, _ = up.complete(CONFIG, up.view())
    writing.result(10)
    up.discard().result(10)
    assert (up.staging / "w.safetensors").read_bytes() == data  # left for the registry


def test_more_bytes_than_declared_is_refused(tmp_path, pool):
    up = su.StreamedUpload(tmp_path / "s", 10, pool, "w", "c", buffers=su.ReceiveBuffers())
    up.begin(None)
    up.extend(memoryview(b"0123456789"))
    with pytest.raises(su.StreamOverflow):
        up.extend(memoryview(b"x"))
    up.discard().result(10)
    assert not up.staging.exists()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_disk_error_fails_the_write_and_discard_still_cleans_up(tmp_path, pool, monkeypatch):
    fds = _open_fds()
    real = su.StreamedWrite.advance

    def full(self, end):
        if end > su.STEP:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, end)

    monkeypatch.setattr(su.StreamedWrite, "advance", full)
    up = receive(tmp_path, pool, os.urandom(3 * su.STEP), CONFIG)
    writing, _ = up.complete(CONFIG, up.view())
    with pytest.raises(OSError) as err:
        writing.result(10)
    assert err.value.errno == errno.ENOSPC
    up.discard().result(10)
    assert _open_fds() == fds  # (the staging directory is the registry's to remove: it was handed over)
    bare = receive(tmp_path, pool, os.urandom(3 * su.STEP), CONFIG, seed=5)  # failing before any complete
    bare.discard().result(10)
    assert not bare.staging.exists() and _open_fds() == fds


def test_a_chain_runs_in_order_and_skips_all_but_clean_up_after_a_failure(pool):
    chain, seen = su._Chain(pool), []
    gate = threading.Event()
    chain.submit(gate.wait, 10)  # later jobs queue behind it
    futures = [chain.submit(seen.append, i) for i in range(50)]
    boom = chain.submit(lambda: 1 / 0)
    skipped = chain.submit(seen.append, "skipped")
    cleanup = chain.submit(seen.append, "cleanup", always=True)
    gate.set()
    cleanup.result(10)
    assert seen == list(range(50)) + ["cleanup"] and all(f.done() for f in futures)
    assert isinstance(boom.exception(), ZeroDivisionError) and isinstance(skipped.exception(), ZeroDivisionError)


def test_a_buffer_is_reused_only_once_no_view_of_it_is_alive():
    buffers = su.ReceiveBuffers(keep=2)
    first = buffers.take(10_000)
    view = torch.frombuffer(memoryview(first)[:4096], dtype=torch.float32)[3:7]  # a view of a view
    buffers.give_back(first)
    assert buffers.take(10_000) is not first
    del view
    assert buffers.take(10_000) is first  # now nothing views it
    buffers.give_back(first)
    assert buffers.take(100 << 20) is not first  # too small for this one
    big = buffers.take(100 << 20)
    buffers.give_back(big)  # over max_bytes: never kept
    assert buffers.take(100) is first  # a kept buffer serves a smaller upload


@pytest.mark.parametrize("make_view", [
    lambda b: memoryview(b)[1:2], lambda b: memoryview(b).toreadonly(), lambda b: np.frombuffer(b, dtype=np.uint8)[::2],
    lambda b: torch.frombuffer(memoryview(b)[:64], dtype=torch.float32).view(4, 4).T,
])
def test_every_kind_of_view_we_make_holds_the_buffer(make_view):
    buffers = su.ReceiveBuffers()
    buf = buffers.take(4096)
    view = make_view(buf)
    buffers.give_back(buf)
    assert not su._unexported(buf) and buffers.take(4096) is not buf
    del view
    assert su._unexported(buf) and buffers.take(4096) is buf


def test_a_discarded_upload_gives_its_buffer_back_for_the_next(tmp_path, pool):
    buffers = su.ReceiveBuffers()
    data = os.urandom(3 * su.STEP)
    up = receive(tmp_path, pool, data, CONFIG, buffers=buffers)
    writing, hashing = up.complete(CONFIG, up.view())
    writing.result(10)
    hashing.result(10)
    up.discard().result(10)
    buf = up.buffer
    nxt = receive(tmp_path, pool, data[::-1], CONFIG, seed=9, buffers=buffers)
    assert nxt.buffer is buf  # resident memory, no page faults for the next upload
    writing, hashing = nxt.complete(CONFIG, nxt.view())
    writing.result(10)
    assert hashing.result(10) == content_hash(CONFIG, data[::-1])  # no byte of the earlier upload
    assert (nxt.staging / "w.safetensors").read_bytes() == data[::-1]
    nxt.discard().result(10)
