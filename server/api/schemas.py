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
    errors = relevant_errors(exc.errors() if isinstance(exc, ValidationError) else list(exc))
    parts = [error_message(err) for err in errors[:limit]]
    if len(errors) > limit:
        parts.append(f"... and {len(errors) - limit} more")
    return "; ".join(parts) or "invalid request"


def error_param(err: dict) -> str | None:
    """The parameter an error (from `relevant_errors`) is about, as the client wrote it: `prompt.1`."""
    return ".".join(str(p) for p in err.get("loc", ()) if p != "body") or None


def error_message(err: dict) -> str:
    """One error (from `relevant_errors`) as the client reads it: `prompt.1: Input should be ...`."""
    param = error_param(err)
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    return f"{param}: {msg}" if param else msg


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "list", "dict"})


def _is_member_tag(part) -> bool:
    """A union member's tag in an error location (`constrained-str`, `list[AdapterWeight]`,
    `function-after[...]`), not a field name or a list index."""
    return isinstance(part, str) and ("[" in part or "-" in part or part in _TYPE_TAGS)


def _tag_positions(err: dict) -> list[int]:
    """Where `err`'s location holds member tags. The key of an `extra_forbidden` error (its last
    part) is the client's own, whatever it looks like (`my-key`, `a[0]`)."""
    loc = err.get("loc", ())
    own_key = len(loc) - 1 if err.get("type") == "extra_forbidden" else len(loc)
    return [i for i, part in enumerate(loc[:own_key]) if _is_member_tag(part)]


def _refuses_type(err: dict) -> bool:
    return err.get("type", "").endswith("_type")  # string_type, int_type, list_type, ...


def relevant_errors(errors: list[dict]) -> list[dict]:
    """pydantic's errors, each union's reduced to what is wrong with the value as sent, with the
    members' tags taken out of the locations (`prompt.1`, not `prompt.list[constrained-int].1`).

    A value no member of a union accepts gets every member's errors: `prompt: [1, -5]` is "not a
    string", "items not strings", "item 1 below 0", "items not lists". The one reported comes
    from the member that took the value's type and failed a constraint (too long, below 0),
    else from the member with the fewest errors (it got furthest); declaration order breaks ties.
    When every member refused the value's type outright, one error names every type it could
    have been. Errors outside unions pass unchanged, in order."""
    out: list = []  # errors, and for each union the field's location (filled in below)
    unions: dict[tuple, dict[str, list[dict]]] = {}  # field location -> member tag -> its errors
    for err in errors:
        loc, tags = tuple(err.get("loc", ())), _tag_positions(err)
        if not tags:
            out.append(err)
            continue
        cut = tags[0]
        field = loc[:cut]
        if field not in unions:
            unions[field] = {}
            out.append(field)
        unions[field].setdefault(loc[cut], []).append(err)
    return [_union_error(x, unions[x]) if isinstance(x, tuple) else x for x in out]


def _union_error(field: tuple, members: dict[str, list[dict]]) -> dict:
    def outright(err: dict) -> bool:  # the member refused the value itself for its type
        return len(err.get("loc", ())) == len(field) + 1 and _refuses_type(err)

    def rank(errs: list[dict]) -> tuple:
        return any(map(outright, errs)), all(map(_refuses_type, errs)), len(errs)

    best = min(members.values(), key=rank)  # min keeps the first of equals: declaration order
    if rank(best)[0]:  # every member refused the value's type: say what it could have been
        msgs = list(dict.fromkeys(e["msg"] for errs in members.values() for e in errs if outright(e)))
        msg = msgs[0] + "".join(" or " + m.removeprefix("Input should be ") for m in msgs[1:])
        return {**best[0], "loc": field, "msg": msg}
    err = best[0]
    tags = set(_tag_positions(err))
    return {**err, "loc": tuple(p for i, p in enumerate(err.get("loc", ())) if i not in tags)}
