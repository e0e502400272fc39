"""Adapter management API (`POST/GET/DELETE /adapters`) end to end, with PEFT as the oracle.

Each server here is the real `serve` wiring (server/build.py `build_server`: registry over a store dir,
`AsyncEngine`, `create_app(..., routers=[adapters.router])`) around a tiny
seeded Llama with the default model's tokenizer. Every refused request is checked for its status
AND `error.code`, and for leaving the registry (`GET /adapters`) and the store dir (recursive
listing + sha256 of every file) exactly as they were, with nothing left in `store/.staging`.

Helpers and fixtures here are shared with tests/test_reliability.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

from peftserve.server.state import ServerSettings
from tests.conftest import build_tiny_model
from tests.test_api import assert_error  # one definition of the error-body check

pytestmark = pytest.mark.anyio

NEW = 8  # tokens per parity request
LONG = 40  # tokens of the "long" in-flight requests (replace / delete)
ADMIN = {"Authorization": "Bearer admin-Key-123"}

# LoRA artifacts (PEFT `init_lora_weights=False`, so every A and B is random and matters)
LORA_SPECS = {
    "qv": (1, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "qv2": (2, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),  # same shape as qv: "v2"
    "rs": (3, dict(r=16, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
    "mlp": (4, dict(r=8, lora_alpha=32, target_modules=["gate_proj", "up_proj", "down_proj"])),
    "ou": (5, dict(r=6, lora_alpha=3, target_modules=["o_proj", "up_proj"])),
    "all": (6, dict(r=2, lora_alpha=4, target_modules="all-linear")),
    # rsLoRA whose rank_pattern lowers every module below r: its rank in a combination is r (PEFT)
    "rsp": (8, dict(r=8, lora_alpha=8, use_rslora=True, rank_pattern={"q_proj": 4, "v_proj": 4},
                    target_modules=["q_proj", "v_proj"])),
}
SOFT_SPECS = {"soft": (7, 8)}  # PEFT PromptTuningConfig: (seed, num_virtual_tokens)


# -- artifacts and their PEFT references -----------------------------------------------------
@dataclass
class Artifact:
    key: str
    dir: Path
    config: bytes
    weights: bytes

    def files(self, weights: bytes | None = None, config: bytes | None = None) -> dict:
        return {"adapter_config": ("adapter_config.json", self.config if config is None else config,
                                   "application/json"),
                "adapter_model": ("adapter_model.safetensors", self.weights if weights is None else weights,
                                  "application/octet-stream")}


class AdapterLib:
    """PEFT-made adapters on the tiny base (seed 0), created lazily, with cached PEFT outputs."""

    def __init__(self, root: Path, vocab: int):
        self.root, self.vocab = root, vocab
        self._arts: dict[str, Artifact] = {}
        self._models: dict = {}
        self._refs: dict = {}
        self._lock = threading.Lock()

    def base(self):
        return build_tiny_model(self.vocab, 0)

    def get(self, key: str) -> Artifact:
        with self._lock:
            if key not in self._arts:
                self._arts[key] = self._make(key)
            return self._arts[key]

    def _make(self, key: str) -> Artifact:
        from peft import LoraConfig, PromptTuningConfig, get_peft_model

        base = self.base()  # seeds the RNG itself: seed the adapter init *after* building it
        if key in LORA_SPECS:
            seed, kw = LORA_SPECS[key]
            torch.manual_seed(seed)
            model = get_peft_model(base, LoraConfig(init_lora_weights=False, **kw))
        else:
            seed, nvt = SOFT_SPECS[key]
            torch.manual_seed(seed)
            model = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=nvt))
        d = self.root / key
        model.save_pretrained(d)
        return Artifact(key, d, (d / "adapter_config.json").read_bytes(),
                        (d / "adapter_model.safetensors").read_bytes())

    def model(self, key: str | None):
        from peft import PeftModel

        if key not in self._models:
            m = self.base() if key is None else PeftModel.from_pretrained(self.base(), self.get(key).dir).eval()
            m.generation_config.eos_token_id = None
            self._models[key] = m
        return self._models[key]

    def ref(self, key: str | None, prompt: list[int], n: int = NEW) -> list[int]:
        """PEFT's greedy continuation (no EOS) of `prompt` with adapter `key` (None = base)."""
        k = (key, tuple(prompt), n)
        if k not in self._refs:
            self._refs[k] = peft_greedy(self.model(key), prompt, n)
        return self._refs[k]

    def mix_ref(self, keys: list[str], weights: list[float], prompt: list[int], n: int = NEW) -> list[int]:
        """PEFT add_weighted_adapter(..., combination_type="cat") output."""
        from peft import PeftModel

        model = PeftModel.from_pretrained(self.base(), self.get(keys[0]).dir, adapter_name=keys[0])
        for key in keys[1:]:
            model.load_adapter(self.get(key).dir, adapter_name=key)
        model.add_weighted_adapter(keys, weights, "mix", combination_type="cat")
        model.set_adapter("mix")
        model.eval().generation_config.eos_token_id = None
        return peft_greedy(model, prompt, n)


