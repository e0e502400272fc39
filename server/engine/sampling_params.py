"""Sampling-parameter rules, checked in the dtype the sampler computes in (float32).

One module, no web framework: `SamplingParams` runs `check()` at construction (so direct engine
users get the same guarantees as HTTP clients), and the API routes map `SamplingParamError` to
422 `invalid_request`. The rules are chosen so that *no accepted value can make the sampler
produce inf/NaN probabilities*:

- temperature: finite, in [0, TEMPERATURE_MAX]. Below `SAMPLING_EPS` (vLLM's `_SAMPLING_EPS`)
  the request is greedy: dividing float32 logits by a temperature that small overflows to inf
  (1e-300 even rounds to 0 in float32), and the distribution it asks for *is* the argmax anyway.
- top_p: finite, in (0, 1]. A value that rounds to 0 in float32 (1e-300) is accepted and means
  "the smallest nucleus": the sampler always keeps the most likely token, so it never drops
  every token (see `sampler.filter_logits`).
- top_k: 0 (disabled) or >= 1; values above the vocabulary size keep every token.
- max_new_tokens >= 1; seed in [0, 2**63 - 1] (what a torch.Generator takes).

- extras (OpenAI/vLLM): presence/frequency penalty finite in [-2, 2] (OpenAI's range), repetition
  penalty finite in (0, 100] (it divides logits), min_tokens in [0, max_new_tokens], logprobs
  None or [0, 20] (OpenAI's top_logprobs cap).

Adding a parameter: add its bound here and a case to the
property-based tests (tests/test_sampling_params.py), then make the sampler robust to the whole
accepted range.
"""

from __future__ import annotations

import math

SAMPLING_EPS = 1e-5  # temperatures below this are greedy (vLLM: _SAMPLING_EPS)
TEMPERATURE_MAX = 100.0
TOP_K_MAX = 2**31 - 1
MAX_NEW_TOKENS_MAX = 2**31 - 1
SEED_MAX = 2**63 - 1


class SamplingParamError(ValueError):
    """An invalid sampling parameter: `field` names it, the message says the accepted range."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_greedy(temperature: float) -> bool:
    """The temperature floor: below SAMPLING_EPS (0 included) the argmax is taken."""
    return temperature < SAMPLING_EPS


def check(*, max_new_tokens, temperature, top_p, top_k, seed, stop) -> None:
    """Raise SamplingParamError for the first value outside its accepted range."""
    if not _integer(max_new_tokens) or not 1 <= max_new_tokens <= MAX_NEW_TOKENS_MAX:
        raise SamplingParamError("max_new_tokens", f"must be an integer in [1, {MAX_NEW_TOKENS_MAX}]")
    if not _number(temperature) or not math.isfinite(temperature) or not 0.0 <= temperature <= TEMPERATURE_MAX:
        raise SamplingParamError("temperature", f"must be a finite number in [0, {TEMPERATURE_MAX:g}]")
    if not _number(top_p) or not math.isfinite(top_p) or not 0.0 < top_p <= 1.0:
        raise SamplingParamError("top_p", "must be a finite number in (0, 1]")
    if not _integer(top_k) or not 0 <= top_k <= TOP_K_MAX:
        raise SamplingParamError("top_k", f"must be an integer in [0, {TOP_K_MAX}] (0 = disabled)")
    if seed is not None and (not _integer(seed) or not 0 <= seed <= SEED_MAX):
        raise SamplingParamError("seed", f"must be an integer in [0, {SEED_MAX}]")
    if not isinstance(stop, tuple) or not all(isinstance(s, str) and s for s in stop):
        raise SamplingParamError("stop", "must be a tuple of non-empty strings")


PENALTY_MAX = 2.0
REPETITION_MAX = 100.0
LOGPROBS_MAX = 20


def check_extras(*, max_new_tokens, presence_penalty, frequency_penalty, repetition_penalty, min_tokens,
                 logprobs) -> None:
    """The OpenAI/vLLM extras (server/engine/penalties.py, logprobs.py); same contract as `check`."""
    for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if not _number(value) or not math.isfinite(value) or not -PENALTY_MAX <= value <= PENALTY_MAX:
            raise SamplingParamError(name, f"must be a finite number in [-{PENALTY_MAX:g}, {PENALTY_MAX:g}]")
    if (not _number(repetition_penalty) or not math.isfinite(repetition_penalty)
            or not 0.0 < repetition_penalty <= REPETITION_MAX):
        raise SamplingParamError("repetition_penalty", f"must be a finite number in (0, {REPETITION_MAX:g}]")
    if not _integer(min_tokens) or not 0 <= min_tokens <= max_new_tokens:
        raise SamplingParamError("min_tokens", "must be an integer in [0, max_new_tokens]")
    if logprobs is not None and (not _integer(logprobs) or not 0 <= logprobs <= LOGPROBS_MAX):
        raise SamplingParamError("logprobs", f"must be null or an integer in [0, {LOGPROBS_MAX}]")
