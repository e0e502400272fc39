"""One request must never take the server down (issue 9, engine/API half), over HTTP:

- the red-team reproductions (temperature 1e-300 / 1e-40, top_p 1e-300) answer 200 as greedy /
  top-token sampling, and the engine stays up;
- a row that fails inside the step (NaN logits, sampling, detokeniser) fails alone: one poison
  request among 8 streams, the 8 get exactly their unpoisoned tokens;
- engine failure codes become the right status (JSON) or an in-band SSE error, with generic
  messages (details only in the log, with the request id);
- duplicate JSON keys and deep nesting are 422; /docs, /redoc, /openapi.json follow the API key;
- the supervisor: a fatal error in the loop fails the in-flight requests with engine_restarted,
  the next request succeeds without a process restart, peftserve_engine_restarts_total == 1;
- a property-based run (hypothesis) over the whole /generate request schema: never a 5xx.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftserve.server.engine import engine as engine_mod
from peftserve.server.engine import sampler as sampler_mod
from peftserve.server.engine.detokenizer import IncrementalDetokenizer
from peftserve.server.engine.supervisor import EngineState, RestartPolicy, RestartTracker
from peftserve.server.state import ServerSettings
from tests.test_api import assert_error, counter, parse_sse, post, wait_for

pytestmark = pytest.mark.anyio

JSON = {"content-type": "application/json"}
MARK = 4242  # first prompt token of a poison request


def greedy_body(**extra):
    return {"prompt": "hi", "max_new_tokens": 2, **extra}


# -- the reproductions ---------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [{"temperature": 1e-300}, {"temperature": 1e-40}, {"temperature": 5e-324},
                                   {"temperature": 0.5, "top_p": 1e-300}, {"temperature": 0.5, "top_p": 5e-324}],
                         ids=["t1e-300", "t1e-40", "t-subnormal", "top_p1e-300", "top_p-subnormal"])
async def test_extreme_sampling_values_are_served_and_never_kill_the_engine(make_server, extra):
    server = make_server()
    async with server.client() as client:
        greedy = (await post(client, **greedy_body(max_new_tokens=8, ignore_eos=True))).json()["token_ids"]
        resp = await post(client, **greedy_body(max_new_tokens=8, ignore_eos=True, **extra))
        assert resp.status_code == 200, resp.text
        # below the temperature floor = greedy; a nucleus that underflows keeps only the top token
        assert resp.json()["token_ids"] == greedy
        stream = await client.post("/generate", json=greedy_body(stream=True, **extra))
        assert stream.status_code == 200 and parse_sse(stream.text)[-2]["finish_reason"] in ("length", "eos")
        assert (await client.get("/health")).status_code == 200
        assert (await post(client, prompt="after", max_new_tokens=2)).status_code == 200
    assert server.engine.restarts == 0


# -- one row fails inside the step ------------------------------------------------------------------
def poison_nan(server, monkeypatch):
    real = server.llm.runner.execute

    def execute(plan):
        logits = real(plan).clone()  # [R, V]
        rows = [seq for seq, n in plan if seq.num_computed + n == seq.num_tokens]
        for i, seq in enumerate(rows):
            if seq.prompt_ids[0] == MARK and seq.output_ids:  # mid-generation, after its first token
                logits[i, 7] = float("nan")
        return logits

    monkeypatch.setattr(server.llm.runner, "execute", execute)
    return "numerical_error", 500


def poison_sampling(server, monkeypatch):
    real, real_batch = sampler_mod._draw, sampler_mod._draw_batch

    def draw(row_logits, params, gen):
        if params.top_k == 13:  # only the poison request asks for top_k 13
            raise RuntimeError("injected sampling failure")
        return real(row_logits, params, gen)

    def draw_batch(logits, params, gens):  # a batch holding the poison row fails as a whole
        if any(p.top_k == 13 for p in params):
            raise RuntimeError("injected sampling failure")
        return real_batch(logits, params, gens)

    monkeypatch.setattr(sampler_mod, "_draw", draw)
    monkeypatch.setattr(sampler_mod, "_draw_batch", draw_batch)
    return "sampling_error", 500


def poison_detok(server, monkeypatch):
    class Fragile(IncrementalDetokenizer):
        def add(self, token_id, **kw):
            if MARK in self.ids and len(self.ids) > 9:
                raise ValueError("injected detokeniser failure")
            return super().add(token_id, **kw)

    monkeypatch.setattr(engine_mod, "IncrementalDetokenizer", Fragile)
    return "generation_failed", 500


def stream_body(i: int) -> dict:
    body = {"input_ids": [100 + 7 * i + j for j in range(3 + i)], "max_new_tokens": 10, "ignore_eos": True,
            "stream": True}
    if i % 2:
        # seeded: its own draws whatever the batch; top-k 5 so another CPU's rounding almost never flips one
        # (docs/openai.md, "seed")
        body.update(temperature=0.9, top_k=5, top_p=0.95, seed=i)
    return body


async def stream_tokens(client, body) -> tuple[list[int], list]:
    resp = await client.post("/generate", json=body)
    assert resp.status_code == 200, resp.text
    events = parse_sse(resp.text)
    return [e["token_id"] for e in events if isinstance(e, dict) and "token_id" in e], events


@pytest.mark.parametrize("poison", [poison_nan, poison_sampling, poison_detok], ids=["nan", "sampling", "detok"])
async def test_one_poison_request_among_8_streams(make_server, monkeypatch, poison):
    server = make_server(max_batch_size=16)
    async with server.client() as client:
        alone = [await stream_tokens(client, stream_body(i)) for i in range(8)]
        code, status = poison(server, monkeypatch)
        poison_req = {"input_ids": [MARK, 5, 6, 7], "max_new_tokens": 10, "ignore_eos": True, "stream": True,
                      "temperature": 1.0, "top_k": 13, "seed": 3}
        results = await asyncio.gather(*(stream_tokens(client, stream_body(i)) for i in range(4)),
                                       stream_tokens(client, poison_req),
                                       *(stream_tokens(client, stream_body(i)) for i in range(4, 8)))
        poisoned = results.pop(4)
        for (tokens, events), (ref_tokens, ref_events) in zip(results, alone):
            assert tokens == ref_tokens and len(tokens) == 10
            assert events[-2] == ref_events[-2] and events[-1] == "[DONE]"
        events = poisoned[1]
        assert events[-1] == "[DONE]" and set(events[-2]) == {"error"} and events[-2]["error"]["code"] == code
        assert set(events[-2]["error"]) == {"code", "message"}
        # the same failure without streaming: a real status with the JSON error body
        assert_error(await client.post("/generate", json={**poison_req, "stream": False}), status, code)
        assert (await client.get("/health")).status_code == 200
    assert server.wait_idle() and server.engine.restarts == 0


# -- error bodies and messages ---------------------------------------------------------------------
async def test_failure_messages_are_generic_and_details_are_logged(make_server, caplog):
    server = make_server()

    def fail(plan):
        raise RuntimeError("secret-detail at /opt/internal/kernel.py:42")

    server.llm.runner.execute = fail
    caplog.set_level(logging.INFO)
    async with server.client() as client:
        resp = await post(client, prompt="x", max_new_tokens=2)
        body = assert_error(resp, 500, "generation_failed")
        stream = await client.post("/generate", json={"prompt": "x", "stream": True})
    for text in (resp.text, stream.text):
        assert "secret" not in text and "RuntimeError" not in text and "kernel" not in text
    request_id = resp.headers["x-request-id"]
    done = [r for r in caplog.records if r.getMessage() == "generate finished" and r.request_id == request_id]
    assert done and "secret-detail" in done[0].error and done[0].code == "generation_failed"
    assert body["error"]["message"] == "generation failed for this request"


async def test_dead_engine_message_does_not_leak_the_exception(make_server):
    server = make_server()
    server.engine._tracker = RestartTracker(RestartPolicy(max_restarts=0))  # no restarts: stays dead

    class SecretBoom(BaseException):
        pass

    def die():
        raise SecretBoom("password=hunter2")

    server.llm.step = die
    async with server.client() as client:
        first = await post(client, prompt="x", max_new_tokens=2)
        health = await client.get("/health")
        ready = await client.get("/ready")
    assert_error(first, 503, "engine_unavailable")
    assert_error(health, 503, "engine_unavailable") and assert_error(ready, 503, "engine_unavailable")
    for resp in (first, health, ready):
        assert "Boom" not in resp.text and "hunter2" not in resp.text and "died" not in resp.text
    assert "SecretBoom" in server.engine.dead_reason  # kept for the log / operators


# -- strict JSON -----------------------------------------------------------------------------------
@pytest.mark.parametrize("raw", [
    b'{"prompt":"hi","prompt":"bye"}',
    b'{"prompt":"hi","max_new_tokens":1,"max_new_tokens":2}',
    b'{"messages":[{"role":"user","content":"a","content":"b"}]}',
    b'{"prompt":"hi","adapter":[{"name":"a","name":"b"}]}',
    b'{"prompt":"hi","stream":false,"stream":true}',
])
async def test_duplicate_json_keys_are_422(make_server, raw):
    server = make_server()
    async with server.client() as client:
        body = assert_error(await client.post("/generate", content=raw, headers=JSON), 422, "invalid_request")
    assert "duplicate key" in body["error"]["message"]


@pytest.mark.parametrize("raw", [
    b'{"prompt":"x","stop":' + b"[" * 200_000 + b"]" * 200_000 + b"}",
    b"[" * 400_000 + b"]" * 400_000,
    b'{"a":' * 80_000 + b"1" + b"}" * 80_000,
])
async def test_deeply_nested_json_is_422(make_server, raw):
    server = make_server()
    async with server.client() as client:
        assert_error(await client.post("/generate", content=raw, headers=JSON), 422, "invalid_request")
        assert (await client.get("/health")).status_code == 200


# -- docs follow the API key ------------------------------------------------------------------------
DOCS = ("/docs", "/redoc", "/openapi.json")


async def test_docs_need_the_api_key_when_one_is_set(make_server):
    server = make_server(settings=ServerSettings(api_key="user-key", admin_key="admin-key"))
    async with server.client() as client:
        for path in DOCS:
            assert_error(await client.get(path), 401, "unauthorized")
            assert_error(await client.get(path, headers={"authorization": "Bearer nope"}), 403, "forbidden")
            for key in ("user-key", "admin-key"):
                assert (await client.get(path, headers={"authorization": f"Bearer {key}"})).status_code == 200
        schema = (await client.get("/openapi.json", headers={"authorization": "Bearer user-key"})).json()
    body = schema["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"prompt", "temperature", "top_p", "top_k"} <= set(body["properties"])
    assert not any(p in schema["paths"] for p in DOCS)  # the docs routes are not API routes


async def test_docs_open_without_a_key_and_gone_with_no_docs(make_server):
    server = make_server()
    async with server.client() as client:
        for path in DOCS:
            assert (await client.get(path)).status_code == 200
    server = make_server(settings=ServerSettings(docs=False))
    async with server.client() as client:
        for path in DOCS:
            assert_error(await client.get(path), 404, "not_found")


def test_cli_no_docs_flag():
    from peftserve.server.cli import build_parser

    assert build_parser().parse_args(["serve"]).docs is True
    assert build_parser().parse_args(["serve", "--no-docs"]).docs is False


# -- the supervisor ----------------------------------------------------------------------------------
class Fatal(BaseException):
    """Escapes every per-request guard (stands in for a device error or a bug in shared state)."""


async def test_engine_crash_is_supervised_and_healed(make_server):
    server = make_server()
    server.engine._tracker = RestartTracker(RestartPolicy(backoff_s=0.5))  # long enough to observe
    real = server.llm.step
    armed = {"fire": False}

    def step():
        if armed["fire"]:
            armed["fire"] = False
            raise Fatal("injected fatal error")
        time.sleep(0.002)
        return real()

    server.llm.step = step
    body = {"prompt": "supervised", "max_new_tokens": 30, "ignore_eos": True}
    async with server.client() as client:
        expected = (await post(client, **body)).json()["token_ids"]

        async def fire_when_running():
            assert await asyncio.to_thread(wait_for, lambda: server.engine.num_running == 2)
            armed["fire"] = True

        plain, streamed, _ = await asyncio.gather(post(client, **body), client.post("/generate", json={
            **body, "stream": True}), fire_when_running())
        assert_error(plain, 503, "engine_restarted")
        assert plain.headers["retry-after"] == "1"
        events = parse_sse(streamed.text)
        assert events[-2]["error"]["code"] == "engine_restarted" and events[-1] == "[DONE]"
        # while the supervisor backs off: 503 engine_restarting everywhere
        assert server.engine.state is EngineState.RESTARTING
        assert_error(await client.get("/health"), 503, "engine_restarting")
        assert_error(await client.get("/ready"), 503, "engine_restarting")
        assert_error(await post(client, **body), 503, "engine_restarting")
        assert await asyncio.to_thread(wait_for, lambda: server.engine.running, 5.0)
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/ready")).status_code == 200
        # healed without a process restart: same model, same answer
        assert (await post(client, **body)).json()["token_ids"] == expected
        metrics = (await client.get("/metrics")).text
    assert "peftserve_engine_restarts_total 1.0" in metrics
    assert counter(server.metrics, "peftserve_engine_restarts_total") == 1
    assert server.wait_idle()


# -- property-based: the whole /generate schema -------------------------------------------------------
JUNK = st.one_of(st.none(), st.booleans(), st.text(max_size=5), st.lists(st.integers(), max_size=2),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(0.0, 2.0),
    st.sampled_from([0.0, -0.0, 5e-324, 1e-300, 1e-46, 1e-40, 1e-6, 1e-5, 1.0000001e-5, 1.0, 1.0000001, 100.0,
                     100.00001, 3.4e38, 1e308, -1e-300, 2**53 + 1]),
    st.integers(-3, 3),
)
INTS = st.one_of(st.integers(-3, 70), st.sampled_from([2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64, -2**63, 10**30]),
                 st.floats(0, 10))
TEXT = st.text(st.characters(codec="utf-8"), max_size=30)
MESSAGE = st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["user", "system", "assistant"]), TEXT)},
                                optional={"content": st.one_of(TEXT, JUNK), "name": TEXT})
FIELDS = {
    "prompt": st.one_of(TEXT, JUNK),
    "messages": st.one_of(st.lists(MESSAGE, max_size=3), JUNK),
    "input_ids": st.one_of(st.lists(st.one_of(st.integers(0, 49151), INTS), max_size=8), JUNK),
    "adapter": st.one_of(TEXT, st.lists(st.fixed_dictionaries({"name": TEXT}, optional={"weight": FLOATS}),
                                        max_size=2), JUNK),
    "max_new_tokens": st.one_of(st.integers(1, 4), INTS, JUNK),
    "temperature": st.one_of(FLOATS, JUNK),
    "top_p": st.one_of(FLOATS, JUNK),
    "top_k": st.one_of(INTS, JUNK),
    "seed": st.one_of(INTS, JUNK),
    "stop": st.one_of(st.lists(TEXT, max_size=3), JUNK),
    "ignore_eos": st.one_of(st.booleans(), JUNK),
    "stream": st.one_of(st.booleans(), JUNK),
    "bogus": JUNK,
}
VALID = {  # in range: with a prompt these reach the engine (float extremes included)
    "max_new_tokens": st.integers(1, 4),
    "temperature": st.one_of(st.floats(0.0, 100.0), st.sampled_from([5e-324, 1e-300, 1e-40, 1e-5, 100.0])),
    "top_p": st.one_of(st.floats(0.0, 1.0, exclude_min=True), st.sampled_from([5e-324, 1e-300, 1e-46, 1.0])),
    "top_k": st.one_of(st.integers(0, 60000), st.just(2**31 - 1)),
    "seed": st.integers(0, 2**63 - 1),
    "stop": st.lists(st.text(min_size=1, max_size=8), max_size=3),
    "ignore_eos": st.booleans(),
    "stream": st.booleans(),
}
ANY_FIELD = st.sampled_from(sorted(FIELDS)).flatmap(lambda k: FIELDS[k].map(lambda v: (k, v)))


def _body(valid: dict, others: list) -> dict:
    return {**valid, **dict(others)}


# a valid request with 0-2 fields replaced by anything (valid or not), or no prompt at all
BODIES = st.builds(_body, st.fixed_dictionaries({"prompt": st.one_of(st.just("hi"), TEXT)}, optional=VALID),
                   st.lists(ANY_FIELD, max_size=2)) | st.builds(_body, st.fixed_dictionaries({}, optional=VALID),
                                                                 st.lists(ANY_FIELD, max_size=3))


def test_property_every_generate_body_is_answered_without_5xx(make_server):
    """Property: whatever body a client sends to /generate (valid or not, per field), the answer
    is 200, or a 4xx with a JSON error body and a code; never a 5xx; the engine stays up."""
    from fastapi.testclient import TestClient

    server = make_server(max_model_len=64)
    client = TestClient(server.app)
    seen: dict[int, int] = {}

    @settings(max_examples=250, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(body=BODIES)
    def check(body):
        raw = json.dumps(body, allow_nan=True).encode()  # NaN/Infinity: invalid JSON, must be 422 too
        resp = client.post("/generate", content=raw, headers=JSON)
        seen[resp.status_code] = seen.get(resp.status_code, 0) + 1
        assert resp.status_code < 500, (body, resp.text)
        if resp.status_code >= 400:
            err = resp.json()["error"]
            assert isinstance(err["code"], str) and err["code"] and isinstance(err["message"], str)
        elif body.get("stream") is True:
            events = parse_sse(resp.text)
            assert events[-1] == "[DONE]" and "error" not in events[-2]
        else:
            out = resp.json()
            assert out["finish_reason"] in ("length", "stop", "eos")
            assert len(out["token_ids"]) <= body.get("max_new_tokens", 64)

    check()
    assert seen.get(200, 0) >= 10 and seen.get(422, 0) >= 10, seen  # both sides of the schema explored
    assert client.get("/health").status_code == 200 and server.engine.restarts == 0
    assert server.wait_idle()
