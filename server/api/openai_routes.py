"""OpenAI-compatible routes: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`.

Same discipline as `POST /generate` (generate.py): every client error (media type, JSON, the
parameter screen, model lookup, tokenisation, context length, queue admission) is answered
before the first response byte; after that, non-streaming responses race the result against a
disconnect listener and streaming responses cancel their requests when the client goes away.

Models: the base model is served under `--served-model-name` (default: the model directory's
name; every alias is accepted), and every registered adapter, of any kind, under its name.
`adapter_id` (LoRAX) or `adapter` (a name or a weighted LoRA combination, as in /generate)
select an adapter too; `model` must then be the base id or that same adapter.

`n` choices are `n` engine requests sharing the batch; choice j of a seeded request uses
seed + j (choice 0 reproduces `/generate` with the same seed). A batch of prompts in
/v1/completions gives choices ordered prompt-major: index = prompt_index * n + j.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from ..engine.async_engine import EngineDeadError, QueueFullError
from ..engine.request import FinishReason, SamplingParams
from ..errors import AdapterNotFound, ContextLengthExceeded, Draining, QueueFull, UnsupportedMediaType
from ..state import ServerState, get_state
from .auth import require_api_key
from ..engine.sampling_params import SamplingParamError
from .generate import (CLIENT_CLOSED, _failure, _ids_from, _json_str, _sse, _tokenizer_lock, _wait_disconnect,
                       is_json_content_type, stream_until_disconnect, tokenize_texts_inline, unavailable)
from .openai_errors import ParamError, invalid, model_not_found
from .openai_schemas import ChatRequest, CompletionRequest, SamplingFields, parse_chat, parse_completion
from .output import SequenceOutput

log = logging.getLogger("peftserve.server.api.openai")
router = APIRouter(dependencies=[Depends(require_api_key)])
_STARTED = int(time.time())


# -- models ---------------------------------------------------------------------------------------
def served_names(state: ServerState) -> tuple[str, ...]:
    """The base model's ids: `--served-model-name` (first = the one listed), else the model name."""
    return tuple(getattr(state.settings, "served_model_names", ()) or ()) or (state.model_name,)


def _base_card(state: ServerState) -> dict:
    base = served_names(state)[0]
    return {"id": base, "object": "model", "created": _STARTED, "owned_by": "peftserve", "root": base,
            "parent": None, "max_model_len": state.max_model_len, "peftserve": {"kind": "base"}}


def _adapter_card(state: ServerState, ver) -> dict:
    return {"id": ver.name, "object": "model", "created": int(ver.created), "owned_by": "peftserve",
            "root": ver.name, "parent": served_names(state)[0], "max_model_len": state.max_model_len,
            "peftserve": {"kind": ver.kind.value, "version": ver.version}}


@router.get("/v1/models", summary="OpenAI: list the base model and every adapter")
async def list_models(request: Request):
    state = get_state(request)
    adapters = state.registry.list() if state.registry is not None else []
    base = set(served_names(state))
    return {"object": "list",
            "data": [_base_card(state)] + [_adapter_card(state, v) for v in adapters if v.name not in base]}


@router.get("/v1/models/{model_id:path}", summary="OpenAI: one model")
async def get_model(model_id: str, request: Request):
    state = get_state(request)
    if model_id in served_names(state):
        return _base_card(state)
    if state.registry is not None:
        try:
            return _adapter_card(state, state.registry.get(model_id))
        except AdapterNotFound:
            pass
    raise model_not_found(model_id)


# -- shared request plumbing ------------------------------------------------------------------------
def adapter_selector(state: ServerState, req: SamplingFields):
    """The adapter selector of the request (None = base) -> (selector, the `model` to answer with)."""
    bases = served_names(state)
    explicit = req.adapter if req.adapter is not None else req.adapter_id
    if explicit is not None:
        selector = explicit if isinstance(explicit, str) else [a.model_dump() for a in explicit]
        if req.model is not None and req.model not in bases and req.model != explicit:
            param = "adapter" if req.adapter is not None else "adapter_id"
            raise invalid(param, f"{param} selects an adapter: model must be the base model id or the same adapter",
                          400)
        return selector, req.model or (explicit if isinstance(explicit, str) else bases[0])
    if req.model is None or req.model in bases:
        return None, req.model or bases[0]
    return req.model, req.model


