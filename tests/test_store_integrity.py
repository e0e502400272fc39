"""Store integrity: every load from disk verifies the content hash against the version id.

Issue 9 reproductions (an adapter evicted from host memory to the disk tier, then its files are
changed behind the server's back): a replaced `adapter_model.safetensors` was served under the
same version hash, a deleted version directory answered 500, a corrupted file answered
422 invalid_safetensors. Each must now quarantine the adapter and answer 503
`adapter_unavailable`, with an error log line and `peftserve_adapter_store_errors_total{reason}`.
"""

from __future__ import annotations

import logging
import shutil

import pytest

from tests.test_adapters_api import (  # noqa: F401  (fixtures)
    P,
    adapter_server,
    generate,
    lib,
    registry_view,
    scaled_variant,
    tokens,
    upload,
)
from tests.test_api import assert_error

pytestmark = [pytest.mark.anyio, pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")]


def weights_file(server, name: str, version: str):
    return server.store / name / version / "adapter_model.safetensors"


async def evicted_to_disk(server, client, lib) -> str:
    """Upload `victim` (LoRA qv) then `other`: with one host-memory slot, `victim` lives on disk
    only. -> victim's version."""
    version = (await upload(client, "victim", lib.get("qv"))).json()["version"]
    assert await tokens(client, P[0], "victim") == lib.ref("qv", P[0])
    assert (await upload(client, "other", lib.get("mlp"))).status_code == 201
    assert server.registry.get("victim").loaded is None  # evicted: next use reloads from disk
    return version


def store_error_count(server, reason: str) -> float:
    body, _ = server.metrics.render()
    text = body.decode() if isinstance(body, bytes) else body
    line = f'peftserve_adapter_store_errors_total{{reason="{reason}"}} '
    return float(next(ln for ln in text.splitlines() if ln.startswith(line)).split()[-1])


def break_replace(server, name, version, lib):
    # another valid adapter of the same shape: parses fine, but is not this version's content
    weights_file(server, name, version).write_bytes(scaled_variant(lib.get("qv"), 3.0))


def break_delete_dir(server, name, version, lib):
    shutil.rmtree(server.store / name / version)


def break_truncate(server, name, version, lib):
    f = weights_file(server, name, version)
    f.write_bytes(f.read_bytes()[:-100])


def break_unreadable(server, name, version, lib):
    f = weights_file(server, name, version)
    f.unlink()
    f.mkdir()  # reading it fails with IsADirectoryError (chmod does not stop root)


def break_fifo(server, name, version, lib):
    import os

    f = weights_file(server, name, version)
    f.unlink()
    os.mkfifo(f)  # a plain read would block forever


def break_huge(server, name, version, lib):
    f = weights_file(server, name, version)
    with open(f, "r+b") as fh:  # sparse: over the registry's size cap without using the disk
        fh.truncate(server.registry.settings.limits.max_bytes + 1)


BREAKS = {"replaced": (break_replace, "hash_mismatch"), "dir_deleted": (break_delete_dir, "missing"),
          "truncated": (break_truncate, "hash_mismatch"), "unreadable": (break_unreadable, "unreadable"),
          "fifo": (break_fifo, "unreadable"), "huge": (break_huge, "unreadable")}


@pytest.mark.parametrize("case", list(BREAKS))
async def test_changed_store_file_is_quarantined_and_503(adapter_server, lib, case, caplog):
    server = adapter_server(registry_settings={"max_cpu_adapters": 1})
    breaker, reason = BREAKS[case]
    async with server.client() as client:
        version = await evicted_to_disk(server, client, lib)
        breaker(server, "victim", version, lib)
        with caplog.at_level(logging.ERROR, logger="peftserve.server.registry"):
            assert_error(await generate(client, P[0], "victim"), 503, "adapter_unavailable")
        assert any(r.levelno == logging.ERROR and getattr(r, "adapter", None) == "victim" for r in caplog.records)
        assert store_error_count(server, reason) == 1
        # quarantined: out of the store and the listing; later requests keep answering 503, never other weights
        assert not (server.store / "victim").exists()
        moved = [p.name for p in (server.store / ".quarantine").iterdir()] if case != "dir_deleted" or \
            (server.store / ".quarantine").exists() else []
        assert all(m.startswith("victim-") for m in moved) and len(moved) == 1
        assert [a["name"] for a in await registry_view(client)] == ["other"]
        assert_error(await generate(client, P[0], "victim"), 503, "adapter_unavailable")
        assert_error(await client.get("/adapters/victim"), 503, "adapter_unavailable")
        assert_error(await generate(client, P[0], [{"name": "victim", "weight": 1.0}]), 503, "adapter_unavailable")
        # everyone else is unaffected
        assert await tokens(client, P[0], "other") == lib.ref("mlp", P[0])
        assert (await client.get("/health")).status_code == 200
        # the uploader can put it back; it serves its own weights again
        assert (await upload(client, "victim", lib.get("qv"))).json()["version"] == version
        assert await tokens(client, P[0], "victim") == lib.ref("qv", P[0])


async def test_deleting_a_quarantined_adapter(adapter_server, lib):
    server = adapter_server(registry_settings={"max_cpu_adapters": 1})
    async with server.client() as client:
        version = await evicted_to_disk(server, client, lib)
        break_replace(server, "victim", version, lib)
        assert_error(await generate(client, P[0], "victim"), 503, "adapter_unavailable")
        assert (await client.delete("/adapters/victim")).status_code == 200
        assert_error(await generate(client, P[0], "victim"), 404, "adapter_not_found")


async def test_intact_reload_still_serves_and_is_not_an_error(adapter_server, lib):
    server = adapter_server(registry_settings={"max_cpu_adapters": 1})
    async with server.client() as client:
        await evicted_to_disk(server, client, lib)
        assert await tokens(client, P[1], "victim") == lib.ref("qv", P[1])
        assert server.registry.stats["disk_loads"] >= 1
        for reason in ("hash_mismatch", "missing", "unreadable", "invalid"):
            assert store_error_count(server, reason) == 0


async def test_start_up_verification_counts_store_errors(adapter_server, lib, tmp_path):
    store = tmp_path / "persist"
    first = adapter_server(store=store)
    async with first.client() as client:
        good = (await upload(client, "good", lib.get("qv"))).json()["version"]
        bad = (await upload(client, "bad", lib.get("mlp"))).json()["version"]
    first.close()
    # the replacement is a valid adapter of the same kind and shape: only the hash can tell
    (store / "bad" / bad / "adapter_model.safetensors").write_bytes(scaled_variant(lib.get("mlp"), 2.0))
    second = adapter_server(store=store)
    assert second.loaded == ["good"]
    assert store_error_count(second, "hash_mismatch") == 1
    async with second.client() as client:
        assert (await registry_view(client))[0]["version"] == good
        assert_error(await generate(client, P[0], "bad"), 404, "adapter_not_found")


async def test_a_cold_load_does_not_hold_up_a_resident_adapters_request(adapter_server, lib, monkeypatch):
    """Through HTTP: while `victim`'s reload from a (simulated) slow store is stuck, a request for
    the resident `other` completes with its exact tokens; then `victim` completes too."""
    import asyncio
    import threading

    import peftserve.server.registry as registry_mod

    server = adapter_server(registry_settings={"max_cpu_adapters": 1})
    async with server.client() as client:
        version = await evicted_to_disk(server, client, lib)
        entered, gate = threading.Event(), threading.Event()
        real = registry_mod.read_inside

        def slow_read(root, name, max_bytes):
            if root.name == version:
                entered.set()
                assert gate.wait(60)
            return real(root, name, max_bytes)
        monkeypatch.setattr(registry_mod, "read_inside", slow_read)
        cold = asyncio.ensure_future(tokens(client, P[1], "victim"))
        for _ in range(600):
            if entered.is_set():
                break
            await asyncio.sleep(0.05)
        assert entered.is_set()
        assert await asyncio.wait_for(tokens(client, P[0], "other"), 60) == lib.ref("mlp", P[0])
        assert not cold.done()  # still waiting for its store read
        gate.set()
        assert await asyncio.wait_for(cold, 60) == lib.ref("qv", P[1])
