"""The engine's outward interface (server/engine/observer.py): observer callbacks and the snapshot.

The API and the metrics collectors read `AsyncEngine.snapshot`, published by the engine thread,
never the scheduler, the KV allocator or the adapter slot tables themselves — so a scrape or an
adapter listing can never race the step. Checked here by parking the engine thread inside a step
and fencing those structures off from every other thread while the API answers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import subprocess
import sys
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from peftserve.server.engine.observer import EngineObserver, EngineSnapshot
from peftserve.server.engine.request import ErrorCode, FinishReason, SamplingParams
from tests.test_adapters_api import P, StepGate, adapter_server, lib, upload  # noqa: F401  (fixtures)

pytestmark = pytest.mark.anyio

ENGINE_THREAD = "peftserve-engine"  # AsyncEngine's thread name


def samples(text: str) -> dict[str, list]:
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def gauge(text: str, name: str, **labels) -> float:
    for s in samples(text)[name]:
        if all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError((name, labels))


async def wait_until(pred, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


class EngineThreadOnly:
    """Stands in for an engine-thread structure: attribute reads from any other thread are
    recorded in `foreign` (while `armed`), then forwarded, so the engine keeps working."""

    def __init__(self, target, label: str, foreign: list):
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_label", label)
        object.__setattr__(self, "_foreign", foreign)
        object.__setattr__(self, "armed", False)

    def __getattr__(self, name):
        if self.armed and threading.current_thread().name != ENGINE_THREAD:
            self._foreign.append(f"{self._label}.{name} from {threading.current_thread().name}")
        return getattr(self._target, name)

    def __setattr__(self, name, value):
        setattr(self._target, name, value)


# -- the interface ---------------------------------------------------------------------------------
def test_metrics_implements_the_engine_observer():
    from peftserve.server.metrics import Metrics

    m = Metrics()
    assert isinstance(m, EngineObserver)
    for name, proto in inspect.getmembers(EngineObserver, inspect.isfunction):
        if not name.startswith("_"):
            impl = getattr(m, name)
            assert list(inspect.signature(impl).parameters) == list(inspect.signature(proto).parameters)[1:], name
    # the engine module still names the protocol it takes (one definition, in observer.py)
    from peftserve.server.engine import engine

    assert engine.EngineObserver is EngineObserver


def test_snapshot_is_immutable_and_derives_usage():
    snap = EngineSnapshot(running=3, kv_blocks_free=5, kv_blocks_total=8, kv_prefix_blocks=1,
                          device_versions=frozenset({"a", "b"}))
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.running = 0
    assert snap.kv_blocks_used == 3 and snap.kv_usage == 3 / 8 and snap.adapter_slots_resident == 2
    assert snap.kv_blocks_requests == 2  # the prefix's block is the runtime's, not a request's
    assert EngineSnapshot().kv_usage == 0.0
    for f in dataclasses.fields(EngineSnapshot):  # nothing a reader holds can change under it
        assert f.type in ("int", "int | None", "tuple[str, ...]", "frozenset[str]"), f


def test_layering_engine_and_metrics_stay_off_the_web_stack():
    """server.engine never imports the API, the registry or the metrics; server.metrics* never
    imports FastAPI/pydantic (fresh interpreter: nothing else preloaded)."""
    code = """if True:
        import sys
        import peftserve.server.engine.async_engine, peftserve.server.engine.observer
        bad = [m for m in sys.modules if m.startswith(("peftserve.server.api", "peftserve.server.registry",
                                                       "peftserve.server.metrics", "fastapi", "pydantic"))]
        assert not bad, bad
        import peftserve.server.metrics, peftserve.server.metrics_adapters, peftserve.server.metrics_vllm
        bad = [m for m in sys.modules if m.startswith(("peftserve.server.api", "fastapi", "pydantic"))]
        assert not bad, bad
    """
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# -- publishing ------------------------------------------------------------------------------------
async def test_snapshot_is_published_after_steps(make_server):
    server = make_server()
    before = server.engine.snapshot
    assert (before.running, before.waiting, before.steps, before.kv_blocks_used) == (0, 0, 0, 0)
    assert before.kv_blocks_total > 0 and before.kv_block_size > 0
    assert before.adapter_slots_total is None  # base model only: no device tier
    async with server.client() as client:
        resp = await client.post("/generate", json={"input_ids": [5, 6, 7], "max_new_tokens": 4, "ignore_eos": True})
        assert resp.status_code == 200, resp.text
    await wait_until(lambda: server.engine.snapshot.running == 0)
    after = server.engine.snapshot
    assert after is not before and after.steps >= 4  # one prefill + 3 decodes at least
    assert (after.waiting, after.kv_blocks_free, after.kv_usage) == (0, after.kv_blocks_total, 0.0)
    assert server.engine.num_running == 0 and server.engine.num_waiting == 0


class Fatal(BaseException):
    """Not an Exception: escapes every per-row guard, so the loop dies and the supervisor resets."""


async def test_snapshot_is_published_after_a_supervisor_reset(adapter_server, lib):
    """A loop that dies mid-generation with an adapter pinned: the snapshot readers see next is
    the reset engine (nothing running, no device slot), not the crashed step's state."""
    server = adapter_server()
    real = server.llm.step
    armed = {"fire": False}

    def step():
        if armed["fire"]:
            armed["fire"] = False
            raise Fatal("injected")
        return real()

    server.llm.step = step
    async with server.client() as client:
        assert (await upload(client, "qv", lib.get("qv"))).status_code == 201
        key = server.registry.resolve("qv").key
        stream = server.engine.submit(P[0], SamplingParams(max_new_tokens=40, ignore_eos=True),
                                      adapter=server.registry.resolve("qv"))
        it = aiter(stream)
        assert (await anext(it)).finish_reason is None  # running, its adapter pinned in a slot
        await wait_until(lambda: server.engine.snapshot.running == 1)
        snap = server.engine.snapshot
        assert key in snap.device_versions and key in snap.pinned_versions and snap.resets == 0
        assert (await client.get("/adapters/qv")).json()["tier"] == "device"
        armed["fire"] = True
        events = [ev async for ev in it]
        assert events[-1].finish_reason is FinishReason.ERROR and events[-1].code is ErrorCode.ENGINE_RESTARTED
        await wait_until(lambda: server.engine.snapshot.resets == 1)
        snap = server.engine.snapshot
        assert (snap.running, snap.waiting, snap.kv_blocks_free) == (0, 0, snap.kv_blocks_total)
        assert snap.device_versions == frozenset() and snap.pinned_versions == frozenset()
        assert (await client.get("/adapters/qv")).json()["tier"] == "memory"
        text = (await client.get("/metrics")).text
        assert gauge(text, "peftserve_adapters_resident", tier="device") == 0
        assert gauge(text, "peftserve_num_requests_running") == 0
        await wait_until(lambda: server.engine.running)
        resp = await client.post("/generate", json={"input_ids": P[0], "adapter": "qv", "max_new_tokens": 3})
        assert resp.status_code == 200, resp.text  # and the engine serves the adapter again
    assert server.idle()


