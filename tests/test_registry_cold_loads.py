"""Host tier (issue 13, many adapters): loads from disk happen outside the registry lock, one per
version; the tier is bounded by bytes (LRU); an upload's validated weights serve its first request.

A slow store is simulated by wrapping the registry's bounded reader (`read_inside`) with a gate:
reads of the gated version directory block until the test opens it.
"""

from __future__ import annotations

import threading

import pytest

import peftserve.server.registry as registry_mod
from tests.conftest import build_tiny_model
from tests.test_adapters_api import lib, scaled_variant  # noqa: F401  (lib: session fixture)

TIMEOUT = 30


@pytest.fixture
def make_registry(tmp_path, smollm_tokenizer):
    from peftserve.adapters.spec import BaseModelSpec
    from peftserve.server.registry import AdapterRegistry, RegistrySettings

    spec = BaseModelSpec.from_model(build_tiny_model(len(smollm_tokenizer), 0), "tiny")

    def make(**settings):
        return AdapterRegistry(spec, RegistrySettings(store=tmp_path / "store", **settings))
    return make


class SlowStore:
    """Gate on reads of one version directory; counts the reads that reach it."""

    def __init__(self, monkeypatch, version: str):
        self.version, self.entered, self.open = version, threading.Event(), threading.Event()
        self.reads = 0
        real = registry_mod.read_inside

        def read_inside(root, name, max_bytes):
            if root.name == self.version:
                self.reads += 1
                self.entered.set()
                assert self.open.wait(TIMEOUT), "test never opened the gate"
            return real(root, name, max_bytes)
        monkeypatch.setattr(registry_mod, "read_inside", read_inside)


