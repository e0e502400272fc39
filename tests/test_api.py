"""HTTP API tests: parity with transformers' generate, streaming, errors, cancellation, metrics, CLI."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
import torch

from peftserve.server.errors import AdapterNotFound
from peftserve.server.state import ServerSettings

pytestmark = pytest.mark.anyio

PROMPT_LENGTHS = (1, 3, 8, 17, 33, 64, 129, 200)


# -- helpers ---------------------------------------------------------------------------------
def hf_greedy(model, ids: list[int], n: int, eos=None) -> list[int]:
    """transformers' own greedy generate: the parity oracle (eos=None: never stop early)."""
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=n, eos_token_id=eos, pad_token_id=0)
    return out[0, len(ids):].tolist()


def random_prompts(vocab: int, lengths=PROMPT_LENGTHS, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


async def post(client, **body) -> httpx.Response:
    return await client.post("/generate", json=body)


def assert_error(resp: httpx.Response, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body


def parse_sse(text: str) -> list:
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def counter(metrics, name: str, **labels) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return value or 0.0


# -- parity ----------------------------------------------------------------------------------
async def test_greedy_parity_one_at_a_time(make_server, tiny_model, smollm_tokenizer):
    server = make_server(seed=0, max_num_batched_tokens=64)  # 129/200-token prompts prefill in chunks
    ref = tiny_model(0)  # separate instance, same weights: the engine patches its own model's attention
    prompts = random_prompts(len(smollm_tokenizer))
    async with server.client() as client:
        for ids in prompts:
            resp = await post(client, input_ids=ids, max_new_tokens=10, ignore_eos=True)
            assert resp.status_code == 200, resp.text
            body = resp.json()
            assert body["token_ids"] == hf_greedy(ref, ids, 10), f"prompt of {len(ids)} tokens"
            assert body["finish_reason"] == "length"
            assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 10}
            assert body["adapter"] is None
        for prompt in ("Hello", "The quick brown fox jumps over the lazy dog. " * 5):
            ids = smollm_tokenizer(prompt).input_ids
            body = (await post(client, prompt=prompt, max_new_tokens=8, ignore_eos=True)).json()
            assert body["usage"]["prompt_tokens"] == len(ids)
            assert body["token_ids"] == hf_greedy(ref, ids, 8)
            assert body["text"] == smollm_tokenizer.decode(body["token_ids"], skip_special_tokens=True)
    assert server.wait_idle()


async def test_greedy_parity_sixteen_concurrent(make_server, tiny_model, smollm_tokenizer):
    server = make_server(seed=1, max_batch_size=8, max_num_batched_tokens=96)  # 16 > 8 slots: queueing
    ref = tiny_model(1)
    prompts = random_prompts(len(smollm_tokenizer), seed=1)
    refs = [hf_greedy(ref, ids, 16) for ids in prompts]
    jobs = [(i, 16 if j == 0 else 9) for i in range(len(prompts)) for j in range(2)]
    async with server.client() as client:
        resps = await asyncio.gather(*(post(client, input_ids=prompts[i], max_new_tokens=n, ignore_eos=True)
                                       for i, n in jobs))
    for (i, n), resp in zip(jobs, resps):
        assert resp.status_code == 200, resp.text
        assert resp.json()["token_ids"] == refs[i][:n], f"prompt {i} ({len(prompts[i])} tokens), n={n}"
    assert server.wait_idle()


async def test_eos_finish_and_ignore_eos(make_server, tiny_model, smollm_tokenizer):
    ids = random_prompts(len(smollm_tokenizer), (12,), seed=3)[0]
    ref = tiny_model(0)
    full = hf_greedy(ref, ids, 16)
    eos = full[4]
    k = full.index(eos)
    assert hf_greedy(ref, ids, 16, eos=eos) == full[:k + 1]  # what transformers does with that EOS
    model = tiny_model(0)
    model.generation_config.eos_token_id = eos  # the engine reads its EOS ids from here
    server = make_server(model=model)
    async with server.client() as client:
        body = (await post(client, input_ids=ids, max_new_tokens=16)).json()
        assert body["finish_reason"] == "eos"
        assert body["token_ids"] == full[:k + 1]
        assert body["usage"]["completion_tokens"] == k + 1
        body = (await post(client, input_ids=ids, max_new_tokens=16, ignore_eos=True)).json()
        assert body["finish_reason"] == "length"
        assert body["token_ids"] == full


async def test_seeded_sampling_independent_of_batch(make_server, smollm_tokenizer):
    server = make_server(seed=2)
    prompts = random_prompts(len(smollm_tokenizer), (5, 30, 7, 60, 2, 90, 11, 40), seed=4)
    # top-k 5: alone vs in a batch, the logits may differ in the last bit, which a wide top-k or top-p
    # can turn into another token on some CPU (docs/openai.md, "seed"); a small top-k almost never does
    params = dict(temperature=0.9, top_p=0.95, top_k=5, seed=1234, max_new_tokens=16, ignore_eos=True)
    async with server.client() as client:
        alone = (await post(client, input_ids=prompts[0], **params)).json()["token_ids"]
        again = (await post(client, input_ids=prompts[0], **params)).json()["token_ids"]
        others = [post(client, input_ids=p, temperature=0.7 + 0.1 * i, top_p=0.9, seed=i, max_new_tokens=8 + i,
                       ignore_eos=True) for i, p in enumerate(prompts[1:])]
        mixed, *rest = await asyncio.gather(post(client, input_ids=prompts[0], **params), *others)
        other_seed = (await post(client, input_ids=prompts[0], **{**params, "seed": 99})).json()["token_ids"]
        unseeded = await post(client, input_ids=prompts[0], temperature=1.0, max_new_tokens=4)
    assert all(r.status_code == 200 for r in rest)
    assert alone == again == mixed.json()["token_ids"]
    assert other_seed != alone
    assert unseeded.status_code == 200 and unseeded.json()["usage"]["completion_tokens"] >= 1


async def test_stop_strings(make_server, smollm_tokenizer):
    server = make_server(seed=0)
    prompt = "Once upon a time"
    async with server.client() as client:
        full = (await post(client, prompt=prompt, max_new_tokens=24, ignore_eos=True)).json()
        text = full["text"]
        assert len(text) > 40
        stop = text[20:27]  # 7 characters, almost surely across a token boundary
        cut = text.index(stop)
        body = (await post(client, prompt=prompt, max_new_tokens=24, ignore_eos=True, stop=["\x00never", stop])).json()
        assert body["finish_reason"] == "stop"
        assert body["text"] == text[:cut]
        assert body["token_ids"] == full["token_ids"][:len(body["token_ids"])]
        # the same through SSE: held-back text never leaks past the stop string
        resp = await client.post("/generate", json={"prompt": prompt, "max_new_tokens": 24, "ignore_eos": True,
                                                    "stop": [stop], "stream": True})
        events = parse_sse(resp.text)
        assert "".join(e["text"] for e in events[:-2]) == text[:cut]
        assert events[-2]["finish_reason"] == "stop" and events[-2]["text"] == text[:cut]


async def test_chat_messages_use_the_chat_template(make_server, smollm_tokenizer):
    server = make_server(seed=0)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"}]
    expected = smollm_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    async with server.client() as client:
        body = (await post(client, messages=messages, max_new_tokens=3)).json()
        by_ids = (await post(client, input_ids=list(expected), max_new_tokens=3)).json()
    assert body["usage"]["prompt_tokens"] == len(expected)
    assert body["token_ids"] == by_ids["token_ids"]


# -- streaming -------------------------------------------------------------------------------
async def test_streaming_events_concatenate_to_final_text(make_server):
    server = make_server(seed=0)
    req = {"prompt": "Streaming test: héllo 日本語", "max_new_tokens": 12, "ignore_eos": True}
    async with server.client() as client:
        plain = (await post(client, **req)).json()
        resp = await client.post("/generate", json={**req, "stream": True})
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(resp.text)
    assert events[-1] == "[DONE]"
    final, tokens = events[-2], events[:-2]
    assert [e["token_id"] for e in tokens] == plain["token_ids"]
    assert "".join(e["text"] for e in tokens) == final["text"] == plain["text"]
    assert final["finish_reason"] == "length"
    assert final["usage"] == plain["usage"]
    assert final["token_ids"] == plain["token_ids"]


async def test_streaming_validation_error_is_a_real_status(make_server):
    server = make_server()
    async with server.client() as client:
        resp = await client.post("/generate", json={"prompt": "x", "stream": True, "top_p": 0})
        assert resp.headers["content-type"].startswith("application/json")
        assert_error(resp, 422, "invalid_request")
        resp = await client.post("/generate", json={"prompt": "x", "stream": True, "adapter": "nope"})
        assert_error(resp, 404, "adapter_not_found")
        resp = await client.post("/generate", json={"input_ids": [5] * 500, "stream": True})
        assert_error(resp, 422, "context_length_exceeded")


# -- request validation ------------------------------------------------------------------------
@pytest.mark.parametrize("body", [
    {"prompt": "x", "bogus": 1},  # unknown field
    {"prompt": ""},  # empty prompt
    {},  # no input
    {"prompt": "x", "input_ids": [1]},  # two inputs
    {"prompt": "x", "messages": [{"role": "user", "content": "y"}]},
    {"messages": []},
    {"messages": [{"role": "user"}]},
    {"messages": [{"role": "user", "content": "y", "name": "z"}]},
    {"input_ids": []},
    {"input_ids": [-1]},
    {"input_ids": [10 ** 9]},  # >= vocab
    {"input_ids": ["1"]},
    {"prompt": 5},
    {"prompt": "x", "max_new_tokens": "5"},  # strict: no coercion
    {"prompt": "x", "max_new_tokens": 5.0},
    {"prompt": "x", "max_new_tokens": 0},
    {"prompt": "x", "max_new_tokens": 513},  # > max_model_len
    {"prompt": "x", "temperature": -0.1},
    {"prompt": "x", "temperature": 101},
    {"prompt": "x", "temperature": "hot"},
    {"prompt": "x", "top_p": 0},
    {"prompt": "x", "top_p": 1.5},
    {"prompt": "x", "top_k": -1},
    {"prompt": "x", "seed": -1},
    {"prompt": "x", "seed": 2 ** 63},
    {"prompt": "x", "stop": "x"},
    {"prompt": "x", "stop": [""]},
    {"prompt": "x", "stop": ["s" * 257]},
    {"prompt": "x", "stop": ["s"] * 17},
    {"prompt": "x", "stream": "yes"},
    {"prompt": "x", "ignore_eos": 1},
    {"prompt": "x", "adapter": 3},
    {"prompt": "x", "adapter": [{"name": "a", "weight": "1"}]},
    {"prompt": "x", "adapter": [{"name": "a", "extra": 1}]},
    {"prompt": "x", "adapter": []},
])
async def test_invalid_requests_are_422(make_server, body):
    server = make_server()
    async with server.client() as client:
        assert_error(await client.post("/generate", json=body), 422, "invalid_request")


@pytest.mark.parametrize("raw", [
    b"{", b"", b"null", b"[]", b'"prompt"', b"\xff\xfe{", b'{"prompt": "x", "temperature": NaN}',
    b'{"prompt": "x", "temperature": Infinity}', b'{"prompt": "x", "temperature": 1e400}',
    b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",  # deeply nested
    b'{"prompt": "x", "max_new_tokens": ' + b"9" * 5000 + b"}",
])
async def test_malformed_json_is_422(make_server, raw):
    server = make_server()
    async with server.client() as client:
        resp = await client.post("/generate", content=raw, headers={"content-type": "application/json"})
        assert_error(resp, 422, "invalid_request")


async def test_context_length_boundary(make_server):
    server = make_server(max_model_len=64)
    async with server.client() as client:
        ok = await post(client, input_ids=[7] * 56, max_new_tokens=8, ignore_eos=True)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 8
        assert_error(await post(client, input_ids=[7] * 57, max_new_tokens=8), 422, "context_length_exceeded")
        assert_error(await post(client, input_ids=[7] * 64, max_new_tokens=1), 422, "context_length_exceeded")
        assert_error(await post(client, input_ids=[7] * 63, max_new_tokens=2), 422, "context_length_exceeded")
        ok = await post(client, input_ids=[7] * 63, max_new_tokens=1)
        assert ok.status_code == 200
        assert_error(await post(client, prompt="word " * 80, max_new_tokens=1), 422, "context_length_exceeded")
    assert server.wait_idle()


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
async def test_wrong_content_type_is_415(make_server, content_type):
    server = make_server()
    headers = {"content-type": content_type} if content_type else {}
    async with server.client() as client:
        resp = await client.post("/generate", content=b'{"prompt": "x"}', headers=headers)
    assert_error(resp, 415, "unsupported_media_type")


async def test_json_content_type_variants_accepted(make_server):
    server = make_server()
    async with server.client() as client:
        for ct in ("application/json; charset=utf-8", "application/vnd.peftserve+json", "Application/JSON"):
            resp = await client.post("/generate", content=b'{"prompt": "x", "max_new_tokens": 1}',
                                      headers={"content-type": ct})
            assert resp.status_code == 200, (ct, resp.text)


async def test_unknown_route_and_wrong_method(make_server):
    server = make_server()
    async with server.client() as client:
        assert_error(await client.get("/nope"), 404, "not_found")
        resp = await client.get("/generate")
        assert_error(resp, 405, "method_not_allowed")
        assert resp.headers["allow"] == "POST"
        assert_error(await client.post("/health"), 405, "method_not_allowed")


# -- body size limits -----------------------------------------------------------------------------
async def test_body_too_large_with_content_length(make_server):
    server = make_server(settings=ServerSettings(max_body_bytes=1000))
    async with server.client() as client:
        resp = await client.post("/generate", content=b'{"prompt": "' + b"a" * 1000 + b'"}',
                                 headers={"content-type": "application/json"})
        assert_error(resp, 413, "body_too_large")
        ok = await client.post("/generate", json={"prompt": "a" * 10, "max_new_tokens": 1})
        assert ok.status_code == 200


async def test_body_too_large_chunked_stops_reading_at_the_cap(make_server):
    KiB = 1024
    server = make_server(settings=ServerSettings(max_body_bytes=64 * KiB, body_drain_bytes=256 * KiB))
    sent = []

    async def body():
        yield b'{"prompt": "'
        for _ in range(100):  # 1.6 MiB in 16 KiB chunks, no Content-Length
            sent.append(1)
            yield b"a" * (16 * KiB)
        yield b'"}'

    async with server.client() as client:
        resp = await client.post("/generate", content=body(), headers={"content-type": "application/json"})
    assert "content-length" not in {k.lower() for k in resp.request.headers}
    assert_error(resp, 413, "body_too_large")
    # refused when the total crossed 64 KiB; then at most 256 KiB were read and discarded
    assert len(sent) <= 4 + 16 + 2


async def test_body_limit_table_per_path():
    from peftserve.server.api.limits import BodySizeLimitMiddleware, cap_for

    table = {"": 100, "/adapters": 1000}
    assert cap_for("/generate", table) == 100
    assert cap_for("/adapters", table) == 1000
    assert cap_for("/adapters/foo/upload", table) == 1000
    assert cap_for("/adaptersX", table) == 100

    async def echo(scope, receive, send):
        total = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            total += len(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(total).encode()})

    app = BodySizeLimitMiddleware(echo, table, drain_bytes=0)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        assert (await client.post("/adapters/x", content=b"a" * 900)).text == "900"
        assert (await client.post("/generate", content=b"a" * 100)).text == "100"
        assert_error(await client.post("/generate", content=b"a" * 101), 413, "body_too_large")

        async def chunks():
            for _ in range(20):
                yield b"a" * 100

        assert_error(await client.post("/adapters/x", content=chunks()), 413, "body_too_large")