def peft_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]),
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, -n:].tolist()


def prompts(vocab: int, lengths=(5, 13), seed: int = 7) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


P = prompts(49152 // 2)  # token ids valid for the default tokenizer's vocabulary (49152)


_LIB: list[AdapterLib] = []


@pytest.fixture(scope="session")
def lib(tmp_path_factory, smollm_tokenizer) -> AdapterLib:
    # imported into test_reliability.py as well: one instance per session, not one per module
    if not _LIB:
        _LIB.append(AdapterLib(tmp_path_factory.mktemp("adapters"), len(smollm_tokenizer)))
    return _LIB[0]


# -- safetensors surgery (hostile / variant weights) -----------------------------------------
def tensors_of(weights: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(weights)


def save_tensors(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()})


def scaled_variant(art: Artifact, factor: float) -> bytes:
    """Same adapter shape, different content (so a different version)."""
    return save_tensors({k: v * factor for k, v in tensors_of(art.weights).items()})


def edit_config(art: Artifact, **changes) -> bytes:
    cfg = json.loads(art.config)
    cfg.update(changes)
    return json.dumps(cfg).encode()


# -- a served app with registry -------------------------------------------------------------
class AdapterServer:
    """The `peftserve serve` wiring (server/cli.py) around a tiny model, without uvicorn."""

    def __init__(self, hf_model, tokenizer, store: Path, settings: ServerSettings | None = None,
                 registry_settings=None, **engine_kw):
        from peftserve.server.api import adapters as adapters_api
        from peftserve.server.build import build_server
        from peftserve.server.metrics import Metrics
        from peftserve.server.engine.config import EngineConfig
        from peftserve.server.registry import RegistrySettings

        cfg = EngineConfig(**{"max_batch_size": 8, "max_model_len": 256, "max_num_batched_tokens": 128,
                              "max_adapters_per_batch": 4, **engine_kw})
        self.store = Path(store)
        self.metrics = Metrics(base_model="tiny", dtype="float32", version="test")
        rs = RegistrySettings(store=self.store, **(registry_settings or {}))
        server = build_server(hf_model, tokenizer, cfg, store=self.store, model_name="tiny", registry_settings=rs,
                              settings=settings or ServerSettings(), metrics=self.metrics,
                              routers=[adapters_api.router], idle_wait_s=0.01)
        self.serving, self.state, self.app = server.serving, server.state, server.app
        self.registry, self.runtime, self.llm = self.serving.registry, self.serving.runtime, self.serving.engine
        self.loaded = self.registry.load_store()
        self.engine = self.state.engine
        self.engine.start()

    def client(self, **kw) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://test",
                                 timeout=60, **kw)

    def idle(self, timeout: float = 10.0) -> bool:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            snap = self.engine.snapshot
            if snap.kv_blocks_requests == 0 and self.engine.num_waiting == 0 and snap.running == 0:
                return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        gate = getattr(self.llm.runner.execute, "__self__", None)
        if isinstance(gate, StepGate):  # never leave the engine thread parked after a failed test
            gate.release()
        self.engine.stop()


