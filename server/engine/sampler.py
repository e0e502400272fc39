"""Next-token choice per row: greedy, or temperature / top-k / top-p with a per-request generator.

Each sampled row draws from its own `torch.Generator` seeded by the request, so a seeded request
gives the same tokens whatever else shares its batch.

Failure isolation: the engine fails rows with non-finite logits before sampling
(`nonfinite_rows`, one vectorised check per step), and `sample` draws each sampled row inside
its own try, so one row that cannot be sampled becomes a `SampleFailure` for that row only —
never an exception that would end the step for its batch-mates. `filter_logits` computes in
float32 with the temperature floored and overflow avoided by a shift, and top-p always keeps the most
likely token, so every parameter `sampling_params.check` accepts gives a valid distribution.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .request import ErrorCode, SamplingParams
from .sampling_params import SAMPLING_EPS

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class SampleFailure:
    """A row the sampler could not draw from; the engine fails that row alone."""

    code: ErrorCode
    detail: str  # for the log only


def nonfinite_rows(logits: torch.Tensor) -> list[int]:
    """logits: [R, V] -> indices of rows holding NaN or +-inf (one vectorised pass, one sync)."""
    finite = torch.isfinite(logits).all(dim=-1)  # [R] bool
    if logits.shape[0] == 0 or bool(finite.all()):
        return []
    return (~finite).nonzero().flatten().tolist()


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits: [V] (finite) -> float32 temperature-scaled logits, top-k/top-p excluded set to -inf.

    Always keeps at least the most likely token, so the softmax of the result is a distribution.
    """
    temperature = max(float(params.temperature), SAMPLING_EPS)  # greedy rows never get here
    logits = logits.float()
    scaled = logits / temperature
    if not bool(torch.isfinite(scaled).all()):
        # a huge finite logit over a small temperature overflows to inf (softmax -> NaN): shift
        # by the max first (softmax is shift-invariant), so the top token is 0 and the rest <= 0
        scaled = (logits - logits.max()) / temperature
    logits = scaled
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token once the mass *before* it already reaches top_p; the first token is always
        # kept (a top_p that rounds to 0 in float32, e.g. 1e-300, would otherwise drop them all)
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= params.top_p
        drop_sorted[0] = False
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _draw(row_logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    probs = torch.softmax(filter_logits(row_logits, params), dim=-1)  # [V]
    return int(torch.multinomial(probs.cpu(), 1, generator=gen).item())


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int | SampleFailure]:
    """logits: [R, V] float32 (finite rows) -> one token id per row, or a SampleFailure for it."""
    greedy = torch.argmax(logits, dim=-1).tolist()  # one vectorised pass covers every greedy row
    out: list[int | SampleFailure] = []
    for row, (p, gen) in enumerate(zip(params, generators)):
        if p.greedy:
            out.append(greedy[row])
            continue
        try:
            out.append(_draw(logits[row], p, gen))
        except Exception as exc:  # one row's failure must not end the step for the others
            log.error("sampling failed for one row", extra={"row": row, "error": repr(exc)})
            out.append(SampleFailure(ErrorCode.SAMPLING_ERROR, repr(exc)))
    return out