# -- adapters, auth ---------------------------------------------------------------------------------
async def test_adapter_without_registry_is_404(make_server):
    server = make_server()
    async with server.client() as client:
        assert_error(await post(client, prompt="x", adapter="missing"), 404, "adapter_not_found")
        assert_error(await post(client, prompt="x", adapter=[{"name": "a", "weight": 0.5}]), 404,
                     "adapter_not_found")
        ok = await post(client, prompt="x", adapter=None, max_new_tokens=1)
        assert ok.status_code == 200


async def test_registry_resolve_and_handle_passed_to_engine(make_server):
    from types import SimpleNamespace

    handle = SimpleNamespace(name="mine", key="0" * 64)  # an AdapterHandle (engine/request.py)

    class Registry:
        def __init__(self):
            self.specs = []

        def resolve(self, spec):
            self.specs.append(spec)
            if spec == "missing":
                raise AdapterNotFound("missing")
            return handle

    registry = Registry()
    server = make_server(registry=registry)
    submitted = []
    real_submit = server.engine.submit

    def submit(prompt_ids, params, adapter=None):
        submitted.append(adapter)
        return real_submit(prompt_ids, params, adapter=None)  # the base engine admits only adapter=None

    server.engine.submit = submit
    async with server.client() as client:
        assert_error(await post(client, prompt="x", adapter="missing"), 404, "adapter_not_found")
        resp = await post(client, prompt="x", adapter="mine", max_new_tokens=2)
        assert resp.status_code == 200 and resp.json()["adapter"] == "mine"
        mix = [{"name": "a", "weight": 0.25}, {"name": "b", "weight": 0.75}]
        resp = await post(client, prompt="x", adapter=mix, max_new_tokens=2)
        assert resp.status_code == 200 and resp.json()["adapter"] == mix
    assert registry.specs == ["missing", "mine", mix]
    assert submitted == [handle, handle]