@pytest.fixture
def adapter_server(tmp_path, smollm_tokenizer):
    """Factory: `adapter_server(store=None, seed=0, settings=None, registry_settings=None, **EngineConfig)`."""
    servers: list[AdapterServer] = []

    def make(store: Path | None = None, seed: int = 0, **kw) -> AdapterServer:
        server = AdapterServer(build_tiny_model(len(smollm_tokenizer), seed), smollm_tokenizer,
                               store or tmp_path / "store", **kw)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


class StepGate:
    """Wraps the engine runner's `execute`: once a planned row has `after` output tokens, every
    step blocks until `release()` — so a request is provably still running while the test acts."""

    def __init__(self, llm, after: int = 2):
        self.runner, self.after = llm.runner, after
        self._orig = llm.runner.execute
        self.blocked, self._open = threading.Event(), threading.Event()
        self.runner.execute = self._execute

    def _execute(self, plan):
        if not self._open.is_set() and any(len(seq.output_ids) >= self.after for seq, _ in plan):
            self.blocked.set()
            self._open.wait(30)
        return self._orig(plan)

    async def wait_blocked(self) -> None:
        assert await asyncio.to_thread(self.blocked.wait, 30), "engine never reached the gate"

    def release(self) -> None:
        self._open.set()

    def remove(self) -> None:
        self.release()
        self.runner.execute = self._orig


# -- assertions -----------------------------------------------------------------------------
def disk_state(store: Path) -> dict[str, str]:
    """Recursive listing of the store: relative path -> sha256 (files) or '<dir>'."""
    out = {}
    for p in sorted(store.rglob("*")):
        rel = p.relative_to(store).as_posix()
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else "<dir>"
    return out


def staging_leftovers(store: Path) -> list[str]:
    staging = store / ".staging"
    return sorted(p.name for p in staging.iterdir()) if staging.exists() else []


async def registry_view(client: httpx.AsyncClient, headers: dict | None = None) -> list[dict]:
    resp = await client.get("/adapters", headers=headers)
    assert resp.status_code == 200, resp.text
    return resp.json()["adapters"]


def stable(view: list[dict]) -> list[tuple]:
    return [(a["name"], a["version"], a["kind"], a["size_bytes"]) for a in view]


async def expect_refused(server: AdapterServer, client: httpx.AsyncClient, send, status: int, code: str,
                         headers: dict | None = None, strict: bool = True) -> httpx.Response:
    """`await send()` must answer status/code and change neither the registry nor the store.
    strict=False ignores the per-adapter `requests` counters (see the soft-prompt context test)."""
    view = (lambda v: v) if strict else stable
    before_view, before_disk = view(await registry_view(client, headers)), disk_state(server.store)
    resp = await send()
    assert_error(resp, status, code)
    assert view(await registry_view(client, headers)) == before_view
    assert disk_state(server.store) == before_disk
    assert staging_leftovers(server.store) == []
    return resp


async def upload(client: httpx.AsyncClient, name: str, art: Artifact, replace: bool | None = None,
                 headers: dict | None = None, weights: bytes | None = None, config: bytes | None = None):
    data = {"name": name}
    if replace is not None:
        data["replace"] = "true" if replace else "false"
    return await client.post("/adapters", data=data, files=art.files(weights, config), headers=headers)


async def generate(client: httpx.AsyncClient, ids: list[int], adapter=None, n: int = NEW, headers=None, **extra):
    body = {"input_ids": ids, "max_new_tokens": n, "ignore_eos": True, **extra}
    if adapter is not None:
        body["adapter"] = adapter
    return await client.post("/generate", json=body, headers=headers)


async def tokens(client, ids, adapter=None, n: int = NEW, headers=None) -> list[int]:
    resp = await generate(client, ids, adapter, n, headers)
    assert resp.status_code == 200, resp.text
    assert resp.json()["finish_reason"] == "length"
    return resp.json()["token_ids"]


def version_dirs(store: Path, name: str) -> list[str]:
    return sorted(p.name for p in (store / name).iterdir() if p.is_dir())