async def resolve_adapter(state: ServerState, req: SamplingFields):
    selector, model = adapter_selector(state, req)
    if selector is None:
        return None, model
    name = selector if isinstance(selector, str) else None
    if state.registry is None:
        raise model_not_found(name or model)
    try:
        return await run_in_threadpool(state.registry.resolve, selector), model
    except AdapterNotFound as exc:
        if name is not None and name == req.model:  # `model` names nothing we serve
            raise model_not_found(name) from None
        raise ParamError(exc.code, exc.message, exc.status, "adapter" if req.adapter is not None else
                         "adapter_id") from None


async def read_body(state: ServerState, request: Request) -> bytes | None:
    if state.draining:
        raise Draining()
    if not is_json_content_type(request.headers.get("content-type")):
        raise UnsupportedMediaType("Content-Type must be application/json")
    try:
        return await request.body()
    except ClientDisconnect:
        return None


def check_engine(state: ServerState) -> None:
    if not state.engine.running:
        raise unavailable(state.engine)  # the internal reason is logged, never sent


def sampling_params(req: SamplingFields, max_new: int, logprobs: int | None, choice: int) -> SamplingParams:
    """OpenAI defaults: temperature 1, top_p 1; vLLM's top_k -1 = disabled. Seed of choice j: seed + j."""
    seed = None if req.seed is None else (req.seed + choice) % (2**63)
    try:
        return _engine_params(req, max_new, logprobs, seed)
    except SamplingParamError as exc:  # the engine's own rules (server/engine/sampling_params.py)
        raise invalid(exc.field, str(exc)) from None


def _engine_params(req: SamplingFields, max_new: int, logprobs: int | None, seed: int | None) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=max_new, temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, top_k=max(req.top_k or 0, 0), seed=seed, stop=req.stops,
        ignore_eos=bool(req.ignore_eos), presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        min_tokens=req.min_tokens or 0, logprobs=logprobs)


def check_context(state: ServerState, prompt_len: int, prefix: int, max_new: int | None, param: str) -> int:
    """-> max new tokens (default: what is left of the context); 422 when it does not fit."""
    limit = state.max_model_len
    room = limit - prompt_len - prefix
    if max_new is None:
        if room < 1:
            raise ContextLengthExceeded(f"prompt ({prompt_len} tokens) leaves no room in max_model_len ({limit})")
        return room
    if max_new > room:
        extra = f" + {prefix} virtual tokens" if prefix else ""
        raise ContextLengthExceeded(f"prompt ({prompt_len} tokens){extra} + {param} ({max_new}) exceeds "
                                    f"max_model_len ({limit})")
    return max_new


def submit_all(state: ServerState, jobs: list[tuple[list[int], SamplingParams]], handle) -> list:
    """Submit every choice, or none: a refusal cancels the ones already queued."""
    if state.draining:
        raise Draining()
    streams = []
    try:
        for ids, params in jobs:
            streams.append(state.engine.submit(ids, params, adapter=handle))
    except (QueueFullError, EngineDeadError) as exc:
        for s in streams:
            s.cancel()
        if isinstance(exc, QueueFullError):
            raise QueueFull() from None
        raise unavailable(state.engine) from None
    return streams


def finish_reason(reason: FinishReason | None) -> str | None:
    if reason is None:
        return None
    return "length" if reason is FinishReason.LENGTH else "stop"


class TokenText:
    """Token id -> its text (for logprobs), decoded one token at a time, cached per request."""

    def __init__(self, tokenizer):
        self.tok, self.cache = tokenizer, {}

    def __call__(self, token_id: int) -> str:
        if token_id not in self.cache:
            self.cache[token_id] = self.tok.decode([token_id], skip_special_tokens=False,
                                                   clean_up_tokenization_spaces=False)
        return self.cache[token_id]