async def test_adapter_error_from_registry_is_rendered(make_server):
    from peftserve.adapters.errors import AdapterError

    class Registry:
        def resolve(self, spec):
            raise AdapterError("unsupported_adapter", "cannot mix these adapters")

    server = make_server(registry=Registry())
    async with server.client() as client:
        assert_error(await post(client, prompt="x", adapter="a"), 422, "unsupported_adapter")


async def test_api_key_auth(make_server):
    from fastapi import APIRouter, Depends

    from peftserve.server.api.auth import require_admin_key

    server = make_server(settings=ServerSettings(api_key="user-key", admin_key="admin-key"))
    admin = APIRouter()

    @admin.get("/adapters", dependencies=[Depends(require_admin_key)])
    async def list_adapters():
        return {"adapters": []}

    server.app.include_router(admin)
    body = {"prompt": "x", "max_new_tokens": 1}
    async with server.client() as client:
        resp = await client.post("/generate", json=body)
        assert_error(resp, 401, "unauthorized")
        assert resp.headers["www-authenticate"] == "Bearer"
        assert_error(await client.post("/generate", json=body, headers={"authorization": "Basic dXNlcg=="}), 401,
                     "unauthorized")
        assert_error(await client.post("/generate", json=body, headers={"authorization": "Bearer nope"}), 403,
                     "forbidden")
        assert_error(await client.post("/generate", json=body, headers={"authorization": "Bearer ünïcode".encode()}), 403,
                     "forbidden")
        for key in ("user-key", "admin-key"):
            resp = await client.post("/generate", json=body, headers={"authorization": f"Bearer {key}"})
            assert resp.status_code == 200
        assert_error(await client.get("/adapters"), 401, "unauthorized")
        assert_error(await client.get("/adapters", headers={"authorization": "Bearer user-key"}), 403, "forbidden")
        assert (await client.get("/adapters", headers={"authorization": "Bearer admin-key"})).status_code == 200
        # probes stay open
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200
    # only an API key: adapter management falls back to it; no key at all: open
    server.state.settings = ServerSettings(api_key="user-key")
    async with server.client() as client:
        assert (await client.get("/adapters", headers={"authorization": "Bearer user-key"})).status_code == 200
        assert_error(await client.get("/adapters"), 401, "unauthorized")
    server.state.settings = ServerSettings()
    async with server.client() as client:
        assert (await client.get("/adapters")).status_code == 200
        assert (await client.post("/generate", json=body)).status_code == 200


