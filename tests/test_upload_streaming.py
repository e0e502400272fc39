"""POST /adapters with the weights streamed in (server/streamed_upload.py) and without.

A body with a declared length is parsed as it arrives and its weights are hashed and written
during the transfer; a chunked body is read whole first. Both must register the same version
of the same bytes and serve PEFT's tokens; the order of the parts decides only whether the hash
could stream (guarded: the registry's own hash runs exactly when it could not); a refused
streamed upload leaves nothing behind, and its receive buffer serves the next upload."""

from __future__ import annotations

import httpx
import pytest

from peftserve.adapters.artifact import content_hash
from peftserve.server import registry as registry_mod
from peftserve.server import streamed_upload
from tests.test_adapters_api import (P, adapter_server, disk_state, expect_refused, lib, staging_leftovers,  # noqa: F401
                                     tokens, upload)

pytestmark = pytest.mark.anyio


@pytest.fixture
def registry_hashes(monkeypatch):
    """Counts the registry's own content hashes (those that did not stream)."""
    calls = []
    real = registry_mod.content_hash
    monkeypatch.setattr(registry_mod, "content_hash", lambda *a: calls.append(1) or real(*a))
    return calls


def _multipart(art, name: str, config_first: bool) -> tuple[bytes, str]:
    files = art.files()
    order = ["adapter_config", "adapter_model"] if config_first else ["adapter_model", "adapter_config"]
    req = httpx.Request("POST", "http://test/adapters", data={"name": name}, files={k: files[k] for k in order})
    return req.read(), req.headers["content-type"]


async def _post(client, body: bytes, ctype: str, chunked: bool) -> httpx.Response:
    if chunked:  # no Content-Length: the body is read whole, then parsed
        async def pieces():
            for i in range(0, len(body), 7000):
                yield body[i:i + 7000]
        return await client.post("/adapters", content=pieces(), headers={"content-type": ctype})
    return await client.post("/adapters", content=body, headers={"content-type": ctype})


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_body_cut_short_is_a_bad_request_and_leaves_nothing(adapter_server, lib, chunked):
    """The whole body arrived (its declared length, or a chunked body's end) but its multipart
    stops before the closing boundary: 400 bad_request naming that, not a field "missing"; the
    weights streamed so far are discarded and the store is as it was."""
    server = adapter_server()
    body, ctype = _multipart(lib.get("qv"), "cut", config_first=True)
    async with server.client() as client:
        before = disk_state(server.store)
        for cut in (len(body) - 4, len(body) - 300):
            resp = await _post(client, body[:cut], ctype, chunked)
            assert resp.status_code == 400, resp.text
            assert resp.json()["error"]["code"] == "bad_request" and "closing boundary" in resp.text, resp.text
            assert staging_leftovers(server.store) == [] and disk_state(server.store) == before
        resp = await _post(client, body, ctype, chunked)
        assert resp.status_code == 201, resp.text


@pytest.mark.parametrize("config_first,chunked,own_hashes", [(True, False, 0), (False, False, 1), (True, True, 1)])
async def test_each_way_in_registers_the_same_version_and_serves_peft(adapter_server, lib, registry_hashes,
                                                                       config_first, chunked, own_hashes):
    art = lib.get("qv")
    server = adapter_server()
    body, ctype = _multipart(art, "qv", config_first)
    async with server.client() as client:
        resp = await _post(client, body, ctype, chunked)
        assert resp.status_code == 201, resp.text
        assert resp.json()["version"] == content_hash(art.config, art.weights)[:16]
        assert len(registry_hashes) == own_hashes  # streamed: hashed during the transfer
        assert (server.store / "qv" / resp.json()["version"] / "adapter_model.safetensors").read_bytes() == art.weights
        assert (server.store / "qv" / resp.json()["version"] / "adapter_config.json").read_bytes() == art.config
        assert await tokens(client, P[0], "qv") == lib.ref("qv", P[0])
    assert staging_leftovers(server.store) == []


async def test_a_refused_streamed_upload_leaves_nothing_and_the_next_one_is_exact(adapter_server, lib, monkeypatch):
    buffers = streamed_upload.ReceiveBuffers()
    monkeypatch.setattr(streamed_upload, "RECEIVE_BUFFERS", buffers)
    taken = []
    real_take = buffers.take
    monkeypatch.setattr(buffers, "take", lambda n: taken.append(real_take(n)) or taken[-1])
    server = adapter_server()
    good, other = lib.get("qv"), lib.get("qv2")
    corrupt = good.weights[:-64] + b"\x00\x00\xc0\x7f" * 16  # NaNs at the end: refused by validation
    async with server.client() as client:
        await expect_refused(server, client, lambda: upload(client, "bad", good, weights=corrupt), 422,
                             "non_finite", strict=False)
        assert staging_leftovers(server.store) == []
        resp = await upload(client, "qv2", other)
        assert resp.status_code == 201, resp.text
        assert len(taken) == 2 and taken[1] is taken[0]  # the refused upload's buffer, reused
        assert (server.store / "qv2" / resp.json()["version"] / "adapter_model.safetensors").read_bytes() == \
            other.weights
        assert await tokens(client, P[1], "qv2") == lib.ref("qv2", P[1])
    assert staging_leftovers(server.store) == [] and "bad" not in disk_state(server.store)