# =============================================================================================
async def test_upload_list_get_and_generate_equals_peft(adapter_server, lib, smollm_tokenizer):
    server = adapter_server()
    qv, soft = lib.get("qv"), lib.get("soft")
    async with server.client() as client:
        assert await registry_view(client) == []
        resp = await upload(client, "qv", qv)
        assert resp.status_code == 201, resp.text
        info = resp.json()
        assert info["name"] == "qv" and info["kind"] == "LORA"
        assert info["rank"] == 4 and info["target_modules"] == ["q_proj", "v_proj"]
        assert info["num_modules"] == 4  # 2 layers x (q, v)
        assert info["size_bytes"] == sum(t.numel() * 4 for t in tensors_of(qv.weights).values())
        assert len(info["version"]) == 16 and all(c in "0123456789abcdef" for c in info["version"])
        assert info["tier"] == "memory" and info["requests"] == 0

        resp = await upload(client, "soft", soft)
        assert resp.status_code == 201, resp.text
        assert resp.json()["kind"] == "PROMPT_TUNING" and resp.json()["num_virtual_tokens"] == 8

        listed = await registry_view(client)
        assert [a["name"] for a in listed] == ["qv", "soft"]
        assert listed[0] == info
        one = (await client.get("/adapters/qv")).json()
        assert one == info

        # the stored files are exactly the uploaded bytes, under store/<name>/<version>/
        vdir = server.store / "qv" / info["version"]
        assert (vdir / "adapter_config.json").read_bytes() == qv.config
        assert (vdir / "adapter_model.safetensors").read_bytes() == qv.weights
        assert (server.store / "qv" / "CURRENT").read_text() == info["version"]

        for ids in P:
            got = await tokens(client, ids, "qv")
            assert got == lib.ref("qv", ids)
            assert got != lib.ref(None, ids), "the adapter must change the output (non-vacuous parity)"
            assert await tokens(client, ids, "soft") == lib.ref("soft", ids)
            assert await tokens(client, ids) == lib.ref(None, ids)
        text = "Adapters, please."
        ids = smollm_tokenizer(text).input_ids
        resp = await client.post("/generate", json={"prompt": text, "adapter": "qv", "max_new_tokens": NEW,
                                                    "ignore_eos": True})
        assert resp.json()["token_ids"] == lib.ref("qv", ids) and resp.json()["adapter"] == "qv"

        info = (await client.get("/adapters/qv")).json()
        assert info["tier"] == "device" and info["requests"] == len(P) + 1
        assert_error(await client.get("/adapters/nope"), 404, "adapter_not_found")
    assert server.idle()


async def test_duplicate_name_is_409_and_first_version_still_served(adapter_server, lib):
    server = adapter_server()
    qv, qv2 = lib.get("qv"), lib.get("qv2")
    async with server.client() as client:
        first = (await upload(client, "a", qv)).json()
        for replace in (None, False):
            await expect_refused(server, client, lambda: upload(client, "a", qv2, replace=replace), 409,
                                 "adapter_exists")
        # the identical content again is still a conflict without replace=true
        await expect_refused(server, client, lambda: upload(client, "a", qv), 409, "adapter_exists")
        assert (await client.get("/adapters/a")).json()["version"] == first["version"]
        assert version_dirs(server.store, "a") == [first["version"]]
        assert await tokens(client, P[0], "a") == lib.ref("qv", P[0])