# -- engine states ------------------------------------------------------------------------------------
async def test_queue_full_is_429_with_retry_after(make_server):
    server = make_server(max_waiting=0)
    async with server.client() as client:
        resp = await post(client, prompt="x")
    assert_error(resp, 429, "queue_full")
    assert resp.headers["retry-after"] == "1"


async def test_engine_stopped_is_503(make_server):
    server = make_server()
    server.engine.stop()
    async with server.client() as client:
        assert_error(await post(client, prompt="x"), 503, "engine_unavailable")
        assert_error(await client.get("/health"), 503, "engine_unavailable")
        assert_error(await client.get("/ready"), 503, "engine_unavailable")
        metrics = (await client.get("/metrics")).text
    assert "peftserve_engine_healthy 0.0" in metrics


async def test_engine_loop_death_mid_request_is_503(make_server):
    server = make_server()

    class Boom(BaseException):
        pass

    def die():
        raise Boom()

    server.llm.step = die  # dies at every step: the supervisor restarts it, then gives up
    async with server.client() as client:
        assert_error(await post(client, prompt="x", max_new_tokens=4), 503, "engine_restarted")
        while server.engine.state.value != "dead":  # each restart dies again on the next request
            resp = await post(client, prompt="x", max_new_tokens=4)
            assert resp.status_code == 503, resp.text
            await asyncio.sleep(0.01)
        assert_error(await post(client, prompt="x", max_new_tokens=4), 503, "engine_unavailable")
        assert_error(await client.get("/health"), 503, "engine_unavailable")
    assert "Boom" in server.engine.dead_reason