# -- readers never touch engine-thread structures --------------------------------------------------
async def test_metrics_and_adapter_listing_read_only_the_snapshot_while_a_step_is_stalled(adapter_server, lib):
    server = adapter_server()
    gate = StepGate(server.llm, after=2)
    foreign: list[str] = []
    fences = [EngineThreadOnly(server.llm.scheduler, "scheduler", foreign),
              EngineThreadOnly(server.llm.cache, "cache", foreign),
              EngineThreadOnly(server.llm.adapters, "adapter slots", foreign)]
    server.llm.scheduler, server.llm.cache, server.llm.adapters = fences
    async with server.client() as client:
        assert (await upload(client, "qv", lib.get("qv"))).status_code == 201
        assert (await upload(client, "mlp", lib.get("mlp"))).status_code == 201
        inflight = asyncio.ensure_future(client.post("/generate", json={
            "input_ids": P[0], "adapter": "qv", "max_new_tokens": 12, "ignore_eos": True}))
        await gate.wait_blocked()  # the engine thread is parked inside a step with "qv" running
        queued = asyncio.ensure_future(client.post("/generate", json={
            "input_ids": P[1], "adapter": "mlp", "max_new_tokens": 2}))
        await wait_until(lambda: server.engine.num_waiting == 1)  # submitted, not drained yet
        for fence in fences:
            object.__setattr__(fence, "armed", True)
        metrics = await client.get("/metrics")
        listing = await client.get("/adapters")
        one = await client.get("/adapters/qv")
        for fence in fences:
            object.__setattr__(fence, "armed", False)
        assert foreign == []  # not one read of a scheduler / KV / slot attribute off the engine thread
        assert metrics.status_code == listing.status_code == one.status_code == 200
        text = metrics.text
        assert gauge(text, "peftserve_num_requests_running") == 1
        assert gauge(text, "peftserve_num_requests_waiting") == 1
        assert gauge(text, "vllm:num_requests_waiting", model_name="tiny") == 1
        snap = server.engine.snapshot  # one running request holds a block per block_size tokens
        assert snap.kv_blocks_used == -(-(len(P[0]) + 2) // snap.kv_block_size)
        assert gauge(text, "peftserve_kv_cache_usage_perc") == snap.kv_blocks_used / snap.kv_blocks_total
        assert gauge(text, "peftserve_kv_cache_blocks", state="used") == snap.kv_blocks_used
        assert gauge(text, "peftserve_adapters_resident", tier="device") == 1
        # the device byte budget as reserved by the engine thread (published, not walked here)
        assert gauge(text, "peftserve_adapter_device_bytes") == snap.adapter_device_bytes > 0
        assert gauge(text, "peftserve_adapter_device_budget_bytes") == server.engine.engine.config.max_adapter_bytes
        info = samples(text)["peftserve_lora_requests_info"][0].labels
        assert info == {"running_lora_adapters": "qv", "waiting_lora_adapters": "", "max_lora": "4"}
        assert samples(text)["vllm:lora_requests_info"][0].labels == info
        assert {a["name"]: a["tier"] for a in listing.json()["adapters"]} == {"qv": "device", "mlp": "memory"}
        assert one.json()["tier"] == "device"
        gate.release()
        assert (await inflight).status_code == 200 and (await queued).status_code == 200
    assert server.idle()
    assert server.engine.snapshot.running == 0 and server.engine.snapshot.steps > 0
