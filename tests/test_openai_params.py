"""The /v1 parameter screen and error discipline (in-process ASGI, base model only).

Every OpenAI/vLLM parameter is either served, or refused with a 400 naming it unless it carries
its no-op value; unknown parameters are refused too. Errors use OpenAI's shape with our codes.
"""

from __future__ import annotations

import json

import httpx
import pytest

from peftserve.server.api.openai_schemas import REFUSED_CHAT, REFUSED_COMPLETION
from peftserve.server.state import ServerSettings

pytestmark = pytest.mark.anyio

CHAT = [{"role": "user", "content": "Hi"}]


def assert_oai_error(resp: httpx.Response, status: int, code: str, param: str | None = "<any>") -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if param != "<any>":
        assert body["error"]["param"] == param, body
    return body["error"]


async def test_noop_values_of_unserved_parameters_are_accepted(make_server):
    server = make_server()
    noop = {"best_of": 1, "suffix": None, "logit_bias": {}, "use_beam_search": False, "min_p": 0.0,
            "stop_token_ids": [], "skip_special_tokens": True, "response_format": {"type": "text"},
            "metadata": None, "store": False, "user": "u-1", "stream_options": None}
    async with server.client() as c:
        r = await c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, **noop})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "tiny"  # model may be omitted (vLLM): the base model
        chat_noop = {"tools": [], "tool_choice": "none", "parallel_tool_calls": None, "modalities": ["text"],
                     "logit_bias": None, "chat_template_kwargs": {}}
        r = await c.post("/v1/chat/completions", json={"model": "tiny", "messages": [
            {"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief"}],
             "name": None}, *CHAT], "max_tokens": 2, **chat_noop})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("route,param,value", [
    ("/v1/completions", "best_of", 2), ("/v1/completions", "suffix", "x"), ("/v1/completions", "logit_bias",
                                                                              {"1": 5}),
    ("/v1/completions", "min_p", 0.1), ("/v1/completions", "stop_token_ids", [2]),
    ("/v1/completions", "prompt_logprobs", 1), ("/v1/completions", "guided_json", {}),
    ("/v1/chat/completions", "tools", [{"type": "function"}]), ("/v1/chat/completions", "response_format",
                                                                 {"type": "json_object"}),
    ("/v1/chat/completions", "tool_choice", "auto"), ("/v1/chat/completions", "chat_template", "{{x}}"),
    ("/v1/chat/completions", "continue_final_message", True), ("/v1/chat/completions", "echo", True),
])
async def test_unserved_parameters_are_refused_by_name(make_server, route, param, value):
    server = make_server(start=False)
    base = {"prompt": "Hi"} if route == "/v1/completions" else {"messages": CHAT}
    async with server.client() as c:
        err = assert_oai_error(await c.post(route, json={**base, param: value}), 400, "unsupported_parameter", param)
        assert param in err["message"] and err["type"] == "invalid_request_error"


def test_the_refused_tables_never_overlap_the_served_fields():
    from peftserve.server.api.openai_schemas import ChatRequest, CompletionRequest

    assert not set(REFUSED_COMPLETION) & set(CompletionRequest.model_fields)
    assert not set(REFUSED_CHAT) & set(ChatRequest.model_fields)