async def test_replace_creates_new_version_and_running_stream_finishes_on_old(adapter_server, lib, live_server):
    server = adapter_server()
    gate = StepGate(server.llm, after=3)
    v1_ref, v2_ref = lib.ref("qv", P[1], LONG), lib.ref("qv2", P[1], NEW)
    assert v1_ref[:NEW] != v2_ref
    live = live_server(server.app)
    async with httpx.AsyncClient(base_url=live.url, timeout=60) as client:
        v1 = (await upload(client, "m", lib.get("qv"))).json()

        async def stream_v1() -> list[dict]:
            events = []
            async with client.stream("POST", "/generate", json={"input_ids": P[1], "adapter": "m", "stream": True,
                                                                "max_new_tokens": LONG, "ignore_eos": True}) as resp:
                assert resp.status_code == 200
                async for line in resp.aiter_lines():
                    if line.startswith("data: "):
                        payload = line[len("data: "):]
                        events.append(payload if payload == "[DONE]" else json.loads(payload))
            return events

        running = asyncio.ensure_future(stream_v1())
        await gate.wait_blocked()  # v1's request has tokens out and is parked mid-generation
        resp = await upload(client, "m", lib.get("qv2"), replace=True)
        assert resp.status_code == 201, resp.text
        v2 = resp.json()
        assert v2["version"] != v1["version"] and v2["name"] == "m"
        assert server.engine.num_running == 1 and not running.done()  # replaced while in flight
        assert (await client.get("/adapters/m")).json()["version"] == v2["version"]
        assert version_dirs(server.store, "m") == [v2["version"]]  # old version dir gone from disk
        assert (server.store / "m" / "CURRENT").read_text() == v2["version"]
        gate.release()
        events = await running
        assert events[-1] == "[DONE]"
        final = events[-2]
        assert final["finish_reason"] == "length"
        assert [e["token_id"] for e in events[:-2]] == final["token_ids"]  # every token was streamed
        assert final["token_ids"] == v1_ref  # all of it on the OLD weights
        assert await tokens(client, P[1], "m") == v2_ref  # a new request gets the new version
        # replacing with identical content is a no-op that keeps the version
        resp = await upload(client, "m", lib.get("qv2"), replace=True)
        assert resp.status_code == 201 and resp.json()["version"] == v2["version"]
    assert server.idle()
    assert staging_leftovers(server.store) == []


async def test_delete_lets_inflight_finish_then_404(adapter_server, lib):
    server = adapter_server()
    gate = StepGate(server.llm, after=2)
    async with server.client() as client:
        info = (await upload(client, "gone", lib.get("mlp"))).json()
        await upload(client, "kept", lib.get("qv"))
        await upload(client, "twin", lib.get("mlp"))  # identical content: the same version as "gone"
        inflight = asyncio.ensure_future(generate(client, P[0], "gone", LONG))
        await gate.wait_blocked()
        resp = await client.delete("/adapters/gone")
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"deleted": "gone", "version": info["version"]}
        assert not (server.store / "gone").exists()
        assert not inflight.done()
        assert_error(await generate(client, P[0], "gone"), 404, "adapter_not_found")
        gate.release()
        resp = await inflight
        assert resp.status_code == 200, resp.text
        assert resp.json()["token_ids"] == lib.ref("mlp", P[0], LONG)
        assert_error(await generate(client, P[0], "gone"), 404, "adapter_not_found")
        assert_error(await client.get("/adapters/gone"), 404, "adapter_not_found")
        assert_error(await client.delete("/adapters/gone"), 404, "adapter_not_found")
        assert [a["name"] for a in await registry_view(client)] == ["kept", "twin"]
        assert await tokens(client, P[0], "kept") == lib.ref("qv", P[0])
        assert await tokens(client, P[0], "twin") == lib.ref("mlp", P[0])  # its twin's deletion took nothing
        assert (server.store / "twin" / info["version"] / "adapter_model.safetensors").exists()
        # the name can be used again afterwards
        assert (await upload(client, "gone", lib.get("ou"))).status_code == 201
        assert await tokens(client, P[0], "gone") == lib.ref("ou", P[0])
    assert server.idle()
    assert staging_leftovers(server.store) == []


