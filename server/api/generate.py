"""`POST /generate`: validate, tokenise, submit to the engine, answer as JSON or SSE.

Everything that can fail because of the client (content type, JSON, schema, adapter lookup,
tokenisation, context length, queue admission) happens before the first response byte, so
every such error is a real 4xx/5xx status, streaming or not. After that:

- non-streaming: the result is awaited concurrently with a listener on ASGI `receive()`; if the
  client disconnects first, the request is cancelled in the engine (its KV slot is freed within
  one step) and a 499 is recorded;
- streaming: `SSEResponse` runs the token pump and the disconnect listener side by side and
  cancels the request as soon as the client goes away (or a send fails).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import Mapping

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from ..engine.async_engine import EngineDeadError, QueueFullError, RequestStream
from ..engine.request import FinishReason, SamplingParams
from ..engine.sampling_params import SamplingParamError
from ..errors import (AdapterNotFound, ApiError, ContextLengthExceeded, Draining, EngineRestarting,
                      EngineUnavailable, InvalidRequest, QueueFull, RequestAborted, UnsupportedMediaType,
                      engine_failure)
from ..state import ServerState, get_state
from .auth import require_api_key
from .json_body import validate_json
from .output import SequenceOutput
from .schemas import ErrorResponse, GenerateRequest, GenerateResponse

log = logging.getLogger("peftserve.server.api.generate")

CLIENT_CLOSED = 499  # nginx's "client closed request", recorded for disconnected clients

router = APIRouter()

_SCHEMA_PTR = "#/paths/~1generate/post/requestBody/content/application~1json/schema/$defs/{model}"
_OPENAPI_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": GenerateRequest.model_json_schema(ref_template=_SCHEMA_PTR)}},
    }
}
_ERRORS = {code: {"model": ErrorResponse} for code in (401, 403, 404, 413, 415, 422, 429, 500, 503)}
_tokenizer_lock = threading.Lock()  # HF fast tokenizers are not safe for concurrent mutable use


def with_server_limits(schema: dict, state: ServerState) -> dict:
    """The OpenAPI schema with this server's limits on the /generate body (max_model_len and
    the vocabulary are known only at run time): a copy, the app's cached schema is untouched."""
    try:
        body = schema["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    except KeyError:
        return schema
    body = json.loads(json.dumps(body))
    props = body.get("properties", {})
    for option in props.get("max_new_tokens", {}).get("anyOf", [props.get("max_new_tokens", {})]):
        option["maximum"] = state.max_model_len - 1
    for option in props.get("input_ids", {}).get("anyOf", []):
        if option.get("type") == "array":
            option["items"]["maximum"] = state.vocab_size - 1
            option["maxItems"] = state.max_model_len - 1
    schema = {**schema, "paths": {**schema["paths"], "/generate": {"post": {
        **schema["paths"]["/generate"]["post"],
        "requestBody": {**schema["paths"]["/generate"]["post"]["requestBody"],
                        "content": {"application/json": {"schema": body}}}}}}}
    return schema


def is_json_content_type(value: str | None) -> bool:
    if not value:
        return False
    media = value.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def parse_request(body: bytes) -> GenerateRequest:
    return validate_json(GenerateRequest, body)


def sampling_params(req: GenerateRequest) -> SamplingParams:
    """The engine's parameters; the engine-side rules (sampling_params.check) answer 422 too."""
    try:
        return SamplingParams(max_new_tokens=req.max_new_tokens, temperature=req.temperature, top_p=req.top_p,
                              top_k=req.top_k, seed=req.seed, stop=tuple(req.stop or ()),
                              ignore_eos=req.ignore_eos)
    except SamplingParamError as exc:
        raise InvalidRequest(str(exc)) from None


def unavailable(engine) -> ApiError:
    """503 for a request that finds the engine not running (the internal reason is only logged)."""
    if getattr(engine, "restarting", False):
        return EngineRestarting()
    return EngineUnavailable("the engine is not running")


def _ids_from(result) -> list[int]:
    if isinstance(result, Mapping) or hasattr(result, "keys"):
        result = result["input_ids"]
    if hasattr(result, "tolist"):
        result = result.tolist()
    result = list(result)
    if result and isinstance(result[0], (list, tuple)):  # a batch of one
        result = list(result[0])
    return [int(t) for t in result]


def tokenize(tokenizer, req: GenerateRequest) -> list[int]:
    """The prompt's token ids (runs in a worker thread: big prompts must not block the loop)."""
    with _tokenizer_lock:
        if req.prompt is not None:
            return list(tokenizer(req.prompt).input_ids)
        messages = [m.model_dump() for m in req.messages]
        try:
            result = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as exc:  # no template, roles the template refuses, ...
            # the template's own refusal (raise_exception("roles must alternate")) is for the
            # client; anything else is an internal detail: logged, not sent
            log.info("chat template refused the messages", extra={"error": repr(exc)})
            detail = f": {str(exc)[:200]}" if _is_template_error(exc) else ""
            raise InvalidRequest(f"messages could not be rendered with the chat template{detail}") from None
        return _ids_from(result)


def _is_template_error(exc: Exception) -> bool:
    try:
        from jinja2 import TemplateError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, TemplateError)