def in_thread(fn, *args):
    out: dict = {}

    def run():
        try:
            out["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            out["error"] = exc
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_cold_load_does_not_block_resident_adapter(make_registry, lib, monkeypatch):
    reg = make_registry()
    art = lib.get("qv")
    reg.add("hot", art.config, art.weights)
    cold = reg.add("cold", art.config, scaled_variant(art, 2.0))
    reg.release("cold")  # weights back to disk only, as after a host-tier eviction
    slow = SlowStore(monkeypatch, cold.version)
    t, out = in_thread(reg.resolve, "cold")
    assert slow.entered.wait(TIMEOUT)  # the cold load is now stuck reading the store
    # Resident adapters resolve while it is stuck (before: the load held the registry lock).
    t2, out2 = in_thread(reg.resolve, "hot")
    t2.join(5)
    assert not t2.is_alive(), "a resident adapter's resolve waited for another adapter's disk load"
    assert out2["value"].loaded is not None and t.is_alive()
    # ... and so do listing and uploading.
    assert [v.name for v in reg.list()] == ["cold", "hot"]
    t3, out3 = in_thread(reg.add, "new", art.config, scaled_variant(art, 3.0))
    t3.join(TIMEOUT)
    assert not t3.is_alive() and "error" not in out3
    slow.open.set()
    t.join(TIMEOUT)
    assert out["value"].version == cold.version and out["value"].loaded is not None
    assert reg.tier(reg.get("cold")) == "memory" and reg.stats["disk_loads"] == 1


def test_concurrent_requests_for_one_cold_version_load_it_once(make_registry, lib, monkeypatch):
    reg = make_registry()
    art = lib.get("qv")
    cold = reg.add("cold", art.config, art.weights)
    reg.release("cold")
    slow = SlowStore(monkeypatch, cold.version)
    threads = [in_thread(reg.resolve, "cold") for _ in range(8)]
    assert slow.entered.wait(TIMEOUT)
    slow.open.set()
    for t, _ in threads:
        t.join(TIMEOUT)
    handles = [out["value"] for _, out in threads]
    assert all(h.version == cold.version and h.loaded is not None for h in handles)
    assert len({id(h.loaded) for h in handles}) == 1  # one set of weights, shared
    assert reg.stats["disk_loads"] == 1
    assert slow.reads == 2  # config + weights, once
    assert not reg._loading  # no future left behind


def test_replace_during_a_cold_load_serves_the_new_version_without_quarantine(make_registry, lib, monkeypatch):
    reg = make_registry()
    art = lib.get("qv")
    old = reg.add("x", art.config, art.weights)
    reg.release("x")
    slow = SlowStore(monkeypatch, old.version)
    t, out = in_thread(reg.resolve, "x")
    assert slow.entered.wait(TIMEOUT)
    new = reg.add("x", art.config, scaled_variant(art, 2.0), replace=True)  # removes old's files
    slow.open.set()
    t.join(TIMEOUT)
    assert out["value"].version == new.version
    assert reg.get("x") is new and not reg.store_errors
    assert not (reg.store / ".quarantine").exists()


def test_failed_cold_load_quarantines_and_fails_every_waiter(make_registry, lib, monkeypatch):
    from peftserve.server.errors import AdapterUnavailable

    reg = make_registry()
    art = lib.get("qv")
    ver = reg.add("x", art.config, art.weights)
    reg.release("x")
    (reg.store / "x" / ver.version / "adapter_model.safetensors").write_bytes(scaled_variant(art, 2.0))
    slow = SlowStore(monkeypatch, ver.version)
    threads = [in_thread(reg.resolve, "x") for _ in range(3)]
    assert slow.entered.wait(TIMEOUT)
    slow.open.set()
    for t, _ in threads:
        t.join(TIMEOUT)
    assert all(isinstance(out.get("error"), AdapterUnavailable) for _, out in threads)
    assert reg.store_errors == {"hash_mismatch": 1} and not reg._loading
    with pytest.raises(AdapterUnavailable):
        reg.resolve("x")


def test_host_tier_is_bounded_by_bytes_lru(make_registry, lib):
    art = lib.get("qv")
    probe = make_registry()
    size = probe.add("probe", art.config, art.weights).nbytes
    probe.delete("probe")
    reg = make_registry(max_cpu_bytes=int(size * 2.5))  # room for two; the count cap does not bind
    a = reg.add("a", art.config, scaled_variant(art, 1.5))
    b = reg.add("b", art.config, scaled_variant(art, 2.0))
    reg.add("c", art.config, scaled_variant(art, 2.5))
    assert [reg.tier(reg.get(n)) for n in "abc"] == ["disk", "memory", "memory"]
    assert reg.resident_bytes() <= int(size * 2.5)
    reg.resolve("b")  # b is now the most recently used: c goes next
    reg.add("d", art.config, scaled_variant(art, 3.0))
    assert [reg.tier(reg.get(n)) for n in "abcd"] == ["disk", "memory", "disk", "memory"]
    assert reg.resolve("a").version == a.version and reg.stats["disk_loads"] == 1  # back from disk ...
    assert reg.tier(reg.get("b")) == "disk"  # ... evicting the LRU one (b was used before d)
    assert b.loaded is None and reg.stats["memory_evictions"] == 3


def test_default_count_cap_does_not_bind_before_bytes():
    from peftserve.server.registry import RegistrySettings

    s = RegistrySettings(store=".")
    assert s.max_cpu_adapters >= 10_000  # 1,000 registered adapters stay resident if their bytes fit


def test_uploaded_adapter_serves_first_request_without_disk_read(make_registry, lib, monkeypatch):
    reg = make_registry()
    art = lib.get("qv")

    def no_disk(*args):
        raise AssertionError("read the store")
    monkeypatch.setattr(reg, "_load_version", no_disk)
    ver = reg.add("fresh", art.config, art.weights)
    handle = reg.resolve("fresh")
    assert handle.version == ver.version and handle.loaded is ver.loaded and reg.stats["disk_loads"] == 0


# -- staging: the device copy is prepared off the engine thread (CPU device) ---------------------
def _staged_serving(tmp_path, names=("a", "b")):
    from tests.test_engine_faults import _serving

    return _serving(tmp_path, names)  # an upload is staged before its answer: nothing to wait for


def test_upload_is_staged_and_its_first_request_installs_the_staged_copy(tmp_path, monkeypatch):
    from peftserve.server.engine.request import SamplingParams

    serving = _staged_serving(tmp_path)
    rt, reg = serving.runtime, serving.registry
    assert set(rt._staged) == {reg.get("a").key, reg.get("b").key}  # both uploads were staged by `add`
    calls = []
    real = rt.kinds[reg.get("a").kind].to_device
    monkeypatch.setattr(type(rt.kinds[reg.get("a").kind]), "to_device",
                        lambda self, *a: calls.append(1) or real(*a))
    prompt = [5, 6, 7, 8]
    out = serving.engine.generate([prompt], SamplingParams(max_new_tokens=4), adapters=[reg.resolve("a")])
    assert calls == [] and rt.stats["staged_installs"] == 1  # the engine thread did not copy
    assert reg.get("a").key not in rt._staged
    # same tokens as an install that copies on the engine thread
    rt._discard_staged()
    rt.drop(reg.get("a").key)
    monkeypatch.setattr(rt, "stage", lambda ver: False)
    again = serving.engine.generate([prompt], SamplingParams(max_new_tokens=4), adapters=[reg.resolve("a")])
    assert calls == [1] and again[0].output_ids == out[0].output_ids


def test_resident_versions_are_not_staged_and_staging_is_bounded(tmp_path):
    from peftserve.server.engine.request import SamplingParams

    serving = _staged_serving(tmp_path)
    rt, reg = serving.runtime, serving.registry
    serving.engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=1), adapters=[reg.resolve("a")])
    assert rt.is_resident(reg.get("a").key)
    assert rt.stage(reg.resolve("a")) is False  # installed: nothing to prepare
    rt.max_staged = 1
    rt._discard_staged()
    assert rt.stage(reg.get("b")) is True and list(rt._staged) == [reg.get("b").key]
    rt.drop(reg.get("b").key)
    assert not rt._staged  # a dropped version's staged copy goes with it
    rt.max_staged, rt.max_staged_bytes = 8, reg.get("a").nbytes  # room for one by bytes
    rt.drop(reg.get("a").key)  # not installed any more, so it may be staged
    assert rt.stage(reg.get("a")) and rt.stage(reg.get("b"))
    assert list(rt._staged) == [reg.get("b").key]  # the byte budget dropped the older one


