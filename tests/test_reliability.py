"""Reliability of the adapter API under hostile input and injected faults
(../shared/docs/reliability-checklist.md, sections 7.1 and 7.2).

Every refused upload is checked for its status AND `error.code`, for leaving the registry
(`GET /adapters`) and the store dir (recursive listing + sha256) exactly as they were, with
nothing staged; pickles are never unpickled (a sentinel file their `__reduce__` would create
never appears). Then: good traffic during bad uploads, device-slot and host-memory LRU thrash
against per-adapter PEFT references, a failure injected into one engine step, disk full during
an upload, and soft-prompt adapters (parity with PEFT and their virtual tokens counting against
the context).
"""

from __future__ import annotations

import asyncio
import errno
import io
import json
import os
import pickle
import struct

import httpx
import pytest
import torch

from peftserve.server.state import ServerSettings
from tests.conftest import build_tiny_model
from tests.test_adapters_api import (NEW, P, AdapterServer, adapter_server, assert_error, disk_state,  # noqa: F401
                                     edit_config, expect_refused, generate, lib, registry_view, save_tensors,
                                     stable, staging_leftovers, tensors_of, tokens, upload)

pytestmark = pytest.mark.anyio

UPLOAD_CAP = 64 * 1024
MAX_LEN = 128


class Evil:
    """Unpickling this creates `path` (stands in for arbitrary code execution)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def evil_pickle(path, protocol: int = pickle.DEFAULT_PROTOCOL) -> bytes:
    return pickle.dumps(Evil(str(path)), protocol=protocol)


def torch_saved(obj, legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def raw_safetensors(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory, smollm_tokenizer, lib):
    """One server for all hostile uploads (each case checks it left no trace): 64 KiB upload cap,
    one good adapter registered."""
    settings = ServerSettings(body_limits={"/adapters": UPLOAD_CAP})
    server = AdapterServer(build_tiny_model(len(smollm_tokenizer), 0), smollm_tokenizer,
                           tmp_path_factory.mktemp("hostile") / "store", settings=settings, max_model_len=MAX_LEN)
    art = lib.get("qv")
    server.registry.add("good", art.config, art.weights)
    yield server
    server.close()


@pytest.fixture(scope="module")
def sentinel_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("sentinels")


def test_evil_pickle_payload_really_creates_its_sentinel(tmp_path):
    """The payload is live: unpickling it (which the server must never do) creates the file."""
    probe = tmp_path / "probe"
    pickle.loads(evil_pickle(probe)).close()
    assert probe.exists()


# -- hostile artifacts: id -> (build(lib, sentinel) -> (config bytes, weights bytes), status, code) ---------------
def _w(lib, **edits):
    """qv's tensors with edits: key -> tensor (or None to drop the key)."""
    t = tensors_of(lib.get("qv").weights)
    for key, value in edits.items():
        if value is None:
            t.pop(key)
        else:
            t[key] = value
    return save_tensors(t)


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def _nan_a(lib):
    a = tensors_of(lib.get("qv").weights)[Q_A].clone()
    a[1, 3] = float("nan")
    return a


def _inf_b(lib):
    b = tensors_of(lib.get("qv").weights)[Q_B].clone()
    b[0, 0] = float("-inf")
    return b


def _cfg(lib, **changes):
    return edit_config(lib.get("qv"), **changes)


def _soft(lib, nvt: int, hidden: int = 64):
    cfg = edit_config(lib.get("soft"), num_virtual_tokens=nvt, token_dim=hidden)
    return cfg, save_tensors({"prompt_embeddings": torch.randn(nvt, hidden)})


INVALID_SAFETENSORS_STATUSES = (415, 422)  # the artifact layer answers 415 for pickle/zip ("never loaded")