async def _wait_disconnect(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def stream_until_disconnect(produce, receive) -> None:
    """Run `produce` (a coroutine writing a streamed body) beside a listener on ASGI `receive`;
    whichever ends first cancels the other. A client that goes away (disconnect, or an OSError
    while sending) ends the stream quietly; any other failure of the producer is re-raised."""
    producer = asyncio.ensure_future(produce)
    listener = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        done, _ = await asyncio.wait({producer, listener}, return_when=asyncio.FIRST_COMPLETED)
        if producer in done and not producer.cancelled():
            exc = producer.exception()
            if exc is not None and not isinstance(exc, OSError):  # OSError: the client went away
                raise exc
    finally:
        for task in (producer, listener):
            task.cancel()
        await asyncio.gather(producer, listener, return_exceptions=True)


async def _resolve_adapter(state: ServerState, req: GenerateRequest):
    selector = req.adapter_selector()
    if selector is None:
        return None
    if state.registry is None:
        name = selector if isinstance(selector, str) else selector[0]["name"]
        raise AdapterNotFound(name, f"adapter {name!r} not found (this server has no adapter registry)")
    return await run_in_threadpool(state.registry.resolve, selector)


def _failure(state: ServerState, reason: FinishReason, code) -> ApiError:
    """The client-facing error of a request the engine ended (generic message + stable code)."""
    if reason is FinishReason.ABORT:
        return RequestAborted("request aborted by the server") if state.engine.running else unavailable(state.engine)
    return engine_failure(code)


def _body(result: SequenceOutput, req: GenerateRequest, prompt_tokens: int) -> dict:
    return GenerateResponse(
        text=result.text, token_ids=result.token_ids, finish_reason=result.reason.value, adapter=req.adapter,
        usage={"prompt_tokens": prompt_tokens, "completion_tokens": len(result.token_ids)},
    ).model_dump(mode="json")


@router.post("/generate", dependencies=[Depends(require_api_key)], response_model=None,
             responses={200: {"model": GenerateResponse,
                              "content": {"text/event-stream": {}}}, **_ERRORS},
             openapi_extra=_OPENAPI_BODY, summary="Generate text (JSON or server-sent events)")
async def generate(request: Request) -> Response:
    state = get_state(request)
    if state.draining:
        raise Draining()
    if not is_json_content_type(request.headers.get("content-type")):
        raise UnsupportedMediaType("Content-Type must be application/json")
    try:
        body = await request.body()
    except ClientDisconnect:
        return Response(status_code=CLIENT_CLOSED)
    req = parse_request(body)

    engine = state.engine
    if not engine.running:
        raise unavailable(engine)
    max_len = state.max_model_len
    if req.max_new_tokens > max_len:
        raise InvalidRequest(f"max_new_tokens: must be <= max_model_len ({max_len})")
    if req.input_ids is not None:
        vocab = state.vocab_size
        bad = next((i for i, t in enumerate(req.input_ids) if t >= vocab), None)
        if bad is not None:
            raise InvalidRequest(f"input_ids.{bad}: token id {req.input_ids[bad]} out of range [0, {vocab})")

    handle = await _resolve_adapter(state, req)
    if req.input_ids is not None:
        prompt_ids = list(req.input_ids)
    else:
        prompt_ids = tokenize_inline(state.tokenizer, req)
        if prompt_ids is None:
            prompt_ids = await run_in_threadpool(tokenize, state.tokenizer, req)
    if not prompt_ids:
        raise InvalidRequest("the prompt is empty after tokenisation")
    prefix = int(getattr(handle, "num_virtual_tokens", 0) or 0)  # soft prompt / prefix adapters
    if len(prompt_ids) + prefix + req.max_new_tokens > max_len:
        extra = f" + {prefix} virtual tokens" if prefix else ""
        raise ContextLengthExceeded(
            f"prompt ({len(prompt_ids)} tokens){extra} + max_new_tokens ({req.max_new_tokens}) "
            f"exceeds max_model_len ({max_len})")

    params = sampling_params(req)
    if state.draining:  # SIGTERM may have arrived while we were tokenising
        raise Draining()
    try:
        stream = engine.submit(prompt_ids, params, adapter=handle)
    except QueueFullError:
        raise QueueFull() from None
    except EngineDeadError:
        raise unavailable(engine) from None

    request_id = uuid.uuid4().hex[:16]
    info = {"request_id": request_id, "seq": stream.seq.seq_id, "prompt_tokens": len(prompt_ids), "stream": req.stream,
            "adapter": state.metrics.label_for(handle) if state.metrics else None, "started": time.monotonic()}
    state.inflight += 1
    if req.stream:
        return SSEResponse(state, stream, req, info)  # owns the stream and the in-flight count from here
    try:
        return await _respond(state, request, stream, req, info)
    finally:
        state.inflight -= 1


async def _respond(state: ServerState, request: Request, stream: RequestStream, req: GenerateRequest,
                   info: dict) -> Response:
    result = SequenceOutput()

    async def collect():
        async for ev in stream:
            result.add(ev)

    collector = asyncio.ensure_future(collect())
    listener = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        done, _ = await asyncio.wait({collector, listener}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (collector, listener):
            task.cancel()
        await asyncio.gather(collector, listener, return_exceptions=True)
        if not stream.finished:
            stream.cancel()
    if collector in done and not collector.cancelled() and collector.exception() is not None:
        raise collector.exception()
    headers = {"X-Request-ID": info["request_id"]}
    if result.reason is None:  # the client went away first
        _log_done(info, result, "client_disconnected")
        return Response(status_code=CLIENT_CLOSED, headers=headers)
    _log_done(info, result, result.reason.value)
    if result.failed:
        exc = _failure(state, result.reason, result.code)
        exc.headers = {**(exc.headers or {}), **headers}
        raise exc
    return JSONResponse(_body(result, req, info["prompt_tokens"]), headers=headers)


def _log_done(info: dict, result: SequenceOutput, outcome: str) -> None:
    (log.warning if result.failed else log.info)("generate finished", extra={
        "request_id": info["request_id"], "seq": info["seq"], "outcome": outcome, "stream": info["stream"],
        "adapter": info["adapter"],
        "prompt_tokens": info["prompt_tokens"], "completion_tokens": len(result.token_ids),
        "duration_ms": round((time.monotonic() - info["started"]) * 1000, 1),
        **({"error": result.error} if result.error else {}),
        **({"code": getattr(result.code, "value", result.code)} if result.code else {})})


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


# json.dumps(ensure_ascii=False) encodes a str with this very function (C-accelerated): events
# built from it are byte-for-byte what _sse() gives for the same dict, without the generic walk
_json_str = getattr(json.encoder, "c_encode_basestring", None) or json.encoder.py_encode_basestring


def _sse_token(token_id: int, text: str) -> bytes:
    """`_sse({"token_id": token_id, "text": text})`, the per-token /generate event, fast."""
    return ('data: {"token_id":%d,"text":%s}\n\n' % (token_id, _json_str(text))).encode()


def tokenize_inline(tokenizer, req, limit_chars: int = 4096):
    """Tokenise a short plain prompt right here on the event loop (~0.1 ms: cheaper than the two
    thread hand-overs of a worker thread) when the tokenizer is free; -> None otherwise (chat
    templates, long prompts, tokenizer busy in a worker): the caller uses the thread pool."""
    prompt = getattr(req, "prompt", None)
    if not isinstance(prompt, str):
        return None
    ids = tokenize_texts_inline(tokenizer, [prompt], limit_chars)
    return None if ids is None else ids[0]


def tokenize_texts_inline(tokenizer, texts: list[str], limit_chars: int = 4096):
    """tokenize_inline for a list of prompts (their total length is what is bounded)."""
    if sum(len(t) for t in texts) > limit_chars:
        return None
    if not _tokenizer_lock.acquire(blocking=False):
        return None
    try:
        return [list(tokenizer(t).input_ids) for t in texts]
    finally:
        _tokenizer_lock.release()


class SSEResponse(Response):
    """Server-sent events for one request; cancels the request when the client goes away.

    Events: `{"token_id", "text"}` per token, then the final `{"text", "token_ids",
    "finish_reason", "adapter", "usage"}` (the non-streaming body), or `{"error": {...}}` if
    generation failed after the response started, then `[DONE]`.
    """

    media_type = "text/event-stream"

    def __init__(self, state: ServerState, stream: RequestStream, req: GenerateRequest, info: dict):
        super().__init__(content=None, status_code=200, media_type=self.media_type, headers={
            "Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Request-ID": info["request_id"]})
        self.state, self.stream, self.req, self.info = state, stream, req, info
        self.result = SequenceOutput()
        self.outcome = "client_disconnected"

    def init_headers(self, headers=None) -> None:  # no content-length: the body streams
        super().init_headers(headers)
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]

    async def _produce(self, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        failed = (FinishReason.ERROR, FinishReason.ABORT)
        out: list[bytes] = []
        async for batch in self.stream.batches():  # the tokens already queued go out in one write
            for ev in batch:
                self.result.add(ev)
                if ev.token_id is not None and ev.finish_reason not in failed:
                    out.append(_sse_token(ev.token_id, ev.text))
            if out and not self.stream.finished:
                await send({"type": "http.response.body", "body": b"".join(out), "more_body": True})
                out.clear()
        res = self.result
        if res.failed:
            final = _failure(self.state, res.reason, res.code).to_dict()
        else:
            final = _body(res, self.req, self.info["prompt_tokens"])
        self.outcome = res.reason.value
        out.append(_sse(final) + b"data: [DONE]\n\n")
        await send({"type": "http.response.body", "body": b"".join(out), "more_body": False})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await stream_until_disconnect(self._produce(send), receive)
        finally:
            if not self.stream.finished:
                self.stream.cancel()
            self.state.inflight -= 1
            _log_done(self.info, self.result, self.outcome)
