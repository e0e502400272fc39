"""Request/response models of the HTTP API (strict: no type coercion, unknown fields refused)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..engine import sampling_params as rules

MAX_STOP = 16
MAX_SEED = rules.SEED_MAX

_STRICT = ConfigDict(extra="forbid", strict=True)


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Annotated[str, Field(min_length=1, max_length=64)]
    content: str


class AdapterWeight(BaseModel):
    model_config = _STRICT
    name: Annotated[str, Field(min_length=1, max_length=256)]
    weight: Annotated[float, Field(default=1.0, allow_inf_nan=False, ge=-100.0, le=100.0)] = 1.0


AdapterSpec = Annotated[str, Field(min_length=1, max_length=256)] | Annotated[
    list[AdapterWeight], Field(min_length=1, max_length=16)] | None


class GenerateRequest(BaseModel):
    # exactly one input (enforced by _one_input; stated in the schema for clients and fuzzers)
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"oneOf": [
        {"required": [name], "properties": {name: {"not": {"type": "null"}}}}
        for name in ("prompt", "messages", "input_ids")]})

    prompt: Annotated[str, Field(min_length=1)] | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=4096)] | None = None
    input_ids: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)] | None = None
    adapter: AdapterSpec = None
    # bounds from server/engine/sampling_params.py (the engine checks the same rules again)
    max_new_tokens: Annotated[int, Field(ge=1, le=rules.MAX_NEW_TOKENS_MAX)] = 64
    temperature: Annotated[float, Field(
        ge=0.0, le=rules.TEMPERATURE_MAX, allow_inf_nan=False,
        description=f"0 = greedy; values below {rules.SAMPLING_EPS:g} are greedy too")] = 0.0
    top_p: Annotated[float, Field(
        gt=0.0, le=1.0, allow_inf_nan=False,
        description="nucleus mass; the most likely token is always kept")] = 1.0
    top_k: Annotated[int, Field(ge=0, le=rules.TOP_K_MAX, description="0 = disabled")] = 0
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    stop: Annotated[list[Annotated[str, Field(min_length=1, max_length=256)]],
                    Field(max_length=MAX_STOP)] | None = None
    ignore_eos: bool = False
    stream: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> "GenerateRequest":
        given = [name for name in ("prompt", "messages", "input_ids") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("exactly one of prompt, messages, input_ids is required"
                             + (f" (got {', '.join(given)})" if given else ""))
        return self

    def adapter_selector(self) -> str | list[dict] | None:
        """The adapter as the registry takes it: a name, or [{"name", "weight"}, ...]."""
        if self.adapter is None or isinstance(self.adapter, str):
            return self.adapter
        return [a.model_dump() for a in self.adapter]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class GenerateResponse(BaseModel):
    text: str
    token_ids: list[int]
    finish_reason: Literal["length", "stop", "eos"]
    adapter: str | list[AdapterWeight] | None = None
    usage: Usage


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


def describe_validation_error(exc: ValidationError | list[dict], limit: int = 5) -> str:
    """A compact one-line message from pydantic / FastAPI validation errors."""
    errors = exc.errors() if isinstance(exc, ValidationError) else list(exc)
    parts = []
    for err in errors[:limit]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body",))
        msg = err.get("msg", "invalid value")
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        parts.append(f"{loc}: {msg}" if loc else msg)
    if len(errors) > limit:
        parts.append(f"... and {len(errors) - limit} more")
    return "; ".join(parts) or "invalid request"