def test_install_waits_for_a_staging_in_flight_instead_of_copying_again(tmp_path, monkeypatch):
    import time

    serving = _staged_serving(tmp_path, names=("a",))
    rt, ver = serving.runtime, serving.registry.get("a")
    rt._discard_staged()
    kind = type(rt.kinds[ver.kind])
    real, gate, calls = kind.to_device, threading.Event(), []

    def slow(self, *args):
        calls.append(1)
        assert gate.wait(TIMEOUT)
        return real(self, *args)
    monkeypatch.setattr(kind, "to_device", slow)
    stager, _ = in_thread(rt.stage, ver)
    while not calls:
        time.sleep(0.01)
    taker, got = in_thread(rt._take_staged, ver.key, TIMEOUT)
    time.sleep(0.2)
    assert taker.is_alive()  # waiting for the stager, not copying itself
    gate.set()
    taker.join(TIMEOUT)
    stager.join(TIMEOUT)
    assert got["value"] is not None and len(calls) == 1 and not rt._staged


# -- durability: the 201 comes after the version is on stable storage, names included -----------
def test_an_upload_is_durable_before_add_returns(make_registry, lib, monkeypatch):
    """Every file fsync'd before its directory is renamed into the store; then the directories
    holding the renamed names fsync'd (a rename is durable only once its directory is): the
    adapter's directory after both renames (version directory, CURRENT), the store's for a new
    adapter's directory. A replace of an existing name needs no store-level sync."""
    import os
    from pathlib import Path

    events = []
    real_replace, real_sync, real_fsync = os.replace, registry_mod.sync_dir, os.fsync
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("rename", Path(b).name)) or real_replace(a, b))
    monkeypatch.setattr(registry_mod, "sync_dir", lambda p: events.append(("sync", Path(p).name)) or real_sync(p))
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    reg = make_registry()
    art = lib.get("qv")
    ver = reg.add("fresh", art.config, art.weights)
    names = [(e, Path(x).name if e == "fsync" else x) for e, x in events]
    files = {x for e, x in names if e == "fsync"}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files
    moved = names.index(("rename", ver.version))  # the staging directory into the store
    assert names.index(("rename", "CURRENT")) > moved
    staged_sync = [i for i, (e, x) in enumerate(names) if e == "sync" and x not in ("fresh", "store")]
    assert staged_sync and max(staged_sync) < moved  # the staging directory's names synced before
    assert all(names.index(("fsync", f)) < moved for f in ("adapter_model.safetensors", "adapter_config.json"))
    last_rename = names.index(("rename", "CURRENT"))
    assert ("sync", "fresh") in names[last_rename:] and ("sync", "store") in names[last_rename:]
    events.clear()
    reg.add("fresh", art.config, scaled_variant(art, 2.0), replace=True)
    syncs = [x for e, x in events if e == "sync"]
    assert "fresh" in syncs and "store" not in syncs