HOSTILE = {
    "pickle-bin": (lambda lib, s: (lib.get("qv").config, evil_pickle(s / "pickle-bin")), 415, "invalid_safetensors"),
    "pickle-proto2": (lambda lib, s: (lib.get("qv").config, evil_pickle(s / "pickle-proto2", 2)), 415,
                      "invalid_safetensors"),
    "torch-legacy-pickle": (lambda lib, s: (lib.get("qv").config, torch_saved(Evil(str(s / "legacy")), legacy=True)),
                            415, "invalid_safetensors"),
    "torch-zip-renamed": (lambda lib, s: (lib.get("qv").config, torch_saved(tensors_of(lib.get("qv").weights))),
                          INVALID_SAFETENSORS_STATUSES, "invalid_safetensors"),
    "torch-zip-evil": (lambda lib, s: (lib.get("qv").config, torch_saved(Evil(str(s / "zip")))),
                       INVALID_SAFETENSORS_STATUSES, "invalid_safetensors"),
    "header-len-2^64-1": (lambda lib, s: (lib.get("qv").config, b"\xff" * 8 + b"{}"), 422, "invalid_safetensors"),
    "header-len-2^63": (lambda lib, s: (lib.get("qv").config, struct.pack("<Q", 2**63) + b"{}" * 8), 422,
                        "invalid_safetensors"),
    "header-len-past-eof": (lambda lib, s: (lib.get("qv").config, struct.pack("<Q", 1000) + b"{}"), 422,
                            "invalid_safetensors"),
    "header-not-json": (lambda lib, s: (lib.get("qv").config, struct.pack("<Q", 4) + b"{abc"), 422,
                        "invalid_safetensors"),
    "overlapping-offsets": (lambda lib, s: (lib.get("qv").config, raw_safetensors(
        {Q_A: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
         Q_B: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)), 422, "invalid_safetensors"),
    "empty-weights": (lambda lib, s: (lib.get("qv").config, b""), 422, "invalid_safetensors"),
    "nan-weights": (lambda lib, s: (lib.get("qv").config, _w(lib, **{Q_A: _nan_a(lib)})), 422, "non_finite"),
    "inf-weights": (lambda lib, s: (lib.get("qv").config, _w(lib, **{Q_B: _inf_b(lib)})), 422, "non_finite"),
    "f64-weights": (lambda lib, s: (lib.get("qv").config, _w(lib, **{Q_A: tensors_of(lib.get("qv").weights)[Q_A]
                                                                      .double()})), 422, "unsupported_dtype"),
    "rank-over-max": (lambda lib, s: (_cfg(lib, r=300), lib.get("qv").weights), 422, "invalid_config"),
    "rank-pattern-over-max": (lambda lib, s: (_cfg(lib, rank_pattern={"q_proj": 100000}), lib.get("qv").weights),
                              422, "invalid_config"),
    "rank-zero": (lambda lib, s: (_cfg(lib, r=0), lib.get("qv").weights), 422, "invalid_config"),
    "alpha-negative": (lambda lib, s: (_cfg(lib, lora_alpha=-8), lib.get("qv").weights), 422, "invalid_config"),
    "rank-disagrees-with-weights": (lambda lib, s: (_cfg(lib, r=8), lib.get("qv").weights), 422, "shape_mismatch"),
    "shape-vs-module": (lambda lib, s: (lib.get("qv").config, _w(lib, **{Q_A: torch.randn(4, 32)})), 422,
                        "shape_mismatch"),
    "unknown-module": (lambda lib, s: (lib.get("qv").config, _w(lib, **{
        "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight": torch.randn(4, 64)})), 422,
        "unknown_module"),
    "untargeted-module": (lambda lib, s: (lib.get("qv").config, _w(lib, **{
        "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight": torch.randn(4, 64)})), 422,
        "unknown_module"),
    "missing-lora-b": (lambda lib, s: (lib.get("qv").config, _w(lib, **{Q_B: None})), 422, "missing_weights"),
    "use-dora": (lambda lib, s: (_cfg(lib, use_dora=True), lib.get("qv").weights), 422, "unsupported_adapter"),
    "modules-to-save": (lambda lib, s: (_cfg(lib, modules_to_save=["lm_head"]), lib.get("qv").weights), 422,
                        "unsupported_adapter"),
    "bias-all": (lambda lib, s: (_cfg(lib, bias="all"), lib.get("qv").weights), 422, "unsupported_adapter"),
    "auto-map": (lambda lib, s: (_cfg(lib, auto_map={"AutoModel": "evil.Model"}), lib.get("qv").weights), 422,
                 "unsupported_adapter"),
    "unknown-peft-type": (lambda lib, s: (_cfg(lib, peft_type="LOHA"), lib.get("qv").weights), 422,
                          "unsupported_adapter"),
    "no-peft-type": (lambda lib, s: (_cfg(lib, peft_type=None), lib.get("qv").weights), 422, "invalid_config"),
    "config-not-json": (lambda lib, s: (b"{not json", lib.get("qv").weights), 422, "invalid_config"),
    "config-nan": (lambda lib, s: (lib.get("qv").config.replace(b'"lora_alpha": 8', b'"lora_alpha": NaN'),
                                   lib.get("qv").weights), 422, "invalid_config"),
    "soft-prompt-fills-context": (lambda lib, s: _soft(lib, MAX_LEN), 422, "shape_mismatch"),
    "soft-prompt-wrong-hidden": (lambda lib, s: _soft(lib, 8, hidden=32), 422, "shape_mismatch"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
async def test_hostile_upload_is_refused_without_trace(hostile_server, lib, sentinel_dir, case):
    build, status, code = HOSTILE[case]
    config, weights = build(lib, sentinel_dir)
    server = hostile_server
    async with server.client() as client:
        files = {"adapter_config": ("adapter_config.json", config),
                 "adapter_model": ("adapter_model.bin" if case.startswith("pickle") else "adapter_model.safetensors",
                                   weights)}
        before_view, before_disk = await registry_view(client), disk_state(server.store)
        resp = await client.post("/adapters", data={"name": "hostile"}, files=files)
        assert resp.status_code in (status if isinstance(status, tuple) else (status,)), resp.text
        assert_error(resp, resp.status_code, code)
        assert await registry_view(client) == before_view
        assert disk_state(server.store) == before_disk
        assert staging_leftovers(server.store) == []
        assert not (server.store / "hostile").exists()
        assert list(sentinel_dir.iterdir()) == []  # no pickle was ever unpickled
        assert await tokens(client, P[0], "good") == lib.ref("qv", P[0])


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/b", ".", "..", "", "a" * 300, "a" * 65, "a\x00b",
                                  "ádapter", "\u0430dapter", "名前", "ｆｕｌｌ", " lead", "trail ", "-dash",
                                  ".hidden", "x\ny", "a\\b", "~", "good/../good"])
async def test_invalid_adapter_names_are_422(hostile_server, lib, name):
    server = hostile_server
    async with server.client() as client:
        await expect_refused(server, client, lambda: upload(client, name, lib.get("mlp")), 422,
                             "invalid_adapter_name")
    assert sorted(p.name for p in server.store.iterdir()) == [".staging", "good"]


@pytest.mark.parametrize("path,status,code", [
    ("/adapters/%2e%2e", 422, "invalid_adapter_name"),
    ("/adapters/.staging", 422, "invalid_adapter_name"),
    ("/adapters/-x", 422, "invalid_adapter_name"),
    ("/adapters/a%00b", 422, "invalid_adapter_name"),
    ("/adapters/" + "a" * 300, 422, "invalid_adapter_name"),
    ("/adapters/..", 404, "not_found"),  # normalised to "/" by the client: no such route
    ("/adapters/%2e%2e%2fgood", 404, "not_found"),  # a "/" in the name never reaches the handler
    ("/adapters/good%2f..", 404, "not_found"),
    ("/adapters/nope", 404, "adapter_not_found"),
])
async def test_get_and_delete_with_bad_names_touch_nothing(hostile_server, path, status, code):
    server = hostile_server
    async with server.client() as client:
        for method in ("GET", "DELETE"):
            await expect_refused(server, client, lambda: client.request(method, path), status, code)
    assert sorted(p.name for p in server.store.iterdir()) == [".staging", "good"]


async def test_name_field_missing_is_invalid_name(hostile_server, lib):
    server = hostile_server
    async with server.client() as client:
        await expect_refused(server, client, lambda: client.post("/adapters", files=lib.get("qv").files()), 422,
                             "invalid_adapter_name")


async def test_upload_body_over_cap_is_413_and_store_back_to_baseline(hostile_server, lib):
    server = hostile_server
    big = os.urandom(UPLOAD_CAP + 1024)
    async with server.client() as client:
        # declared Content-Length over the cap: refused before the body is read
        await expect_refused(server, client, lambda: upload(client, "big", lib.get("qv"), weights=big), 413,
                             "body_too_large")
        # chunked (no Content-Length): refused when the running total crosses the cap
        request = client.build_request("POST", "/adapters", data={"name": "big"},
                                       files=lib.get("qv").files(weights=big))
        body = request.read()

        async def chunks():
            for i in range(0, len(body), 4096):
                yield body[i:i + 4096]

        headers = {"content-type": request.headers["content-type"]}  # no Content-Length: chunked
        resp = await expect_refused(server, client, lambda: client.post("/adapters", content=chunks(),
                                                                        headers=headers), 413, "body_too_large")
        assert resp.headers.get("connection") == "close"
        assert await tokens(client, P[0], "good") == lib.ref("qv", P[0])


async def test_upload_aborted_mid_body_leaves_no_trace(hostile_server, lib, live_server):
    server = hostile_server
    live = live_server(server.app)
    async with httpx.AsyncClient(base_url=live.url, timeout=30) as client:
        before_view, before_disk = await registry_view(client), disk_state(server.store)
        request = client.build_request("POST", "/adapters", data={"name": "aborted"}, files=lib.get("qv").files())
        body = request.read()
        head = (f"POST /adapters HTTP/1.1\r\nHost: test\r\nContent-Type: {request.headers['content-type']}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", live.port)
        writer.write(head + body[: len(body) // 2])  # half the body, then the client vanishes
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.close()
        await writer.wait_closed()
        await asyncio.sleep(0.3)
        assert await registry_view(client) == before_view
        assert disk_state(server.store) == before_disk
        assert staging_leftovers(server.store) == []
        assert (await client.get("/health")).status_code == 200
        assert await tokens(client, P[0], "good") == lib.ref("qv", P[0])


async def test_weights_over_registry_limit_is_413(adapter_server, lib):
    from peftserve.adapters.artifact import AdapterLimits

    server = adapter_server(registry_settings={"limits": AdapterLimits(max_bytes=4096)})
    async with server.client() as client:
        await expect_refused(server, client, lambda: upload(client, "big", lib.get("qv")), 413, "adapter_too_large")


@pytest.mark.parametrize("content_type,body", [
    ("application/json", b'{"name": "x"}'),
    ("application/octet-stream", b"\x00" * 64),
    ("application/x-www-form-urlencoded", b"name=x&adapter_config=a&adapter_model=b"),
    ("text/plain", b"name=x"),
    (None, b"name=x"),
], ids=["json", "octet-stream", "urlencoded", "text", "none"])
async def test_non_multipart_is_415(hostile_server, content_type, body):
    server = hostile_server
    headers = {"content-type": content_type} if content_type else {}
    async with server.client() as client:
        await expect_refused(server, client, lambda: client.post("/adapters", content=body, headers=headers), 415,
                             "unsupported_media_type")


async def test_missing_or_malformed_fields_are_422(hostile_server, lib):
    server = hostile_server
    art = lib.get("qv")
    files = art.files()
    async with server.client() as client:
        for missing in ("adapter_model", "adapter_config"):
            only = {k: v for k, v in files.items() if k != missing}
            await expect_refused(server, client, lambda: client.post("/adapters", data={"name": "m"}, files=only),
                                 422, "missing_file")
        # the weights as a plain form field instead of a file part
        await expect_refused(server, client, lambda: client.post(
            "/adapters", data={"name": "m", "adapter_model": "AAAA"},
            files={"adapter_config": files["adapter_config"]}),
            422, "missing_file")
        await expect_refused(server, client, lambda: client.post(
            "/adapters", data={"name": "m", "replace": "maybe"}, files=files), 422, "invalid_request")
        # three file parts where two are allowed: refused by the multipart parser
        three = {**files, "extra": ("x.bin", b"x")}
        await expect_refused(server, client, lambda: client.post("/adapters", data={"name": "m"}, files=three),
                             400, "bad_request")


async def test_good_traffic_unaffected_by_25_bad_uploads(hostile_server, lib, sentinel_dir):
    server = hostile_server
    refs = {("good", i): lib.ref("qv", p) for i, p in enumerate(P)}
    refs.update({(None, i): lib.ref(None, p) for i, p in enumerate(P)})
    stop = asyncio.Event()
    results: list[tuple[tuple, httpx.Response]] = []
    cases = list(HOSTILE)
    built = [(HOSTILE[cases[i % len(cases)]], HOSTILE[cases[i % len(cases)]][0](lib, sentinel_dir)) for i in range(25)]

    async with server.client() as client:
        before = stable(await registry_view(client))
        before_disk = disk_state(server.store)

        async def good_worker(k: int):
            i = 0
            while not stop.is_set() or i < 2:
                key = ("good" if (i + k) % 2 == 0 else None, (i + k) % len(P))
                results.append((key, await generate(client, P[key[1]], key[0])))
                i += 1

        async def bad_uploads():
            for (_, status, code), (config, weights) in built:
                resp = await client.post("/adapters", data={"name": "bad"}, files={
                    "adapter_config": ("adapter_config.json", config), "adapter_model": ("w", weights)})
                assert resp.status_code in (status if isinstance(status, tuple) else (status,)), resp.text
                assert resp.json()["error"]["code"] == code
                await asyncio.sleep(0)
            stop.set()

        await asyncio.gather(bad_uploads(), *(good_worker(k) for k in range(3)))
        assert stable(await registry_view(client)) == before
    assert len(results) >= 6
    failed = [(key, r.status_code, r.text[:200]) for key, r in results
              if r.status_code != 200 or r.json()["token_ids"] != refs[key]]
    assert failed == []
    assert disk_state(server.store) == before_disk
    assert list(sentinel_dir.iterdir()) == []
    assert server.idle()


# -- LRU thrash ------------------------------------------------------------------------------
THRASH = ["qv", "qv2", "rs", "mlp", "ou", "all"]  # 3x max_adapters_per_batch=2


async def test_device_slot_lru_thrash_matches_peft(adapter_server, lib):
    server = adapter_server(max_adapters_per_batch=2)
    async with server.client() as client:
        for key in THRASH:
            assert (await upload(client, key, lib.get(key))).status_code == 201
        for _ in range(2):  # sequential round robin: every request needs an eviction
            for key in THRASH:
                assert await tokens(client, P[0], key) == lib.ref(key, P[0]), key
        # all at once: 12 requests over 6 adapters with 2 slots (requests wait for a slot, none fail)
        jobs = [(key, i) for i in range(len(P)) for key in THRASH]
        outs = await asyncio.gather(*(tokens(client, P[i], key) for key, i in jobs))
        for (key, i), out in zip(jobs, outs):
            assert out == lib.ref(key, P[i]), (key, i)
    assert server.runtime.stats["evictions"] > 0
    assert server.runtime.resident <= 2
    assert server.idle()
    assert all(n == 0 for n in server.runtime.slots.pins.values())


async def test_host_memory_lru_smaller_than_concurrent_adapters(adapter_server, lib):
    """More adapters in flight than the host-memory tier holds: versions get evicted from host
    memory between a request's lookup and its admission to a device slot; requests must still
    finish on their own weights (and the engine must stay alive)."""
    server = adapter_server(max_adapters_per_batch=2, registry_settings={"max_cpu_adapters": 2})
    async with server.client() as client:
        for key in THRASH:
            assert (await upload(client, key, lib.get(key))).status_code == 201
        jobs = [(key, i) for i in range(len(P)) for key in THRASH]
        resps = await asyncio.gather(*(generate(client, P[i], key) for key, i in jobs))
        for (key, i), resp in zip(jobs, resps):
            assert resp.status_code == 200, (key, resp.text)
            assert resp.json()["token_ids"] == lib.ref(key, P[i]), (key, i)
        assert (await client.get("/health")).status_code == 200
        views = await registry_view(client)
        assert sum(1 for v in views if v["tier"] == "memory") <= 2
    assert server.registry.stats["memory_evictions"] > 0 and server.registry.stats["disk_loads"] > 0
    assert server.idle()


# -- faults ---------------------------------------------------------------------------------
async def test_failure_inside_one_engine_step_fails_only_the_poisoned_row(adapter_server, lib):
    server = adapter_server()
    runner = server.llm.runner
    real = runner.execute
    armed = {"transient": 0, "poison": None, "plans": []}

    def flaky(plan):
        armed["plans"].append([seq.prompt_ids for seq, _ in plan])
        if armed["transient"]:
            armed["transient"] -= 1
            raise RuntimeError("injected transient step failure")
        if armed["poison"] is not None and any(seq.prompt_ids == armed["poison"] for seq, _ in plan):
            raise RuntimeError("injected poisoned row")
        return real(plan)

    runner.execute = flaky
    async with server.client() as client:
        assert (await upload(client, "qv", lib.get("qv"))).status_code == 201
        assert await tokens(client, P[0], "qv") == lib.ref("qv", P[0])
        # a transient failure: the rows are retried one by one and the request still succeeds
        armed["transient"] = 1
        assert await tokens(client, P[1], "qv") == lib.ref("qv", P[1])
        # a row that fails every time fails alone; its batch-mates finish correctly
        armed["poison"] = P[1]
        results = await asyncio.gather(generate(client, P[0], "qv"), generate(client, P[1], "qv"),
                                       generate(client, P[0], None))
        assert_error(results[1], 500, "generation_failed")
        assert results[0].json()["token_ids"][:NEW] == lib.ref("qv", P[0])
        assert results[2].json()["token_ids"][:NEW] == lib.ref(None, P[0])
        resp = await client.post("/generate", json={"input_ids": P[1], "max_new_tokens": NEW, "stream": True})
        assert resp.status_code == 200  # the failure came after the stream started: in-band error event
        assert '"code":"generation_failed"' in resp.text and resp.text.endswith("data: [DONE]\n\n")
        armed["poison"] = None
        # the engine survived; later requests (with and without the adapter) are correct
        assert (await client.get("/health")).status_code == 200
        outs = await asyncio.gather(*(tokens(client, p, a) for p in P for a in ("qv", None)))
        assert outs == [lib.ref(a, p) for p in P for a in ("qv", None)]
    assert server.idle()
    assert all(n == 0 for n in server.runtime.slots.pins.values())  # the failed rows released their adapter slot


@pytest.mark.parametrize("fail_at,existing", [(1, False), (2, False), (3, False), (3, True)],
                         ids=["staging-config", "staging-weights", "current-new-name", "current-replace"])
async def test_disk_full_during_upload_commits_nothing(adapter_server, lib, monkeypatch, fail_at, existing):
    """fsync fails with ENOSPC at the n-th file written (config, weights in staging; CURRENT)."""
    server = adapter_server()
    async with server.client() as client:
        if existing:
            assert (await upload(client, "d", lib.get("qv"))).status_code == 201
        calls = {"n": 0}
        real_fsync = os.fsync

        def fsync(fd):
            calls["n"] += 1
            if calls["n"] == fail_at:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        await expect_refused(server, client, lambda: upload(client, "d", lib.get("mlp"), replace=existing), 507,
                             "insufficient_storage")
        monkeypatch.setattr(os, "fsync", real_fsync)
        if existing:
            assert await tokens(client, P[0], "d") == lib.ref("qv", P[0])
        # and the next upload works
        assert (await upload(client, "d", lib.get("mlp"), replace=True)).status_code == 201
        assert await tokens(client, P[0], "d") == lib.ref("mlp", P[0])


# -- soft prompts ----------------------------------------------------------------------------
async def test_soft_prompt_upload_generate_and_context_accounting(adapter_server, lib):
    server = adapter_server(max_model_len=MAX_LEN)
    nvt = 8
    async with server.client() as client:
        resp = await upload(client, "soft", lib.get("soft"))
        assert resp.status_code == 201, resp.text
        assert resp.json()["kind"] == "PROMPT_TUNING" and resp.json()["num_virtual_tokens"] == nvt
        for p in P:
            assert await tokens(client, p, "soft") == lib.ref("soft", p)
        long_prompt = (P[1] * 10)[:100]
        room = MAX_LEN - len(long_prompt) - nvt  # 20
        # the base model may use the whole context; the soft prompt's virtual tokens take their share
        assert len(await tokens(client, long_prompt, None, n=room + nvt)) == room + nvt
        out = await tokens(client, long_prompt, "soft", n=room)
        assert len(out) == room
        for n in (room + 1, room + nvt):
            # strict=False: /generate resolves the adapter (counting a request) before it checks the
            # context length, so `requests` moves although nothing ran (server/api/generate.py)
            body = await expect_refused(server, client, lambda: generate(client, long_prompt, "soft", n), 422,
                                        "context_length_exceeded", strict=False)
            assert f"{nvt} virtual tokens" in body.json()["error"]["message"]
        resp = await generate(client, long_prompt, "soft", room + 1, stream=True)
        assert_error(resp, 422, "context_length_exceeded")  # a real status, not an SSE error
    assert server.idle()