class Job:
    """Everything one /v1 request needs after validation (shared by both routes)."""

    def __init__(self, state: ServerState, kind: str, model: str, req: SamplingFields, choices: list[SequenceOutput],
                 streams: list, handle, echo: list[str] | None = None):
        self.state, self.kind, self.model, self.req = state, kind, model, req
        self.choices, self.streams, self.handle, self.echo = choices, streams, handle, echo
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.text_of = TokenText(state.tokenizer)
        self.prompt_tokens = 0
        self.started = time.monotonic()

    def usage(self) -> dict:
        completion = sum(len(c.token_ids) for c in self.choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def failure(self):
        """The error to answer with: a choice that failed by itself before ones aborted because of it."""
        failed = sorted((c for c in self.choices if c.failed), key=lambda c: c.reason is FinishReason.ABORT)
        return _failure(self.state, failed[0].reason, failed[0].code) if failed else None

    def cancel(self) -> None:
        for s in self.streams:
            if not s.finished:
                s.cancel()

    def log_done(self, outcome: str) -> None:
        log.info("openai request finished", extra={
            "request_id": self.id, "route": self.kind, "outcome": outcome, "model": self.model,
            "stream": bool(self.req.stream), "choices": len(self.choices), "user": self.req.user, **self.usage(),
            "duration_ms": round((time.monotonic() - self.started) * 1000, 1)})

    # -- logprobs in both OpenAI formats
    def completion_logprobs(self, entries: list, offset: int) -> dict:
        tokens, lps, tops, offsets = [], [], [], []
        for tok, lp, top in entries:
            text = self.text_of(tok)
            tokens.append(text)
            lps.append(lp)
            tops.append({self.text_of(t): v for t, v in top})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def chat_logprobs(self, entries: list) -> dict:
        def item(t, v):
            s = self.text_of(t)
            return {"token": s, "logprob": v, "bytes": list(s.encode("utf-8"))}

        return {"content": [{**item(tok, lp), "top_logprobs": [item(t, v) for t, v in top]}
                            for tok, lp, top in entries]}

    # -- bodies
    def body(self) -> dict:
        choices = []
        for c in self.choices:
            if self.kind == "chat":
                choices.append({"index": c.index, "message": {"role": "assistant", "content": c.text},
                                "logprobs": self.chat_logprobs(c.logprobs) if self.req.logprobs else None,
                                "finish_reason": finish_reason(c.reason)})
            else:
                prefix = self.echo[c.index // self.req.n] if self.echo else ""
                choices.append({"index": c.index, "text": prefix + c.text,
                                "logprobs": (self.completion_logprobs(c.logprobs, len(prefix))
                                             if self.req.logprobs is not None else None),
                                "finish_reason": finish_reason(c.reason)})
        return {"id": self.id, "object": "chat.completion" if self.kind == "chat" else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self.usage(),
                "system_fingerprint": None}

    def chunk(self, choices: list[dict], usage: dict | None = None, with_usage_key: bool = False) -> dict:
        out = {"id": self.id, "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
               "created": self.created, "model": self.model, "choices": choices, "system_fingerprint": None}
        if with_usage_key or usage is not None:
            out["usage"] = usage
        return out


# -- responses ------------------------------------------------------------------------------------------
async def respond(request: Request, job: Job) -> Response:
    """Non-streaming: all choices, raced against the client going away."""

    async def collect(choice: SequenceOutput, stream) -> None:
        async for ev in stream:
            choice.add(ev)
        if choice.failed:  # the response fails as a whole: stop the other choices now
            job.cancel()

    collector = asyncio.ensure_future(asyncio.gather(*(collect(c, s) for c, s in zip(job.choices, job.streams))))
    listener = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        done, _ = await asyncio.wait({collector, listener}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (collector, listener):
            task.cancel()
        await asyncio.gather(collector, listener, return_exceptions=True)
        job.cancel()
    if collector in done and not collector.cancelled() and collector.exception() is not None:
        raise collector.exception()
    headers = {"X-Request-ID": job.id}
    if any(c.reason is None for c in job.choices):
        job.log_done("client_disconnected")
        return Response(status_code=CLIENT_CLOSED, headers=headers)
    err = job.failure()
    if err is not None:
        job.log_done("error")
        err.headers = {**(err.headers or {}), **headers}
        raise err
    job.log_done("ok")
    return JSONResponse(job.body(), headers=headers)


class OpenAIStreamResponse(Response):
    """SSE in OpenAI's chunk format; cancels every choice when the client goes away.

    Chat: per choice a role chunk first, then content chunks, then a chunk with `finish_reason`;
    completions: text chunks, then the `finish_reason` chunk. Then the usage chunk (empty
    `choices`) when `stream_options.include_usage`, then `data: [DONE]`. A failure after the
    response started is sent as one OpenAI error object before `[DONE]`.
    """

    media_type = "text/event-stream"

    def __init__(self, job: Job):
        super().__init__(content=None, status_code=200, media_type=self.media_type, headers={
            "Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Request-ID": job.id})
        self.job = job
        self.outcome = "client_disconnected"
        self._frame: str | None = None  # _text_chunk's template, built on first use

    def init_headers(self, headers=None) -> None:  # no content-length: the body streams
        super().init_headers(headers)
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]

    def _text_chunk(self, index: int, text: str) -> bytes:
        """`_sse(job.chunk([<a text chunk without logprobs>]))`, byte for byte, from a template."""
        if self._frame is None:
            job = self.job
            head = '{"id":%s,"object":%s,"created":%d,"model":%s,"choices":[' % (
                _json_str(job.id), _json_str("chat.completion.chunk" if job.kind == "chat" else "text_completion"),
                job.created, _json_str(job.model))
            head = head.replace("%", "%%")  # ids and names are data, not format directives
            tail = '],"system_fingerprint":null' + (',"usage":null' if job.req.include_usage else "") + "}"
            body = '{"index":%d,"delta":{"content":%s},' if job.kind == "chat" else '{"index":%d,"text":%s,'
            self._frame = "data: " + head + body + '"logprobs":null,"finish_reason":null}' + tail + "\n\n"
        return (self._frame % (index, _json_str(text))).encode()

    def _event_bytes(self, choice: SequenceOutput, ev, offset: int) -> list[bytes]:
        req = self.job.req
        wants_logprobs = bool(req.logprobs) if self.job.kind == "chat" else req.logprobs is not None
        if ev.text and ev.finish_reason is None and not wants_logprobs:
            return [self._text_chunk(choice.index, ev.text)]  # the common case: one plain text chunk
        return [_sse(chunk) for chunk in self._event_chunks(choice, ev, offset)]

    def _event_chunks(self, choice: SequenceOutput, ev, offset: int) -> list[dict]:
        job = self.job
        usage_key = job.req.include_usage
        chunks = []
        entry = [] if ev.logprobs is None or ev.token_id is None or choice.failed else \
            [(ev.token_id, ev.logprobs[0], ev.logprobs[1])]
        if ev.text or entry:
            if job.kind == "chat":
                c = {"index": choice.index, "delta": {"content": ev.text},
                     "logprobs": job.chat_logprobs(entry) if job.req.logprobs else None, "finish_reason": None}
            else:
                c = {"index": choice.index, "text": ev.text,
                     "logprobs": job.completion_logprobs(entry, offset) if job.req.logprobs is not None else None,
                     "finish_reason": None}
            chunks.append(job.chunk([c], with_usage_key=usage_key))
        if ev.finish_reason is not None and not choice.failed:
            c = {"index": choice.index, "logprobs": None, "finish_reason": finish_reason(ev.finish_reason)}
            c.update({"delta": {}} if job.kind == "chat" else {"text": ""})
            chunks.append(job.chunk([c], with_usage_key=usage_key))
        return chunks

    async def _produce(self, send) -> None:
        job = self.job
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})

        async def body(obj) -> None:
            await send({"type": "http.response.body", "body": _sse(obj), "more_body": True})

        offsets = {}
        for c in job.choices:
            if job.kind == "chat":
                await body(job.chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                       "logprobs": None, "finish_reason": None}], with_usage_key=job.req.include_usage))
            elif job.echo:
                prefix = job.echo[c.index // job.req.n]
                await body(job.chunk([{"index": c.index, "text": prefix, "logprobs": None, "finish_reason": None}],
                                     with_usage_key=job.req.include_usage))
            offsets[c.index] = len(job.echo[c.index // job.req.n]) if job.echo else 0
        out: list[bytes] = []  # events not written yet: what is already queued goes out in one write

        def take(choice: SequenceOutput, ev) -> None:
            choice.add(ev)
            out.extend(self._event_bytes(choice, ev, offsets[choice.index]))
            if ev.text:
                offsets[choice.index] += len(ev.text)

        async def flush() -> None:
            if out:
                body_bytes = b"".join(out)
                out.clear()
                await send({"type": "http.response.body", "body": body_bytes, "more_body": True})

        if len(job.choices) == 1:  # no pump task: the stream's own batches
            choice, stream = job.choices[0], job.streams[0]
            async for batch in stream.batches():
                for ev in batch:
                    take(choice, ev)
                if not stream.finished:
                    await flush()
        else:
            await self._merge(job, take, flush)
        err = job.failure()
        tail = b""
        if err is not None:
            job.cancel()
            tail = _sse({"error": {"message": err.message, "type": "server_error", "param": None, "code": err.code}})
            self.outcome = "error"
        else:
            if job.req.include_usage:
                tail = _sse(job.chunk([], usage=job.usage()))
            self.outcome = "ok"
        await send({"type": "http.response.body", "body": b"".join(out) + tail + b"data: [DONE]\n\n",
                    "more_body": False})

    @staticmethod
    async def _merge(job: Job, take, flush) -> None:
        """n > 1 choices: one pump per stream into a shared queue; stops at the first failed choice."""
        events: asyncio.Queue = asyncio.Queue()

        async def pump(choice: SequenceOutput, stream) -> None:
            async for batch in stream.batches():
                events.put_nowait((choice, batch))

        pumps = [asyncio.ensure_future(pump(c, s)) for c, s in zip(job.choices, job.streams)]
        try:
            remaining = len(job.choices)
            while remaining:
                items = [await events.get()]
                while not events.empty():
                    items.append(events.get_nowait())
                for choice, batch in items:
                    for ev in batch:
                        take(choice, ev)
                        if ev.finish_reason is not None:
                            remaining -= 1
                            if choice.failed:
                                return
                if remaining:
                    await flush()
        finally:
            for p in pumps:
                p.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await stream_until_disconnect(self._produce(send), receive)
        finally:
            self.job.cancel()
            self.job.state.inflight -= 1
            self.job.log_done(self.outcome)


async def run_job(request: Request, job: Job) -> Response:
    job.state.inflight += 1
    if job.req.stream:
        return OpenAIStreamResponse(job)  # owns the in-flight count from here
    try:
        return await respond(request, job)
    finally:
        job.state.inflight -= 1


# -- routes -----------------------------------------------------------------------------------------------
def _tokenize_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    with _tokenizer_lock:
        return [list(tokenizer(p).input_ids) for p in prompts]


def _render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    with _tokenizer_lock:
        try:
            result = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                   tokenize=True)
        except Exception as exc:  # no template, roles the template refuses, ...
            raise invalid("messages", f"messages could not be rendered with the chat template: {exc}") from None
    return _ids_from(result)


def _decode(tokenizer, ids: list[int]) -> str:
    with _tokenizer_lock:
        return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


@router.post("/v1/completions", summary="OpenAI: text completions (JSON or server-sent events)")
async def completions(request: Request) -> Response:
    state = get_state(request)
    body = await read_body(state, request)
    if body is None:
        return Response(status_code=CLIENT_CLOSED)
    req: CompletionRequest = parse_completion(body)
    check_engine(state)
    raw = req.prompts()
    texts = [p for p in raw if isinstance(p, str)]
    if texts and len(texts) != len(raw):  # pydantic's union already refuses mixed lists
        raise invalid("prompt", "prompt: strings and token ids cannot be mixed")
    vocab = state.vocab_size
    for i, p in enumerate(raw):
        if isinstance(p, list):
            bad = next((t for t in p if t >= vocab), None)
            if bad is not None:
                raise invalid("prompt", f"prompt: token id {bad} out of range [0, {vocab})")
    handle, model = await resolve_adapter(state, req)
    if texts:  # short prompts on the loop when the tokenizer is free, else in a worker thread
        ids = tokenize_texts_inline(state.tokenizer, texts)
        if ids is None:
            ids = await run_in_threadpool(_tokenize_prompts, state.tokenizer, texts)
    else:
        ids = [list(p) for p in raw]
    prefix = int(getattr(handle, "num_virtual_tokens", 0) or 0)
    jobs, choices = [], []
    for i, p in enumerate(ids):
        if not p:
            raise invalid("prompt", "prompt: empty after tokenisation")
        max_new = check_context(state, len(p), prefix, 16 if req.max_tokens is None else req.max_tokens,
                                "max_tokens")
        for j in range(req.n):
            jobs.append((p, sampling_params(req, max_new, req.logprobs, j)))
            choices.append(SequenceOutput(i * req.n + j, len(p)))
    echo = None
    if req.echo:
        echo = texts if texts else [await run_in_threadpool(_decode, state.tokenizer, p) for p in ids]
    streams = submit_all(state, jobs, handle)
    job = Job(state, "completion", model, req, choices, streams, handle, echo)
    job.prompt_tokens = sum(len(p) for p in ids)
    return await run_job(request, job)


@router.post("/v1/chat/completions", summary="OpenAI: chat completions (JSON or server-sent events)")
async def chat_completions(request: Request) -> Response:
    state = get_state(request)
    body = await read_body(state, request)
    if body is None:
        return Response(status_code=CLIENT_CLOSED)
    req: ChatRequest = parse_chat(body)
    check_engine(state)
    handle, model = await resolve_adapter(state, req)
    ids = await run_in_threadpool(_render_chat, state.tokenizer, [m.rendered() for m in req.messages],
                                  req.add_generation_prompt)
    if not ids:
        raise invalid("messages", "messages: empty after rendering")
    prefix = int(getattr(handle, "num_virtual_tokens", 0) or 0)
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_new = check_context(state, len(ids), prefix, req.max_new, param)
    jobs = [(ids, sampling_params(req, max_new, req.num_logprobs, j)) for j in range(req.n)]
    streams = submit_all(state, jobs, handle)
    job = Job(state, "chat", model, req, [SequenceOutput(j, len(ids)) for j in range(req.n)], streams, handle)
    job.prompt_tokens = len(ids)
    return await run_job(request, job)