async def test_failed_generation_is_500(make_server):
    server = make_server()

    def fail(plan):
        raise RuntimeError("kernel exploded")

    server.llm.runner.execute = fail
    async with server.client() as client:
        assert_error(await post(client, prompt="x", max_new_tokens=4), 500, "generation_failed")
        resp = await client.post("/generate", json={"prompt": "x", "stream": True})
        assert resp.status_code == 200  # the failure happened after the stream started
        events = parse_sse(resp.text)
        assert events[-2]["error"]["code"] == "generation_failed" and events[-1] == "[DONE]"
        assert (await client.get("/health")).status_code == 200  # a failed step never kills the engine
    assert counter(server.metrics, "peftserve_request_failure_total", reason="error") == 2


async def test_draining_refuses_new_work(make_server):
    server = make_server()
    async with server.client() as client:
        assert (await client.get("/ready")).json() == {"status": "ready", "model": "tiny"}
        server.state.draining = True
        assert_error(await client.get("/ready"), 503, "draining")
        assert_error(await post(client, prompt="x"), 503, "draining")
        assert (await client.get("/health")).status_code == 200
        assert "peftserve_draining 1.0" in (await client.get("/metrics")).text


# -- client disconnect frees the KV slot -------------------------------------------------------------
def slow_engine(server, delay: float = 0.002):
    step = server.llm.step

    def slow():
        time.sleep(delay)
        return step()

    server.llm.step = slow