async def test_unknown_and_invalid_parameters(make_server):
    server = make_server()
    async with server.client() as c:
        assert_oai_error(await c.post("/v1/completions", json={"prompt": "x", "max_new_tokens": 3}), 400,
                         "unknown_parameter", "max_new_tokens")
        assert_oai_error(await c.post("/v1/chat/completions", json={"messages": [
            {"role": "user", "content": "x", "weird": 1}]}), 400, "unknown_parameter", "messages.0.weird")
        assert_oai_error(await c.post("/v1/chat/completions", json={"messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}), 400,
            "unsupported_parameter", "messages.0.content.0.type")
        assert_oai_error(await c.post("/v1/chat/completions", json={"messages": [
            {"role": "tool", "content": "x"}]}), 422, "invalid_request", "messages.0.role")
        assert_oai_error(await c.post("/v1/completions", json={"prompt": "x", "temperature": "0"}), 422,
                         "invalid_request", "temperature")
        assert_oai_error(await c.post("/v1/completions", json={"prompt": "x", "n": 0}), 422, "invalid_request", "n")
        assert_oai_error(await c.post("/v1/completions", json={"prompt": "x", "logprobs": 21}), 422,
                         "invalid_request", "logprobs")
        assert_oai_error(await c.post("/v1/completions", json={"prompt": "x", "presence_penalty": 2.5}), 422,
                         "invalid_request", "presence_penalty")
        assert_oai_error(await c.post("/v1/completions", json={"prompt": "x", "stream_options": {
            "include_usage": True}}), 422, "invalid_request")
        assert_oai_error(await c.post("/v1/completions", json={"prompt": "x", "stream": True, "stream_options": {
            "continuous_usage_stats": True}}), 400, "unsupported_parameter", "stream_options.continuous_usage_stats")
        assert_oai_error(await c.post("/v1/completions", json={"prompt": "x", "echo": True, "logprobs": 1}), 422,
                         "invalid_request")
        assert_oai_error(await c.post("/v1/chat/completions", json={"messages": CHAT, "top_logprobs": 2}), 422,
                         "invalid_request")
        assert_oai_error(await c.post("/v1/chat/completions", json={
            "messages": CHAT, "max_tokens": 3, "max_completion_tokens": 4}), 422, "invalid_request")
        assert_oai_error(await c.post("/v1/completions", json={"max_tokens": 3}), 422, "invalid_request", "prompt")
        assert_oai_error(await c.post("/v1/completions", json={"prompt": [1, 10**9]}), 422, "invalid_request",
                         "prompt")
        assert_oai_error(await c.post("/v1/completions", content=b'{"prompt": "a", "prompt": "b"}',
                                      headers={"content-type": "application/json"}), 422, "invalid_request", "prompt")
        assert_oai_error(await c.post("/v1/completions", content=b"[1]", headers={"content-type": "application/json"}),
                         422, "invalid_request")
        assert_oai_error(await c.post("/v1/completions", content=b"prompt=x"), 415, "unsupported_media_type")
        assert_oai_error(await c.get("/v1/models/nope"), 404, "model_not_found", "model")
        assert_oai_error(await c.post("/v1/completions", json={"prompt": "x", "model": "nope"}), 404,
                         "model_not_found", "model")
        assert_oai_error(await c.delete("/v1/models"), 405, "method_not_allowed")
    # our own routes keep their shape
    async with server.client() as c:
        r = await c.post("/generate", json={"prompt": "x", "model": "tiny"})
        assert r.status_code == 422 and set(r.json()["error"]) == {"code", "message"}


# A value no member of a union accepts: the error names what is wrong with it as sent, at the
# place the client wrote it (pydantic lists every member's refusal, under internal tags).
UNION_CASES = [
    ("/v1/completions", {"prompt": [1, -5]}, "prompt.1", "greater than or equal to 0"),
    ("/v1/completions", {"prompt": [[3, 4], [1, -2]]}, "prompt.1.1", "greater than or equal to 0"),
    ("/v1/completions", {"prompt": [1, 2.5]}, "prompt.1", "valid integer"),
    ("/v1/completions", {"prompt": []}, "prompt", "at least 1 item"),
    ("/v1/completions", {"prompt": {"a": 1}}, "prompt", "valid string or a valid list"),
    ("/v1/completions", {"prompt": "x", "stop": ["a"] * 17}, "stop", "at most 16 items"),
    ("/v1/completions", {"prompt": "x", "stop": ["ok", "a" * 257]}, "stop.1", "at most 256 characters"),
    ("/v1/chat/completions", {"messages": CHAT, "stop": [""]}, "stop.0", "at least 1 character"),
]


@pytest.mark.parametrize("route,body,param,says", UNION_CASES, ids=[c[2] + ":" + c[3] for c in UNION_CASES])
async def test_a_union_error_names_the_value_as_sent(make_server, route, body, param, says):
    server = make_server()
    async with server.client() as c:
        err = assert_oai_error(await c.post(route, json=body), 422, "invalid_request", param)
    assert says in err["message"] and err["message"].startswith(param + ": "), err
    assert "constrained" not in err["message"] and "[" not in err["message"], err


async def test_our_routes_report_union_errors_the_same_way(make_server):
    server = make_server()
    async with server.client() as c:
        r = await c.post("/generate", json={"prompt": "x", "adapter": [{"name": "a", "weight": 1e9}]})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["message"] == "adapter.0.weight: Input should be less than or equal to 100", r.text
        # a key of the client's own is never taken for a member's tag, whatever it looks like
        r = await c.post("/generate", json={"prompt": "x", "adapter": [{"name": "a", "my-key": 1}]})
        assert r.json()["error"]["message"] == "adapter.0.my-key: Extra inputs are not permitted", r.text
        r = await c.post("/generate", json={"prompt": "x", "a[0]-b": 1})
        assert r.json()["error"]["message"] == "a[0]-b: Extra inputs are not permitted", r.text
        r = await c.post("/generate", json={"prompt": "x", "adapter": 5})
        # (FastAPI validates JSON input: pydantic calls a list an array there)
        assert r.json()["error"]["message"] == "adapter: Input should be a valid string or a valid array", r.text


async def test_context_length_auth_queue_and_draining(make_server):
    server = make_server(settings=ServerSettings(api_key="k1"), max_model_len=32, max_waiting=1)
    auth = {"Authorization": "Bearer k1"}
    async with server.client() as c:
        assert_oai_error(await c.post("/v1/completions", json={"prompt": "x"}), 401, "unauthorized")
        assert_oai_error(await c.post("/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer no"}),
                         403, "forbidden")
        assert_oai_error(await c.post("/v1/completions", json={"prompt": [5] * 20, "max_tokens": 13}, headers=auth),
                         422, "context_length_exceeded")
        # chat without max_tokens gets what is left of the context (vLLM): it ends by length at 32
        r = await c.post("/v1/chat/completions", json={"messages": CHAT, "temperature": 0, "ignore_eos": True},
                         headers=auth)
        assert r.status_code == 200, r.text
        u = r.json()["usage"]
        assert u["prompt_tokens"] + u["completion_tokens"] == 32 and r.json()["choices"][0]["finish_reason"] == "length"
        # n choices are admitted all or none: 16 never fit 8 KV slots + a 1-deep queue
        assert_oai_error(await c.post("/v1/completions", json={"prompt": "x", "n": 16}, headers=auth), 429,
                         "queue_full")
        assert server.wait_idle()
        server.state.draining = True
        assert_oai_error(await c.post("/v1/completions", json={"prompt": "x"}, headers=auth), 503, "draining")


async def test_streamed_completion_events_and_done(make_server):
    server = make_server()
    async with server.client() as c:
        r = await c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "temperature": 0, "n": 2,
                                                  "stream": True, "ignore_eos": True,
                                                  "stream_options": {"include_usage": True}})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        blocks = [b for b in r.text.split("\n\n") if b]
        assert blocks[-1] == "data: [DONE]"
        events = [json.loads(b.removeprefix("data: ")) for b in blocks[:-1]]
        assert all(e["usage"] is None for e in events[:-1]) and events[-1]["choices"] == []
        assert events[-1]["usage"]["completion_tokens"] == 8
        finishes = [ch for e in events for ch in e["choices"] if ch["finish_reason"]]
        assert sorted(ch["index"] for ch in finishes) == [0, 1] and {ch["finish_reason"] for ch in finishes} == {
            "length"}
        plain = await c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "stream": True,
                                                      "temperature": 0})
        assert all("usage" not in json.loads(b.removeprefix("data: "))
                   for b in plain.text.split("\n\n") if b and b != "data: [DONE]")
    assert server.wait_idle()


