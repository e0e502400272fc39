"""A request's life inside the engine: its parameters, its sequence state, its output events."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from . import sampling_params as rules


class FinishReason(str, enum.Enum):
    LENGTH = "length"
    STOP = "stop"
    EOS = "eos"
    ABORT = "abort"
    ERROR = "error"


class ErrorCode(str, enum.Enum):
    """Why a request ended in FinishReason.ERROR: a stable code the API maps to a status.

    The human detail (exception type, which row, which step) goes to the log, never to the
    client; the API answers with the code and a generic message for it (server/errors.py).
    """

    NUMERICAL_ERROR = "numerical_error"  # the model/adapter produced NaN/inf logits for this row
    SAMPLING_ERROR = "sampling_error"  # drawing the next token failed for this row
    GENERATION_FAILED = "generation_failed"  # forward pass, detokenisation or stop check failed
    ADAPTER_UNAVAILABLE = "adapter_unavailable"  # its adapter could not be installed / prefixed
    ENGINE_RESTARTED = "engine_restarted"  # the engine loop died and was rebuilt under it
    ENGINE_STOPPED = "engine_stopped"  # the engine was stopped (shutdown) or gave up restarting
    INVALID_REQUEST = "invalid_request"  # refused by the engine itself (direct engine users)
    INTERNAL_ERROR = "internal_error"  # anything else that failed for this row only


class SeqStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # OpenAI/vLLM extras (server/engine/penalties.py, logprobs.py); the defaults change nothing
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # HF/vLLM: divides (>0) or multiplies (<0) logits of prompt+output tokens
    min_tokens: int = 0  # EOS masked and stop strings ignored until this many tokens were generated
    logprobs: int | None = None  # None = off; k >= 0 = sampled token's logprob + the top k

    def __post_init__(self):
        # the same rules as the API (422 there): no accepted value can give inf/NaN probabilities
        rules.check(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                    top_k=self.top_k, seed=self.seed, stop=self.stop)
        rules.check_extras(max_new_tokens=self.max_new_tokens, presence_penalty=self.presence_penalty,
                           frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
                           min_tokens=self.min_tokens, logprobs=self.logprobs)

    @property
    def greedy(self) -> bool:
        """Greedy below the temperature floor (sampling_params.SAMPLING_EPS), 0 included."""
        return rules.is_greedy(self.temperature)

    @property
    def processes_logits(self) -> bool:
        """True when this row's logits are changed before sampling (penalties, min_tokens)."""
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
                or self.min_tokens > 0)


@dataclass
class TokenEvent:
    """One event a request's consumer receives: a new token, and on the last one the reason."""

    token_id: int | None
    text: str  # newly decoded text (may be "" while a multi-byte char is incomplete)
    finish_reason: FinishReason | None = None
    error: str | None = None  # internal detail for logs (never shown to clients)
    code: ErrorCode | None = None  # set with FinishReason.ERROR
    # when the request asked for logprobs: (logprob of token_id, [(top id, logprob), ...] best first)
    logprobs: tuple[float, list[tuple[int, float]]] | None = None


_ids = itertools.count(1)


class AdapterHandle(Protocol):
    """What a sequence carries of its adapter: the registry's `AdapterVersion` (a stored
    version or a combination). The engine reads only these; the runtime reads the rest through
    its kinds table (server/runtime/kinds.py)."""

    name: str  # shown in metrics and logs
    key: str  # content hash of the version: its identity in the device tier


@dataclass(eq=False)
class Sequence:
    """Engine-side state of one request. Touched only by the engine thread."""

    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[TokenEvent], None]
    adapter: AdapterHandle | None = None  # resolved by the registry; None = base model
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: SeqStatus = SeqStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    kv_blocks: list[int] = field(default_factory=list)  # own KV blocks (kv_cache.py) while running
    kv_prefix_blocks: list[int] = field(default_factory=list)  # its adapter's shared KV-prefix blocks
    adapter_slot: int = 0  # per-token adapter slot index (0 = base) for weight adapters
    kv_prefix_len: int = 0  # virtual tokens (soft prompt / prefix) in front of the prompt
    num_computed: int = 0  # real tokens whose K/V are already in the cache
    generator: torch.Generator | None = None
    arrival: float = field(default_factory=time.monotonic)
    first_scheduled: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    cancelled: bool = False
    blocked_steps: int = 0  # steps spent at admission waiting for an adapter slot
    preemptions: int = 0  # times its KV blocks were taken back (scheduler.py)
    finish_reason: FinishReason | None = None
    detok: object | None = None  # incremental detokenizer (engine-owned)

    def token_at(self, pos: int) -> int:
        """Token `pos` of prompt + output (0 <= pos < num_tokens), without joining the two: a
        decode step asks once per row, and joining costs the whole context each time."""
        p = len(self.prompt_ids)
        return self.prompt_ids[pos] if pos < p else self.output_ids[pos - p]

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output (0 <= start <= end <= num_tokens)."""
        p = len(self.prompt_ids)
        if end <= p:
            return self.prompt_ids[start:end]
        if start >= p:
            return self.output_ids[start - p:end - p]
        return self.prompt_ids[start:] + self.output_ids[:end - p]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def in_prefill(self) -> bool:
        """More than the last sampled token to compute: the prompt, or everything again after a
        preemption (the scheduler freed its blocks; output tokens are recomputed, not resampled)."""
        return self.num_tokens - self.num_computed > 1

    @property
    def context_len(self) -> int:
        """Positions occupied in the KV cache (virtual prefix included)."""
        return self.kv_prefix_len + self.num_computed