async def test_disconnect_non_streaming_frees_kv_blocks(make_server, live_server):
    server = make_server(max_model_len=2048, max_batch_size=4)
    slow_engine(server)
    live = live_server(server.app)
    async with httpx.AsyncClient(base_url=live.url, timeout=httpx.Timeout(10.0, read=0.5)) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/generate", json={"prompt": "x", "max_new_tokens": 2000, "ignore_eos": True})
    assert wait_for(lambda: counter(server.metrics, "peftserve_request_failure_total", reason="abort") == 1, 3)
    assert wait_for(lambda: server.engine.snapshot.kv_blocks_requests == 0 and server.engine.num_running == 0, 1)
    assert wait_for(lambda: counter(server.metrics, "peftserve_requests_total", endpoint="/generate",
                                    status="499") == 1, 2)
    assert server.state.inflight == 0


async def test_disconnect_streaming_frees_kv_blocks(make_server, live_server):
    server = make_server(max_model_len=2048, max_batch_size=4)
    slow_engine(server)
    live = live_server(server.app)
    got = []
    async with httpx.AsyncClient(base_url=live.url, timeout=10.0) as client:
        async with client.stream("POST", "/generate", json={"prompt": "x", "max_new_tokens": 2000,
                                                            "ignore_eos": True, "stream": True}) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if line.startswith("data: "):
                    got.append(json.loads(line[6:]))
                if len(got) == 3:
                    break
    assert all("token_id" in e for e in got)
    assert wait_for(lambda: counter(server.metrics, "peftserve_request_failure_total", reason="abort") == 1, 3)
    assert wait_for(lambda: server.engine.snapshot.kv_blocks_requests == 0 and server.engine.num_running == 0, 1)
    assert wait_for(lambda: server.state.inflight == 0, 1)


