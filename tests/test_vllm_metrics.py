"""vLLM metric names next to ours (same data), and the metric hygiene fixes of issue 10."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from peftserve.server.state import ServerSettings
from tests.test_adapters_api import adapter_server, lib  # noqa: F401  (fixtures)

pytestmark = pytest.mark.anyio


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict, name: str, **labels) -> float:
    for s in fams[name].samples:
        if s.name.endswith(("_total", "_count")) or s.name == name:
            if all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError((name, labels))


async def test_vllm_names_mirror_ours(adapter_server, lib):
    server = adapter_server(settings=ServerSettings(served_model_names=("my-base",)))
    server.registry.import_dir(lib.get("qv").dir, "qv")
    async with server.client() as c:
        for model in ("my-base", "qv"):
            r = await c.post("/v1/completions", json={"model": model, "prompt": [5, 6, 7], "max_tokens": 3,
                                                      "ignore_eos": True})
            assert r.status_code == 200, r.text
        await c.post("/generate", json={"input_ids": [1, 2], "adapter": [{"name": "qv", "weight": 0.5}],
                                        "max_new_tokens": 1})
        await c.post("/generate", json={"input_ids": [1, 2], "adapter": [{"name": "qv", "weight": 0.5}],
                                        "max_new_tokens": 1})
        assert server.idle()
        text = (await c.get("/metrics")).text
    fams = families(text)
    m = {"model_name": "my-base"}
    assert value(fams, "vllm:generation_tokens", **m) == value(fams, "peftserve_generation_tokens") == 8
    assert value(fams, "vllm:prompt_tokens", **m) == value(fams, "peftserve_prompt_tokens") == 10
    assert value(fams, "vllm:time_to_first_token_seconds", **m) == 4
    # 8 tokens of 4 requests: 4 gaps between consecutive tokens, published by the steps that made them
    assert value(fams, "vllm:inter_token_latency_seconds", **m) == value(fams, "peftserve_inter_token_latency_seconds") \
        == value(fams, "vllm:time_per_output_token_seconds", **m) == 4
    assert value(fams, "vllm:e2e_request_latency_seconds", **m) == 4
    assert value(fams, "vllm:request_success", finished_reason="length", **m) == 4
    assert value(fams, "vllm:request_success", finished_reason="stop", **m) == 0
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert value(fams, name, **m) == 0
    info = fams["vllm:lora_requests_info"].samples[0]
    assert set(info.labels) == {"running_lora_adapters", "waiting_lora_adapters", "max_lora"}
    assert info.labels["max_lora"] == str(server.runtime.num_slots) and info.value > 1e9  # a timestamp
    # hygiene: the merge cache counts up (a counter), one tier vocabulary, no *_created series, and no
    # empty label values (except vLLM's own lora_requests_info, which routers parse as vLLM writes it)
    assert fams["peftserve_adapter_merge_cache_hits"].type == "counter"
    assert value(fams, "peftserve_adapter_merge_cache_hits") >= 1
    assert {s.labels["tier"] for s in fams["peftserve_adapters_resident"].samples} == {"device", "memory", "disk"}
    assert "_created" not in text
    for fam in fams.values():
        if not fam.name.endswith("lora_requests_info"):
            for s in fam.samples:
                assert all(v != "" for v in s.labels.values()), s


async def test_vllm_names_can_be_turned_off(make_server):
    from peftserve.server.metrics import Metrics

    server = make_server()
    assert server.metrics.vllm is not None  # on by default
    off = Metrics(base_model="tiny", vllm_names=False)
    assert off.vllm is None and "vllm:" not in off.render()[0].decode()