# -- a client that goes away cancels every choice ------------------------------------------------------------
async def test_disconnect_cancels_every_choice(make_server, live_server):
    from tests.test_api import counter, slow_engine, wait_for

    server = make_server(max_model_len=2048, max_batch_size=4)
    slow_engine(server)
    live = live_server(server.app)
    body = {"prompt": "x", "max_tokens": 2000, "ignore_eos": True, "n": 3}
    async with httpx.AsyncClient(base_url=live.url, timeout=httpx.Timeout(10.0, read=0.5)) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/v1/completions", json=body)
    assert wait_for(lambda: counter(server.metrics, "peftserve_request_failure_total", reason="abort") == 3, 3)
    assert wait_for(lambda: server.engine.snapshot.kv_blocks_requests == 0 and server.engine.num_running == 0, 1)
    assert wait_for(lambda: counter(server.metrics, "peftserve_requests_total", endpoint="/v1/completions",
                                    status="499") == 1, 2)
    assert server.state.inflight == 0
    got = 0
    async with httpx.AsyncClient(base_url=live.url, timeout=10.0) as client:
        async with client.stream("POST", "/v1/chat/completions", json={
                "messages": CHAT, "max_tokens": 2000, "ignore_eos": True, "n": 2, "stream": True}) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                got += line.startswith("data: ")
                if got == 5:
                    break
    assert wait_for(lambda: counter(server.metrics, "peftserve_request_failure_total", reason="abort") == 5, 3)
    assert wait_for(lambda: server.engine.snapshot.kv_blocks_requests == 0 and server.engine.num_running == 0, 1)
    assert wait_for(lambda: server.state.inflight == 0, 1)


async def test_body_limit_on_v1_in_openai_shape(make_server):
    server = make_server(settings=ServerSettings(max_body_bytes=1024))
    async with server.client() as c:
        big = {"prompt": "x" * 2048}
        assert_oai_error(await c.post("/v1/completions", json=big), 413, "body_too_large")
        r = await c.post("/generate", json=big)
        assert r.status_code == 413 and set(r.json()["error"]) == {"code", "message"}


async def test_a_failing_choice_fails_the_request_and_stops_the_others(make_server):
    from peftserve.server.engine.request import ErrorCode
    from tests.test_api import slow_engine

    server = make_server(max_model_len=2048, max_batch_size=4)
    slow_engine(server)
    add, calls = server.llm.add, []

    def add_failing_second(seq):
        calls.append(seq)
        if len(calls) == 2:  # the engine fails this one row (as for a non-finite logit row)
            server.llm.fail(seq, ErrorCode.GENERATION_FAILED, "simulated")
        else:
            add(seq)

    server.llm.add = add_failing_second
    async with server.client() as c:
        for stream in (False, True):
            calls.clear()
            r = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2000, "ignore_eos": True,
                                                      "n": 3, "stream": stream})
            if stream:  # already started: the error is the last event before [DONE]
                blocks = [b for b in r.text.split("\n\n") if b]
                assert blocks[-1] == "data: [DONE]"
                err = json.loads(blocks[-2].removeprefix("data: "))["error"]
                assert err["code"] == "generation_failed" and err["type"] == "server_error"
            else:
                assert_oai_error(r, 500, "generation_failed")
            assert server.wait_idle()  # the two healthy choices were cancelled, not run to 2000 tokens
            assert all(len(s.output_ids) < 2000 for s in calls)
