"""Per-token logprobs for requests that ask for them (OpenAI `logprobs` / `top_logprobs`).

Which distribution: the *raw* model distribution, `log_softmax` of the logits the model produced
for the row, before penalties, temperature, top-k and top-p — vLLM's default
(`logprobs_mode="raw_logprobs"`). The value is therefore independent of the sampling settings,
and the sampled token's logprob is reported even when it fell outside the top k.

One `log_softmax` and one `topk` over only the rows that asked (a [r, V] gather), so rows
without logprobs cost nothing.
"""

from __future__ import annotations

import torch

MAX_TOP_LOGPROBS = 20  # OpenAI's cap on top_logprobs (and on the legacy completions `logprobs`)


def token_logprobs(logits: torch.Tensor, params: list, tokens: list[int]) -> list[tuple | None]:
    """logits: [R, V] raw logits; params/tokens: per row -> per row None or
    (logprob of the sampled token, [(token id, logprob), ...] the top k, best first)."""
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    out: list[tuple | None] = [None] * len(params)
    if not rows:
        return out
    idx = torch.tensor(rows, dtype=torch.long, device=logits.device)
    lp = torch.log_softmax(logits.index_select(0, idx).float(), dim=-1)  # [r, V]
    chosen = lp.gather(1, torch.tensor([[tokens[i]] for i in rows], dtype=torch.long, device=lp.device))  # [r, 1]
    k = max(params[i].logprobs for i in rows)
    top_vals, top_ids = (torch.topk(lp, k, dim=-1) if k else (lp[:, :0], lp[:, :0].long()))  # [r, k]
    chosen, top_vals, top_ids = chosen[:, 0].tolist(), top_vals.tolist(), top_ids.tolist()
    for j, i in enumerate(rows):
        n = params[i].logprobs
        out[i] = (chosen[j], list(zip(top_ids[j][:n], top_vals[j][:n])))
    return out
