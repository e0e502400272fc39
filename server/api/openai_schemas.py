"""Request models of the OpenAI-compatible routes, and the screen that runs before them.

OpenAI clients (the `openai` SDK, LangChain, LiteLLM, vLLM's benchmark tools) send fields we
must accept, and some they send with their no-op value (`"logit_bias": null`, `"best_of": 1`).
So a body goes through `screen()` first: every key must be a served parameter, or a known but
unserved one carrying its no-op value (dropped); a known unserved parameter with any other value
is a 400 `unsupported_parameter`, anything else a 400 `unknown_parameter`, both naming the
parameter in `error.param`. What is left is validated strictly by pydantic (no coercion, 422
`invalid_request` naming the parameter) — the same discipline as `/generate`.

The table of what is served and refused is `docs/openai.md`; keep them in sync.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .openai_errors import invalid, unknown, unsupported
from .schemas import MAX_SEED, MAX_STOP, AdapterWeight, error_message, error_param, relevant_errors

MAX_N = 16  # choices per prompt
MAX_PROMPTS = 64  # prompts in one /v1/completions batch
MAX_TOP_LOGPROBS = 20  # OpenAI's cap

_STRICT = ConfigDict(extra="forbid", strict=True)


# -- the screen ---------------------------------------------------------------------------------
def _is(*values) -> Callable[[object], bool]:
    return lambda v: any(v is x or (type(v) is type(x) and v == x) for x in values)


_NONE = _is(None)
_FALSY = _is(None, False)
_EMPTY = _is(None, [], {}, "")

# known OpenAI / vLLM parameters that are not served: name -> "this value is a no-op"
_REFUSED_COMMON: dict[str, Callable[[object], bool]] = {
    "logit_bias": _EMPTY, "metadata": _EMPTY, "store": _FALSY, "service_tier": _NONE,
    # vLLM sampling extras
    "use_beam_search": _FALSY, "length_penalty": _is(None, 1, 1.0), "min_p": _is(None, 0, 0.0),
    "stop_token_ids": _EMPTY, "include_stop_str_in_output": _FALSY, "skip_special_tokens": _is(None, True),
    "spaces_between_special_tokens": _is(None, True), "prompt_logprobs": _NONE, "truncate_prompt_tokens": _NONE,
    "allowed_token_ids": _EMPTY, "bad_words": _EMPTY, "logits_processors": _EMPTY, "priority": _is(None, 0),
    "return_tokens_as_token_ids": _FALSY, "guided_json": _NONE, "guided_regex": _NONE, "guided_choice": _NONE,
    "guided_grammar": _NONE, "guided_decoding_backend": _NONE, "guided_whitespace_pattern": _NONE,
    "structured_outputs": _NONE, "request_id": _NONE, "cache_salt": _NONE, "kv_transfer_params": _NONE,
    "vllm_xargs": _NONE, "seed_per_choice": _NONE, "add_special_tokens": _is(None, True),
}
REFUSED_COMPLETION = {**_REFUSED_COMMON, "best_of": _is(None, 1), "suffix": _EMPTY,
                      "response_format": _is(None, {"type": "text"})}
REFUSED_CHAT = {
    **_REFUSED_COMMON, "tools": _EMPTY, "tool_choice": _is(None, "none"), "functions": _EMPTY,
    "function_call": _is(None, "none"), "parallel_tool_calls": _NONE, "response_format": _is(None, {"type": "text"}),
    "modalities": _is(None, ["text"]), "audio": _NONE, "prediction": _NONE, "reasoning_effort": _NONE,
    "web_search_options": _NONE, "verbosity": _NONE, "prompt_cache_key": _NONE, "safety_identifier": _NONE,
    "chat_template": _NONE, "chat_template_kwargs": _EMPTY, "documents": _EMPTY, "mm_processor_kwargs": _EMPTY,
    "continue_final_message": _FALSY, "echo": _FALSY, "best_of": _is(None, 1),
}
_REFUSED_STREAM_OPTIONS = {"continuous_usage_stats": _FALSY}
_REFUSED_MESSAGE = {"name": _NONE, "tool_calls": _EMPTY, "tool_call_id": _NONE, "function_call": _NONE,
                    "refusal": _NONE, "audio": _NONE, "reasoning_content": _NONE}


def screen(obj: dict, served: set[str], refused: dict[str, Callable], where: str = "") -> dict:
    """-> `obj` without the no-op refused keys; raises 400 naming the first bad parameter."""
    out = {}
    for key, value in obj.items():
        name = f"{where}{key}"
        if key in served:
            out[key] = value
        elif key in refused:
            if not refused[key](value):
                raise unsupported(name)
        else:
            raise unknown(name)
    return out


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise invalid(key, f"{key}: duplicate key in the JSON body")
        out[key] = value
    return out


def load_json_object(body: bytes) -> dict:
    try:
        obj = json.loads(body, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError):
        raise invalid(None, "the body is not valid JSON") from None
    if not isinstance(obj, dict):
        raise invalid(None, "the body must be a JSON object")
    return obj


def validate(model_cls: type[BaseModel], obj: dict) -> BaseModel:
    try:
        return model_cls.model_validate(obj)
    except ValidationError as exc:
        first = relevant_errors(exc.errors())[0]
        raise invalid(error_param(first), error_message(first)) from None


# -- models ---------------------------------------------------------------------------------------
Stop = Annotated[str, Field(min_length=1, max_length=256)] | Annotated[
    list[Annotated[str, Field(min_length=1, max_length=256)]], Field(max_length=MAX_STOP)] | None
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool | None = None


class SamplingFields(BaseModel):
    """What /v1/completions and /v1/chat/completions share."""

    model_config = _STRICT

    model: Annotated[str, Field(min_length=1, max_length=512)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    temperature: Annotated[float, Field(ge=0.0, le=100.0, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] | None = None
    stop: Stop = None
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    user: Annotated[str, Field(max_length=512)] | None = None
    # vLLM extras
    top_k: Annotated[int, Field(ge=-1, le=2**31 - 1)] | None = None  # -1 or 0: disabled
    min_tokens: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    ignore_eos: bool | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=100.0, allow_inf_nan=False)] | None = None
    # adapter selection besides `model`: LoRAX's `adapter_id`, or our weighted combination
    adapter_id: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    adapter: Annotated[str, Field(min_length=1, max_length=256)] | Annotated[
        list[AdapterWeight], Field(min_length=1, max_length=16)] | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        if self.adapter is not None and self.adapter_id is not None:
            raise ValueError("give one of adapter, adapter_id")
        return self

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: Annotated[str, Field(max_length=10_000_000)] | Annotated[
        list[str], Field(min_length=1, max_length=MAX_PROMPTS)] | TokenIds | Annotated[
        list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    max_tokens: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = None
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: bool | None = None

    @model_validator(mode="after")
    def _echo(self):
        if self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs needs prompt logprobs, which this server does not compute")
        return self

    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the batch: a string or a token-id list."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]
        return list(p)


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[TextPart], Field(min_length=1)]

    def rendered(self) -> dict:
        """The message as the chat template takes it (developer = system, text parts joined)."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(SamplingFields):
    messages: Annotated[list[Message], Field(min_length=1, max_length=4096)]
    max_tokens: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    add_generation_prompt: bool = True  # vLLM extra

    @model_validator(mode="after")
    def _limits(self):
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens disagree (give one)")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=true")
        return self

    @property
    def max_new(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


_COMPLETION_FIELDS = set(CompletionRequest.model_fields)
_CHAT_FIELDS = set(ChatRequest.model_fields)
_MESSAGE_FIELDS = set(Message.model_fields)


def _screen_stream_options(obj: dict) -> None:
    so = obj.get("stream_options")
    if isinstance(so, dict):
        obj["stream_options"] = screen(so, set(StreamOptions.model_fields), _REFUSED_STREAM_OPTIONS,
                                       "stream_options.")


def parse_completion(body: bytes) -> CompletionRequest:
    obj = screen(load_json_object(body), _COMPLETION_FIELDS, REFUSED_COMPLETION)
    _screen_stream_options(obj)
    if "prompt" not in obj:
        raise invalid("prompt", "prompt: field required")
    return validate(CompletionRequest, obj)


def parse_chat(body: bytes) -> ChatRequest:
    obj = screen(load_json_object(body), _CHAT_FIELDS, REFUSED_CHAT)
    _screen_stream_options(obj)
    messages = obj.get("messages")
    if isinstance(messages, list):
        cleaned = []
        for i, m in enumerate(messages):
            if isinstance(m, dict):
                m = screen(m, _MESSAGE_FIELDS, _REFUSED_MESSAGE, f"messages.{i}.")
                content = m.get("content")
                if isinstance(content, list):
                    for j, part in enumerate(content):
                        if isinstance(part, dict) and part.get("type") not in (None, "text"):
                            raise unsupported(f"messages.{i}.content.{j}.type",
                                              f"content part type {str(part.get('type'))[:40]!r}; only text is served")
            cleaned.append(m)
        obj["messages"] = cleaned
    return validate(ChatRequest, obj)
