"""Next-token choice per row: greedy, or temperature / top-k / top-p with a per-request generator.

Each sampled row draws from its own `torch.Generator` seeded by the request, so a seeded request
gives the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import torch

from .request import SamplingParams


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits: [V] float32 -> temperature-scaled logits with top-k/top-p excluded set to -inf."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # drop a token once the mass *before* it already reaches top_p (always keep the first)
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """logits: [R, V] float32 -> one token id per row."""
    greedy = torch.argmax(logits, dim=-1).tolist()  # one vectorised pass covers every greedy row
    out = []
    for row, (p, gen) in enumerate(zip(params, generators)):
        if p.greedy:
            out.append(greedy[row])
            continue
        probs = torch.softmax(filter_logits(logits[row], p), dim=-1)
        out.append(int(torch.multinomial(probs.cpu(), 1, generator=gen).item()))
    return out