async def test_live_server_round_trip(make_server, live_server):
    server = make_server()
    live = live_server(server.app)
    async with httpx.AsyncClient(base_url=live.url, timeout=10.0) as client:
        resp = await client.post("/generate", json={"prompt": "hi", "max_new_tokens": 3, "stream": True})
        assert parse_sse(resp.text)[-1] == "[DONE]"
        # over the cap: the client still gets its 413 (the server drains instead of resetting)
        resp = await client.post("/generate", content=b"x" * (2 * 1024 * 1024),
                                 headers={"content-type": "application/json"})
        assert_error(resp, 413, "body_too_large")

        async def chunked():
            for _ in range(32):
                yield b"x" * 65536

        resp = await client.post("/generate", content=chunked(), headers={"content-type": "application/json"})
        assert_error(resp, 413, "body_too_large")
        assert (await client.get("/health")).status_code == 200


# -- metrics --------------------------------------------------------------------------------------
METRIC_NAMES = [
    "peftserve_time_to_first_token_seconds_bucket", "peftserve_inter_token_latency_seconds_bucket",
    "peftserve_e2e_request_latency_seconds_bucket", "peftserve_request_queue_time_seconds_bucket",
    "peftserve_request_prefill_time_seconds_bucket", "peftserve_request_decode_time_seconds_bucket",
    "peftserve_prompt_tokens_total", "peftserve_generation_tokens_total", "peftserve_num_requests_running",
    "peftserve_num_requests_waiting", "peftserve_requests_total", "peftserve_request_success_total",
    "peftserve_request_failure_total", "peftserve_batch_size_bucket", "peftserve_iteration_tokens_bucket",
    "peftserve_engine_healthy", "peftserve_draining", "peftserve_build_info", "peftserve_kv_cache_usage_perc",
]


async def test_metrics_endpoint(make_server):
    server = make_server()
    async with server.client() as client:
        await asyncio.gather(*(post(client, input_ids=[5 + i] * (3 + i), max_new_tokens=4, ignore_eos=True)
                               for i in range(3)))
        await post(client, prompt="")  # one 422
        resp = await client.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    text = resp.text
    for name in METRIC_NAMES:
        assert name in text, name
    m = server.metrics
    assert counter(m, "peftserve_prompt_tokens_total") == 3 + 4 + 5
    assert counter(m, "peftserve_generation_tokens_total") == 12
    assert counter(m, "peftserve_request_success_total", finished_reason="length") == 3
    assert counter(m, "peftserve_requests_total", endpoint="/generate", status="200") == 3
    assert counter(m, "peftserve_requests_total", endpoint="/generate", status="422") == 1
    assert counter(m, "peftserve_time_to_first_token_seconds_count", adapter="base") == 3
    assert counter(m, "peftserve_e2e_request_latency_seconds_count", adapter="base") == 3
    assert counter(m, "peftserve_inter_token_latency_seconds_count") == 9
    assert counter(m, "peftserve_batch_size_count") >= 4
    assert counter(m, "peftserve_build_info", version="test", base_model="tiny", dtype="float32") == 1
    assert counter(m, "peftserve_engine_healthy") == 1
    assert counter(m, "peftserve_num_requests_running") == 0
    assert counter(m, "peftserve_kv_cache_usage_perc") == 0


def test_metrics_per_app_registry_and_adapter_label_bound():
    from peftserve.server.metrics import Metrics

    class Handle:
        def __init__(self, name):
            self.name = name

    a, b = Metrics(), Metrics()  # two apps in one process: no duplicate-registration error
    assert a.registry is not b.registry
    labels = {a.label_for(Handle(f"adapter-{i}")) for i in range(100)}
    assert len(labels) == 65 and "other" in labels
    assert a.label_for(Handle("adapter-3")) == "adapter-3"
    assert a.label_for(Handle("adapter-99")) == "other"
    assert a.label_for(None) == "base"
    assert a.label_for(object()) == "other"