async def test_a_client_that_goes_away_mid_upload_leaves_nothing_behind(adapter_server, lib):
    """The connection drops while the weights are streaming in (ASGI `http.disconnect`): the
    staging directory with its half-written file goes, and the store is as it was."""
    server = adapter_server()
    art = lib.get("qv")
    async with server.client() as client:
        assert (await upload(client, "keep", art)).status_code == 201
    before = disk_state(server.store)
    opened, real_prepare = [], server.registry.prepare_upload
    server.registry.prepare_upload = lambda n: opened.append(real_prepare(n)) or opened[-1]
    body, ctype = _multipart(art, "gone", config_first=True)
    cut = len(body) - len(art.weights) // 2  # inside the weights part
    messages = [{"type": "http.request", "body": body[:cut // 2], "more_body": True},
                {"type": "http.request", "body": body[cut // 2:cut], "more_body": True},
                {"type": "http.disconnect"}]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    try:
        await server.app(_asgi_upload(ctype, len(body)), receive, send)
    except Exception:  # how the framework reports a vanished client is its business; the disk is ours
        pass
    assert not messages  # the route read up to the disconnect
    assert len(opened) == 1 and opened[0].size > 0  # guard: the weights were streaming when it went
    assert staging_leftovers(server.store) == [] and disk_state(server.store) == before


def _gauge(text: str, name: str, label: str) -> float:
    prefix = f'{name}{{buffer="{label}"}} '
    return next(float(line[len(prefix):]) for line in text.splitlines() if line.startswith(prefix))


async def test_the_buffers_kept_for_uploads_are_on_metrics(adapter_server, lib, monkeypatch):
    """The receive buffer an upload leaves for the next is resident memory: /metrics says how much."""
    buffers = streamed_upload.ReceiveBuffers()
    monkeypatch.setattr(streamed_upload, "RECEIVE_BUFFERS", buffers)
    server = adapter_server()
    async with server.client() as client:
        text = (await client.get("/metrics")).text
        assert _gauge(text, "peftserve_host_buffer_bytes", "receive") == 0
        art = lib.get("qv")
        assert (await upload(client, "qv", art)).status_code == 201
        text = (await client.get("/metrics")).text
        kept = _gauge(text, "peftserve_host_buffer_bytes", "receive")
        assert kept == buffers.nbytes() and len(art.weights) < kept < len(art.weights) + (1 << 20)
        for label in ("direct_write", "scratch", "arena"):
            assert _gauge(text, "peftserve_host_buffer_bytes", label) >= 0


@pytest.mark.parametrize("where", ["stream", "staging"])
async def test_disk_full_while_streaming_is_507_and_commits_nothing(adapter_server, lib, monkeypatch, where):
    """The disk fills while the weights stream to staging (a write of the stream, or making its
    staging directory): 507 insufficient_storage, nothing committed, the next upload works."""
    import errno

    from peftserve.server import durable_write

    server = adapter_server()
    full = OSError(errno.ENOSPC, "No space left on device")
    if where == "stream":
        def advance(self, end):
            raise full
        monkeypatch.setattr(durable_write.StreamedWrite, "advance", advance)
        monkeypatch.setattr(durable_write.StreamedWrite, "finish", lambda self, n: (_ for _ in ()).throw(full))
    else:
        monkeypatch.setattr(type(server.registry), "prepare_upload", lambda self, n: (_ for _ in ()).throw(full))
    async with server.client() as client:
        await expect_refused(server, client, lambda: upload(client, "d", lib.get("qv")), 507, "insufficient_storage")
        assert staging_leftovers(server.store) == []
        monkeypatch.undo()
        assert (await upload(client, "d", lib.get("qv"))).status_code == 201
        assert await tokens(client, P[0], "d") == lib.ref("qv", P[0])


def _asgi_upload(ctype: str, length: int):
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": "/adapters", "raw_path": b"/adapters", "query_string": b"",
            "root_path": "", "server": ("test", 80), "client": ("127.0.0.1", 1),
            "headers": [(b"host", b"test"), (b"content-type", ctype.encode()),
                        (b"content-length", str(length).encode())]}


async def test_stalled_uploads_tie_up_no_thread(adapter_server, lib, monkeypatch):
    """Clients that stop sending mid-weights (more of them than the store's writer threads)
    hold no pool thread: another upload completes meanwhile, and the stalled ones clean up."""
    import asyncio

    monkeypatch.setattr(streamed_upload, "STEP", 256)  # many hash / disk jobs per upload
    server = adapter_server()
    art = lib.get("qv")
    body, ctype = _multipart(art, "stalled", config_first=True)
    cut = len(body) - 512  # inside the weights part, several steps in
    go_on = asyncio.Event()
    stalled = 4  # the store writes on 2 threads

    async def stall_then_leave():
        sent = []

        async def receive():
            if not sent:
                sent.append(1)
                return {"type": "http.request", "body": body[:cut], "more_body": True}
            await go_on.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            pass

        try:
            await server.app(_asgi_upload(ctype, len(body)), receive, send)
        except Exception:
            pass

    tasks = [asyncio.create_task(stall_then_leave()) for _ in range(stalled)]
    await asyncio.sleep(0.5)
    assert len(staging_leftovers(server.store)) == stalled  # guard: each is streaming into staging
    async with server.client() as client:
        resp = await asyncio.wait_for(upload(client, "other", lib.get("qv2")), 30)
        assert resp.status_code == 201, resp.text
    go_on.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    assert staging_leftovers(server.store) == []
