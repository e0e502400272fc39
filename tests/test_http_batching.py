"""The HTTP path's batching (issue 13, item 3): engine events handed to the event loop in one
go per batch, SSE writes that coalesce the tokens already queued, the byte-identical per-token
event templates and the on-loop tokenisation of short prompts. Behaviour must not change: every
token exactly once, in order, with the same final event and the same bytes per event."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from types import SimpleNamespace

import pytest

from peftserve.server.api.generate import _sse, _sse_token, _tokenizer_lock, tokenize_inline, tokenize_texts_inline
from peftserve.server.engine.async_engine import RequestStream, _Gate, _Mailbox
from peftserve.server.engine.request import FinishReason, TokenEvent

pytestmark = pytest.mark.anyio

TEXTS = ["", "a", " hé\"\\ \n\t\x00\x7f\u2028 😀 日本語", "\x1f\x08\x0c</script>", "'%s %d'"]


def parse_sse(raw: bytes) -> list:
    out = []
    for block in raw.decode().split("\n\n"):
        if block:
            assert block.startswith("data: "), block
            data = block[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# -- engine thread -> event loop --------------------------------------------------------------------
def test_mailbox_hands_over_a_thread_s_events_in_order_exactly_once_in_few_wakeups():
    async def main():
        loop = asyncio.get_running_loop()
        box = _Mailbox(loop)
        queues = [asyncio.Queue() for _ in range(4)]
        handovers = 0
        real = box._hand_over

        def counting():
            nonlocal handovers
            handovers += 1
            real()

        box._hand_over = counting

        def engine_thread():  # 4 requests x 200 steps, posted while the loop sleeps
            for step in range(200):
                for q in queues:
                    box.post(q, TokenEvent(step, str(step)))

        t = threading.Thread(target=engine_thread)
        t.start()
        t.join()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        got = [[q.get_nowait().token_id for _ in range(q.qsize())] for q in queues]
        assert got == [list(range(200))] * 4
        assert handovers == 1  # everything posted before the loop ran: one wake-up

    asyncio.run(main())


def test_a_held_gate_delays_the_hand_over_until_release():
    async def main():
        loop = asyncio.get_running_loop()
        gate = _Gate()
        box = _Mailbox(loop, gate)
        q = asyncio.Queue()
        gate.hold()
        threading.Thread(target=lambda: [box.post(q, TokenEvent(i, "")) for i in range(3)]).start()
        for _ in range(20):
            await asyncio.sleep(0.001)
        assert q.empty()  # held: nothing handed over while the step "runs"
        gate.release()
        await asyncio.sleep(0)
        assert [q.get_nowait().token_id for _ in range(q.qsize())] == [0, 1, 2]
        box.post(q, TokenEvent(3, ""))  # released: the next batch goes at once
        await asyncio.sleep(0)
        assert q.get_nowait().token_id == 3

    asyncio.run(main())


def test_an_event_of_a_held_step_never_rides_an_earlier_hand_over():
    """The last step's hand-over is scheduled at its release but has not run yet when the next
    step (gate held again) posts: that event waits for the next release, it does not join the
    batch already on its way (it did: the consumer then saw its request end before the snapshot
    that no longer counts it)."""
    async def main():
        loop = asyncio.get_running_loop()
        gate = _Gate()
        box = _Mailbox(loop, gate)
        q = asyncio.Queue()
        box.post(q, TokenEvent(0, ""))  # not held: a hand-over is scheduled, not yet run
        gate.hold()
        box.post(q, TokenEvent(1, ""))  # the next step's event
        for _ in range(5):
            await asyncio.sleep(0)
        assert [q.get_nowait().token_id for _ in range(q.qsize())] == [0]
        gate.release()
        await asyncio.sleep(0)
        assert [q.get_nowait().token_id for _ in range(q.qsize())] == [1]

    asyncio.run(main())


def test_a_finished_request_is_never_counted_by_the_snapshot_it_can_read(tiny_model):
    """The consumer that receives a request's final event reads num_running / the KV usage
    after it: the step's events wait for its snapshot, so neither still counts that request
    (without the gate this read raced the engine thread's publish: ~1 in 7 runs failed)."""
    from peftserve.server.engine.async_engine import AsyncEngine
    from peftserve.server.engine.config import EngineConfig
    from peftserve.server.engine.engine import LLMEngine
    from peftserve.server.engine.request import SamplingParams
    from tests.test_lora_parity import StubTokenizer

    async def main():
        engine = AsyncEngine(LLMEngine(tiny_model(), StubTokenizer(), EngineConfig(max_batch_size=8, max_model_len=64)))
        engine.start()
        try:
            for round_ in range(15):
                async def one(i):
                    stream = engine.submit([5 + i] * (2 + i), SamplingParams(max_new_tokens=3, ignore_eos=True))
                    async for ev in stream:
                        if ev.finish_reason is not None:
                            return
                await asyncio.gather(*(one(i) for i in range(3)))
                assert engine.num_running == 0, round_
                assert engine.snapshot.kv_blocks_free == engine.snapshot.kv_blocks_total, round_
        finally:
            engine.stop()

    asyncio.run(main())


def test_mailbox_on_a_closed_loop_raises_every_time():
    loop = asyncio.new_event_loop()
    box = _Mailbox(loop)
    loop.close()
    for _ in range(2):
        with pytest.raises(RuntimeError):
            box.post(asyncio.Queue(), TokenEvent(1, "x"))


class _FakeEngine:
    def __init__(self):
        self.aborted, self.forgotten = [], []

    def _forget(self, seq):
        self.forgotten.append(seq)

    def abort(self, seq):
        self.aborted.append(seq)


def _stream(events: list[TokenEvent]) -> tuple[RequestStream, _FakeEngine]:
    q = asyncio.Queue()
    for ev in events:
        q.put_nowait(ev)
    eng = _FakeEngine()
    return RequestStream(eng, SimpleNamespace(cancelled=False), q), eng


def _tokens(n: int, final=FinishReason.LENGTH) -> list[TokenEvent]:
    evs = [TokenEvent(100 + i, f"t{i} ") for i in range(n - 1)]
    return evs + [TokenEvent(100 + n - 1, f"t{n - 1}", finish_reason=final)]


async def test_batches_group_what_is_queued_and_end_with_the_final_event():
    stream, eng = _stream(_tokens(5))
    batches = [b async for b in stream.batches()]
    assert [[e.token_id for e in b] for b in batches] == [[100, 101, 102, 103, 104]]
    assert stream.finished and eng.forgotten and not eng.aborted


async def test_batches_deliver_late_events_in_later_batches_in_order():
    stream, _ = _stream(_tokens(3)[:1])
    seen = []

    async def feed():
        await asyncio.sleep(0.01)
        for ev in _tokens(3)[1:]:
            stream.events.put_nowait(ev)

    feeder = asyncio.ensure_future(feed())
    async for b in stream.batches():
        seen.append([e.token_id for e in b])
    await feeder
    assert seen == [[100], [101, 102]]


async def test_leaving_batches_early_cancels_the_request():
    stream, eng = _stream(_tokens(3)[:2])
    gen = stream.batches()
    await gen.__anext__()
    await gen.aclose()
    assert eng.aborted and not stream.finished


# -- byte-identical event templates ------------------------------------------------------------------
@pytest.mark.parametrize("text", TEXTS)
def test_generate_token_event_template_is_byte_identical(text):
    for tid in (0, 7, 49151):
        assert _sse_token(tid, text) == _sse({"token_id": tid, "text": text})


@pytest.mark.parametrize("kind", ["chat", "completion"])
@pytest.mark.parametrize("usage", [False, True])
def test_openai_text_chunk_template_is_byte_identical(kind, usage):
    from peftserve.server.api.openai_routes import Job, OpenAIStreamResponse
    from peftserve.server.api.openai_schemas import parse_chat, parse_completion

    body = {"stream": True, **({"stream_options": {"include_usage": True}} if usage else {})}
    if kind == "chat":
        req = parse_chat(json.dumps({"model": "m\"é", "messages": [{"role": "user", "content": "x"}], **body}).encode())
    else:
        req = parse_completion(json.dumps({"model": "m\"é", "prompt": "x", **body}).encode())
    job = Job(SimpleNamespace(tokenizer=None), kind, "m\"é/日本 %s %d %%", req, [], [], None)
    resp = OpenAIStreamResponse(job)
    for i, text in enumerate(TEXTS[1:]):
        c = ({"index": i, "delta": {"content": text}, "logprobs": None, "finish_reason": None} if kind == "chat"
             else {"index": i, "text": text, "logprobs": None, "finish_reason": None})
        assert resp._text_chunk(i, text) == _sse(job.chunk([c], with_usage_key=req.include_usage))


# -- coalesced SSE writes ------------------------------------------------------------------------------
async def test_generate_sse_coalesces_queued_tokens_into_one_write_and_keeps_the_bytes():
    from peftserve.server.api.generate import SSEResponse, parse_request

    events = _tokens(6)
    stream, _ = _stream(events)
    req = parse_request(json.dumps({"input_ids": [1, 2], "max_new_tokens": 6, "stream": True}).encode())
    state = SimpleNamespace(inflight=1, engine=SimpleNamespace(running=True))
    resp = SSEResponse(state, stream, req, {"request_id": "r", "seq": 1, "prompt_tokens": 2, "stream": True,
                                            "adapter": None, "started": time.monotonic()})
    sent = []

    async def send(msg):
        sent.append(msg)

    await resp._produce(send)
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    assert len(bodies) == 1 and bodies[0]["more_body"] is False  # all 6 tokens were queued: one write
    expected = b"".join(_sse({"token_id": e.token_id, "text": e.text}) for e in events)
    final = {"text": "".join(e.text for e in events), "token_ids": [e.token_id for e in events],
             "finish_reason": "length", "adapter": None,
             "usage": {"prompt_tokens": 2, "completion_tokens": 6}}
    assert bodies[0]["body"] == expected + _sse(final) + b"data: [DONE]\n\n"


async def test_streams_through_the_app_deliver_every_token_once_in_order_when_the_loop_falls_behind(make_server):
    """The loop is blocked while the engine runs ahead: fewer writes than tokens, same events."""
    server = make_server(seed=0)
    sends: list[list[bytes]] = []
    app = server.app

    async def recording(scope, receive, send):
        bodies: list[bytes] = []
        if scope["type"] == "http":
            sends.append(bodies)

        async def rec(msg):
            if msg["type"] == "http.response.body" and msg.get("body"):
                if not bodies:
                    time.sleep(0.3)  # block the loop: the engine thread keeps producing tokens
                bodies.append(msg["body"])
            await send(msg)

        await app(scope, receive, rec)

    import httpx

    n = 24
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=recording), base_url="http://t") as client:
        plain = (await client.post("/generate", json={"prompt": "Hello there", "max_new_tokens": n,
                                                      "ignore_eos": True})).json()
        gen = await client.post("/generate", json={"prompt": "Hello there", "max_new_tokens": n,
                                                   "ignore_eos": True, "stream": True})
        comp = await client.post("/v1/completions", json={"prompt": "Hello there", "max_tokens": n,
                                                          "ignore_eos": True, "stream": True, "temperature": 0})
    ev = parse_sse(gen.content)
    assert ev[-1] == "[DONE]" and [e["token_id"] for e in ev[:-2]] == plain["token_ids"]
    assert "".join(e["text"] for e in ev[:-2]) == plain["text"] == ev[-2]["text"]
    assert ev[-2]["token_ids"] == plain["token_ids"] and ev[-2]["finish_reason"] == "length"
    gen_writes = sends[1]
    assert len(gen_writes) < n + 1  # coalesced: some writes carried several tokens
    assert b"".join(gen_writes) == gen.content

    ch = parse_sse(comp.content)
    assert ch[-1] == "[DONE]" and ch[-2]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["text"] for c in ch[:-1]) == plain["text"]
    assert len(sends[2]) < n + 1


# -- tokenisation on the loop --------------------------------------------------------------------------
def test_inline_tokenisation_only_for_short_prompts_with_a_free_tokenizer(smollm_tokenizer):
    req = SimpleNamespace(prompt="Hello world")
    assert tokenize_inline(smollm_tokenizer, req) == list(smollm_tokenizer("Hello world").input_ids)
    assert tokenize_inline(smollm_tokenizer, SimpleNamespace(prompt="x" * 5000)) is None
    assert tokenize_inline(smollm_tokenizer, SimpleNamespace(prompt=None, messages=[])) is None
    with _tokenizer_lock:  # a worker thread is tokenising: never wait on the loop
        assert tokenize_inline(smollm_tokenizer, req) is None
    assert tokenize_texts_inline(smollm_tokenizer, ["a b", "c"]) == [list(smollm_tokenizer(t).input_ids)
                                                                     for t in ("a b", "c")]
    assert tokenize_texts_inline(smollm_tokenizer, ["x" * 3000, "y" * 3000]) is None  # the total is bounded