# -- CLI and logging ----------------------------------------------------------------------------------
def test_cli_parser_defaults_and_env(monkeypatch):
    from peftserve.server.cli import build_parser

    monkeypatch.setenv("PEFTSERVE_API_KEY", "from-env")
    monkeypatch.setenv("PEFTSERVE_ADMIN_KEY", "admin-env")
    args = build_parser().parse_args(["serve"])
    assert (args.model, args.host, args.port, args.dtype) == ("default", "127.0.0.1", 8000, "auto")
    assert (args.api_key, args.admin_key) == ("from-env", "admin-env")
    args = build_parser().parse_args(["serve", "--api-key", "cli", "--max-batch-size", "4", "--threads", "2",
                                      "--adapters", "/tmp/a", "--max-cpu-adapters", "3"])
    assert (args.api_key, args.max_batch_size, args.threads, args.adapters) == ("cli", 4, 2, "/tmp/a")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--max-batch-size", "0"])


def test_cli_train_adapter_dispatch(monkeypatch):
    import types

    from peftserve.server import cli

    calls = []
    fake = types.ModuleType("peftserve.adapters.training.cli")
    fake.main = lambda argv: calls.append(argv) or 0
    monkeypatch.setitem(sys.modules, "peftserve.adapters.training.cli", fake)
    assert cli.main(["train-adapter", "--method", "lora", "--help"]) == 0
    assert calls == [["--method", "lora", "--help"]]


def test_json_log_formatter():
    from peftserve.server.cli import JsonFormatter

    record = logging.LogRecord("peftserve.x", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    record.request_id = "abc"
    out = json.loads(JsonFormatter().format(record))
    assert out["msg"] == "hello world" and out["level"] == "INFO" and out["logger"] == "peftserve.x"
    assert out["request_id"] == "abc" and out["ts"].endswith("Z")


_SERVE_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from conftest import build_tiny_model
    from transformers import AutoTokenizer
    from peftserve.adapters.base_model import resolve_model_dir
    from peftserve.server.build import build_server
    from peftserve.server.metrics import Metrics
    from peftserve.server.cli import configure_logging, run_server
    from peftserve.server.engine.config import EngineConfig
    from peftserve.server.state import ServerSettings

    configure_logging("info")
    tok = AutoTokenizer.from_pretrained(resolve_model_dir("default"))
    metrics = Metrics(base_model="tiny")
    server = build_server(build_tiny_model(len(tok)), tok, EngineConfig(max_batch_size=4, max_model_len=1024),
                          store=None, model_name="tiny", settings=ServerSettings(drain_timeout_s=20), metrics=metrics)
    llm = server.state.engine.engine
    step = llm.step
    llm.step = lambda: (time.sleep(0.015), step())[1]  # slow enough to be caught mid-flight
    sys.exit(run_server(server.app, server.state, port={port}, log_level="info"))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_in_flight_requests_and_exits_zero(tmp_path):
    port = _free_port()
    script = tmp_path / "serve.py"
    script.write_text(_SERVE_SCRIPT.format(tests=str(Path(__file__).parent), port=port))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=30.0) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if client.get("/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
                time.sleep(0.1)

            import threading

            result = {}

            def long_request():
                with httpx.Client(base_url=url, timeout=30.0) as c:
                    result["resp"] = c.post("/generate", json={"prompt": "x", "max_new_tokens": 150,
                                                               "ignore_eos": True})

            worker = threading.Thread(target=long_request)
            worker.start()
            assert wait_for(lambda: "peftserve_num_requests_running 1.0" in client.get("/metrics").text, 10)
            proc.send_signal(signal.SIGTERM)
            assert wait_for(lambda: client.get("/ready").status_code == 503, 2)
            assert_error(client.get("/ready"), 503, "draining")
            assert_error(client.post("/generate", json={"prompt": "x"}), 503, "draining")
            worker.join(30)
        resp = result["resp"]
        assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 150
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=10)
    lines = [json.loads(line) for line in err.decode().splitlines() if line.strip()]
    assert any(line["msg"].startswith("SIGTERM received") for line in lines)
    assert any(line.get("request_id") and line.get("outcome") == "length" for line in lines)
    assert all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)