async def test_concurrent_uploads_of_one_name(adapter_server, lib, monkeypatch):
    from peftserve.server import registry as registry_mod

    server = adapter_server()
    art = lib.get("qv")
    variants = [scaled_variant(art, 1.0 + i / 8) for i in range(8)]
    # all 8 validate at the same time: each passed the registry's early "exists?" check, so the
    # decision is made by the re-check under the lock at commit time
    barrier, real_load = threading.Barrier(len(variants), timeout=20), registry_mod.load_adapter

    def load_together(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        barrier.wait()
        return loaded

    monkeypatch.setattr(registry_mod, "load_adapter", load_together)
    async with server.client() as client:
        resps = await asyncio.gather(*(upload(client, "race", art, weights=w) for w in variants))
        statuses = sorted(r.status_code for r in resps)
        assert statuses == [201] + [409] * 7, [r.text for r in resps]
        for r in resps:
            if r.status_code == 409:
                assert_error(r, 409, "adapter_exists")
        winner = next(i for i, r in enumerate(resps) if r.status_code == 201)
        version = resps[winner].json()["version"]
        assert (await client.get("/adapters/race")).json()["version"] == version
    assert version_dirs(server.store, "race") == [version]
    vdir = server.store / "race" / version
    assert sorted(p.name for p in vdir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (vdir / "adapter_model.safetensors").read_bytes() == variants[winner]
    assert (server.store / "race" / "CURRENT").read_text() == version
    assert sorted(p.name for p in (server.store / "race").iterdir()) == sorted(["CURRENT", version])
    assert staging_leftovers(server.store) == []


async def test_restart_keeps_adapters(adapter_server, lib, tmp_path):
    store = tmp_path / "persist"
    first = adapter_server(store=store)
    async with first.client() as client:
        for name, key in (("alpha", "qv"), ("beta", "mlp"), ("gamma", "soft")):
            assert (await upload(client, name, lib.get(key))).status_code == 201
        before = stable(await registry_view(client))
    first.close()

    second = adapter_server(store=store)
    assert second.loaded == ["alpha", "beta", "gamma"]
    async with second.client() as client:
        assert stable(await registry_view(client)) == before
        for name, key in (("alpha", "qv"), ("beta", "mlp"), ("gamma", "soft")):
            assert await tokens(client, P[0], name) == lib.ref(key, P[0])
    assert not (store / ".quarantine").exists()


async def test_corrupt_adapter_on_disk_is_quarantined_and_others_load(adapter_server, lib, tmp_path):
    store = tmp_path / "persist"
    first = adapter_server(store=store)
    async with first.client() as client:
        versions = {}
        for name, key in (("good", "qv"), ("truncated", "mlp"), ("flipped", "rs"), ("dangling", "ou")):
            versions[name] = (await upload(client, name, lib.get(key))).json()["version"]
    first.close()

    wfile = lambda name: store / name / versions[name] / "adapter_model.safetensors"  # noqa: E731
    wfile("truncated").write_bytes(wfile("truncated").read_bytes()[:-100])
    # one flipped low mantissa bit: still a valid safetensors file, but no longer its version's content
    raw = bytearray(wfile("flipped").read_bytes())
    raw[8 + int.from_bytes(raw[:8], "little")] ^= 1
    wfile("flipped").write_bytes(bytes(raw))
    (store / "dangling" / "CURRENT").write_text("0123456789abcdef")
    (store / "nocurrent").mkdir()
    (store / ".staging" / "crashed-upload").mkdir(parents=True)  # a kill -9 mid-upload
    (store / ".staging" / "crashed-upload" / "adapter_model.safetensors").write_bytes(b"partial")

    second = adapter_server(store=store)
    assert second.loaded == ["good"]
    quarantined = sorted(p.name.rsplit("-", 1)[0] for p in (store / ".quarantine").iterdir())
    assert quarantined == ["dangling", "flipped", "nocurrent", "truncated"]
    assert staging_leftovers(store) == []
    async with second.client() as client:
        assert stable(await registry_view(client))[0][:2] == ("good", versions["good"])
        assert len(await registry_view(client)) == 1
        assert await tokens(client, P[0], "good") == lib.ref("qv", P[0])
        for name in ("truncated", "flipped", "dangling"):
            assert_error(await generate(client, P[0], name), 404, "adapter_not_found")
        # a quarantined name can be uploaded afresh
        assert (await upload(client, "flipped", lib.get("rs"))).json()["version"] == versions["flipped"]
        assert await tokens(client, P[0], "flipped") == lib.ref("rs", P[0])


async def test_weighted_combination_equals_peft_cat(adapter_server, lib):
    server = adapter_server()
    names, weights = ["qv", "rs", "mlp"], [0.7, 0.3, -0.5]
    async with server.client() as client:
        for n in names + ["soft"]:
            assert (await upload(client, n, lib.get(n))).status_code == 201
        spec = [{"name": n, "weight": w} for n, w in zip(names, weights)]
        for ids in P:
            got = await tokens(client, ids, spec)
            assert got == lib.mix_ref(names, weights, ids)
            assert got != lib.ref("qv", ids)
        resp = await generate(client, P[0], spec)
        assert resp.json()["adapter"] == spec
        assert server.registry.combos.hits >= 1  # same (names, versions, weights): cached combination
        # a replaced member is never combined from its stale version
        assert (await upload(client, "qv", lib.get("qv2"), replace=True)).status_code == 201
        assert await tokens(client, P[0], spec) == lib.mix_ref(["qv2", "rs", "mlp"], weights, P[0])


async def test_weighted_combination_rank_pattern_rslora_equals_peft(adapter_server, lib):
    """The combined adapter's rsLoRA scale is sqrt(sum of the members' PEFT ranks), where a
    member's rank is max(r, *rank_pattern.values()) from its config."""
    server = adapter_server()
    names, weights = ["rsp", "mlp"], [0.6, 0.4]
    async with server.client() as client:
        for n in names:
            assert (await upload(client, n, lib.get(n))).status_code == 201
        assert (await client.get("/adapters/rsp")).json()["rank"] == 4  # the modules' rank
        spec = [{"name": n, "weight": w} for n, w in zip(names, weights)]
        for ids in P:
            assert await tokens(client, ids, spec) == lib.mix_ref(names, weights, ids)


@pytest.mark.parametrize("spec,status,code", [
    ([{"name": "qv", "weight": 1.0}, {"name": "qv", "weight": 0.5}], 422, "invalid_adapter_combination"),
    ([{"name": "qv", "weight": 1e9}], 422, "invalid_request"),
    ([{"name": "qv", "weight": -101.0}], 422, "invalid_request"),
    ([{"name": f"x{i}", "weight": 0.1} for i in range(9)], 422, "invalid_adapter_combination"),
    ([{"name": f"x{i}", "weight": 0.1} for i in range(17)], 422, "invalid_request"),
    ([], 422, "invalid_request"),
    ([{"name": "qv", "weight": 1.0}, {"name": "unknown", "weight": 1.0}], 404, "adapter_not_found"),
    ([{"name": "qv", "weight": 1.0}, {"name": "soft", "weight": 1.0}], 422, "invalid_adapter_combination"),
    ([{"name": "qv", "weight": "1"}], 422, "invalid_request"),
    ([{"name": "qv"}, {"name": "../etc", "weight": 1}], 404, "adapter_not_found"),
], ids=["duplicate", "huge", "negative-huge", "nine", "seventeen", "empty", "unknown", "non-lora", "string-weight",
        "path"])
async def test_bad_combinations(adapter_server, lib, spec, status, code):
    server = adapter_server()
    async with server.client() as client:
        for n in ("qv", "soft"):
            await upload(client, n, lib.get(n))
        await expect_refused(server, client, lambda: generate(client, P[0], spec), status, code)


@pytest.mark.parametrize("raw", [
    b'{"input_ids": [5, 6], "adapter": [{"name": "qv", "weight": NaN}]}',
    b'{"input_ids": [5, 6], "adapter": [{"name": "qv", "weight": Infinity}]}',
    b'{"input_ids": [5, 6], "adapter": [{"name": "qv", "weight": 1e400}]}',
], ids=["nan", "inf", "overflow"])
async def test_non_finite_combination_weights(adapter_server, lib, raw):
    server = adapter_server()
    async with server.client() as client:
        await upload(client, "qv", lib.get("qv"))
        await expect_refused(server, client, lambda: client.post(
            "/generate", content=raw, headers={"content-type": "application/json"}), 422, "invalid_request")


async def test_admin_auth_on_adapter_routes(adapter_server, lib):
    settings = ServerSettings(api_key="user-key", admin_key="admin-Key-123")
    server = adapter_server(settings=settings)
    user = {"Authorization": "Bearer user-key"}
    async with server.client() as client:
        assert (await upload(client, "base1", lib.get("qv"), headers=ADMIN)).status_code == 201
        mangled = {"Authorization": "Bearer " + ADMIN["Authorization"].split()[1].lower()}
        cases = [(None, 401, "unauthorized"), (user, 403, "forbidden"), (mangled, 403, "forbidden"),
                 ({"Authorization": "admin-Key-123"}, 401, "unauthorized"),  # no scheme
                 ({"Authorization": "Basic admin-Key-123"}, 401, "unauthorized"),
                 ({"Authorization": "Bearer admin-Key-1234"}, 403, "forbidden")]
        for headers, status, code in cases:
            resp = await expect_refused(server, client, lambda: upload(client, "x", lib.get("mlp"), headers=headers),
                                        status, code, headers=ADMIN)
            if status == 401:
                assert resp.headers["www-authenticate"] == "Bearer"
            await expect_refused(server, client, lambda: upload(client, "base1", lib.get("mlp"), replace=True,
                                                                headers=headers), status, code, headers=ADMIN)
            await expect_refused(server, client, lambda: client.delete("/adapters/base1", headers=headers),
                                 status, code, headers=ADMIN)
            assert_error(await client.get("/adapters", headers=headers), status, code)
            assert_error(await client.get("/adapters/base1", headers=headers), status, code)
        # the scheme is case-insensitive; the key is not
        lower_scheme = {"Authorization": "bearer admin-Key-123"}
        assert (await client.get("/adapters", headers=lower_scheme)).status_code == 200
        # users generate with the adapter; the admin key opens /generate too
        assert await tokens(client, P[0], "base1", headers=user) == lib.ref("qv", P[0])
        assert await tokens(client, P[0], "base1", headers=ADMIN) == lib.ref("qv", P[0])
        assert_error(await generate(client, P[0], "base1"), 401, "unauthorized")


async def test_api_key_alone_also_guards_uploads(adapter_server, lib):
    server = adapter_server(settings=ServerSettings(api_key="only-key"))
    async with server.client() as client:
        key = {"Authorization": "Bearer only-key"}
        await expect_refused(server, client, lambda: upload(client, "x", lib.get("qv")), 401, "unauthorized",
                             headers=key)
        assert (await upload(client, "x", lib.get("qv"), headers=key)).status_code == 201


# -- /generate never maps an adapter name to a path ------------------------------------------
_AUDIT = {"on": False, "paths": []}
_AUDIT_EVENTS = {"open", "os.listdir", "os.scandir", "os.mkdir", "os.rename", "os.remove", "os.rmdir",
                 "shutil.rmtree", "os.chdir", "os.stat"}


def _audit_hook(event, args):
    if _AUDIT["on"] and event in _AUDIT_EVENTS and args:
        path = args[0]
        if isinstance(path, (str, bytes, os.PathLike)):
            _AUDIT["paths"].append((event, os.fsdecode(path)))


if not getattr(sys, "_peftserve_adapter_audit", False):
    sys.addaudithook(_audit_hook)
    sys._peftserve_adapter_audit = True


@pytest.mark.parametrize("name", ["nope", "../x", "../../etc/passwd", "/etc/passwd", "a/b", "..", ".",
                                  "qv/../qv", "qv\x00", "%2e%2e%2fx", "~root", "x" * 256])
async def test_generate_unknown_or_path_adapter_is_404_without_disk_access(adapter_server, lib, name,
                                                                           monkeypatch):
    from peftserve.server import registry as registry_mod

    server = adapter_server()
    async with server.client() as client:
        await upload(client, "qv", lib.get("qv"))

        def no_disk(*a, **k):
            raise AssertionError("an adapter lookup must never load from disk")

        monkeypatch.setattr(registry_mod, "load_adapter", no_disk)
        loads = dict(server.registry.stats)
        _AUDIT["paths"].clear()
        _AUDIT["on"] = True
        try:
            resp = await generate(client, P[0], name)
        finally:
            _AUDIT["on"] = False
        assert_error(resp, 404, "adapter_not_found")
        touched = [(e, p) for e, p in _AUDIT["paths"] if str(server.store) in p or "passwd" in p or ".." in p]
        assert touched == []
        assert server.registry.stats == loads
        await expect_refused(server, client, lambda: generate(client, P[0], name, stream=True), 404,
                             "adapter_not_found")
