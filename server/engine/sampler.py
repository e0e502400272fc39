"""Next-token choice per row: greedy, or temperature / top-k / top-p with a per-request generator.

Batched: one argmax covers every greedy row; the sampled rows are filtered together
(`filter_logits_batch`: per-row temperature, top-k, top-p as tensors; in cache-sized chunks on
CPU), turned into one float64 CDF, and each row takes the token its own uniform draw lands on
(inverse-CDF sampling, `draw_tokens`). A row's draw comes from its own `torch.Generator` (seeded by the request), one
number per step, so a seeded request's draws never depend on what else shares its batch (its
tokens are the same wherever its logits are: a batch of another size may change their last bits,
see docs/openai.md "seed"), and the whole step costs one device->host copy of the sampled ids,
not a copy and a sync per row.

Failure isolation: the engine fails rows with non-finite logits (`screen_rows` on the device,
its flags fetched with the sampled ids in the step's one copy, `confirm_nonfinite` on the
flagged rows only; a failed row's token is never used). If the batched draw raises, `sample` redraws
row by row (`_draw`, the same arithmetic on one row), each inside its own try, so one row that
cannot be sampled becomes a `SampleFailure` for that row only, never an exception that would end
the step for its batch-mates. Filtering computes in float32 with the temperature floored and
overflow avoided by a shift, and top-p always keeps the most likely token, so every parameter
`sampling_params.check` accepts gives a valid distribution.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from .request import ErrorCode, SamplingParams
from .sampling_params import SAMPLING_EPS

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class SampleFailure:
    """A row the sampler could not draw from; the engine fails that row alone."""

    code: ErrorCode
    detail: str  # for the log only


def screen_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits: [R, V] -> [R] bool on their device, no sync: rows that may hold NaN or +-inf.

    A row holding NaN or +-inf always sums to NaN or +-inf (IEEE), so a finite sum clears the
    row; a sum is one vectorised read, ~15x cheaper on CPU than `isfinite(...).all(-1)` over a
    [64, 49k] step (0.3 vs 4.5 ms, 2 threads). A flagged row may still be finite (its sum
    overflowed): `confirm_nonfinite` decides."""
    return ~torch.isfinite(logits.sum(dim=-1))


def confirm_nonfinite(logits: torch.Tensor, rows: list[int]) -> list[int]:
    """Of the flagged `rows`, those really holding NaN or +-inf (element-wise, those rows only)."""
    if not rows:
        return []
    index = torch.tensor(rows, device=logits.device)
    bad = ~torch.isfinite(logits.index_select(0, index)).all(dim=-1)
    return [row for row, b in zip(rows, bad.tolist()) if b]


def nonfinite_rows(logits: torch.Tensor) -> list[int]:
    """logits: [R, V] -> indices of rows holding NaN or +-inf (screen, then confirm)."""
    if logits.shape[0] == 0:
        return []
    suspect = screen_rows(logits)
    if not bool(suspect.any()):
        return []
    return confirm_nonfinite(logits, suspect.nonzero().flatten().tolist())


def filter_logits_batch(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logits: [R, V] (finite) -> float32 temperature-scaled logits [R, V], each row's top-k /
    top-p exclusions set to -inf (top-k first, top-p over what it kept). Always keeps at least
    each row's most likely token, so every row's softmax is a distribution."""
    logits = logits.float()
    rows, vocab = logits.shape
    dev = logits.device
    temperature = torch.tensor([max(float(p.temperature), SAMPLING_EPS) for p in params], device=dev)[:, None]
    scaled = logits / temperature
    overflow = ~torch.isfinite(scaled).all(dim=-1)  # [R]
    # on an accelerator the shift is computed for every row rather than asking the host first
    # (a sync); on CPU asking is free and the shift rarely needed
    if logits.device.type != "cpu" or bool(overflow.any()):
        # a huge finite logit over a small temperature overflows to inf (softmax -> NaN): shift
        # by the row max first (softmax is shift-invariant), so its top token is 0, the rest <= 0
        shifted = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
        scaled = torch.where(overflow[:, None], shifted, scaled)
    top_k = [p.top_k if p.top_k and p.top_k < vocab else 0 for p in params]
    if any(top_k):
        k = torch.tensor(top_k, device=dev)
        kth = torch.topk(scaled, max(top_k), dim=-1).values.gather(1, (k - 1).clamp(min=0)[:, None])  # [R, 1]
        kth = torch.where(k[:, None] > 0, kth, torch.full_like(kth, float("-inf")))
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    top_p = [float(p.top_p) for p in params]
    if any(p < 1.0 for p in top_p):
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token once the mass *before* it already reaches top_p; the first token is always
        # kept (a top_p that rounds to 0 in float32, e.g. 1e-300, would otherwise drop them all)
        limit = torch.tensor(top_p, device=dev)[:, None]
        drop_sorted = ((probs.cumsum(dim=-1) - probs) >= limit) & (limit < 1.0)
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """One row: logits [V] -> what `filter_logits_batch` gives that row."""
    return filter_logits_batch(logits[None], [params])[0]


def draw_tokens(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: probs [R, V] (rows sum to ~1), uniforms [R] in [0, 1) -> token ids [R].

    Row r takes the first token whose cumulative probability exceeds u_r x (row total), in
    float64 so the 49k-term sums are exact enough for the smallest probabilities. That token
    always has probability > 0 (right-side search past every equal cumulative value)."""
    cdf = probs.double().cumsum(dim=-1)  # [R, V]
    target = uniforms.double()[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True)[:, 0].clamp_(max=probs.shape[-1] - 1)


def _uniform(gen: torch.Generator | None) -> float:
    return float(torch.rand((), generator=gen, dtype=torch.float64))


def _draw(row_logits: torch.Tensor, params: SamplingParams, u: float) -> int:
    """One row alone (the fallback when the batched draw raised): the same arithmetic, same uniform."""
    probs = torch.softmax(filter_logits(row_logits, params), dim=-1)  # [V]
    return int(draw_tokens(probs[None], torch.tensor([u], dtype=torch.float64, device=probs.device))[0])


def _draw_batch(logits: torch.Tensor, params: list[SamplingParams], uniforms: torch.Tensor) -> torch.Tensor:
    """logits [S, V] of the sampled rows, their uniforms [S] (host) -> their token ids [S] (on the
    logits' device)."""
    probs = torch.softmax(filter_logits_batch(logits, params), dim=-1)  # [S, V]
    return draw_tokens(probs, uniforms.to(probs.device))  # one host->device copy


def _chunk_rows(device: torch.device, rows: int) -> int:
    """Rows filtered together. On CPU, 16: a [16, 49k] block stays in cache while all rows at once
    do not (64 rows of the default vocabulary, 2 threads: temperature 10 ms per step in chunks of
    16 vs 31 ms at once and 21 ms row by row; top-p 153 vs 160 vs 319 ms; benchmarks/sampler.py).
    On an accelerator, every row at once: one kernel per op and no sync until the final copy."""
    return 16 if device.type == "cpu" else max(rows, 1)


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits [R, V] (finite) -> int64 [R]: each row's first maximal index, as `torch.argmax`.
    On CPU float32 through numpy, whose SIMD argmax is ~7x torch's there (64 x 49k: 0.44 vs
    3.1 ms, one thread); the result shares memory with nothing the caller keeps."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.shape[0] and logits.shape[1]:
        return torch.from_numpy(np.argmax(logits.numpy(), axis=-1).astype(np.int64, copy=False))
    return torch.argmax(logits, dim=-1)


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int | SampleFailure]:
    """logits: [R, V] float32 (finite rows) -> one token id per row, or a SampleFailure for it."""
    return sample_step(logits, params, generators)[0]


def sample_step(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                flags: torch.Tensor | None = None) -> tuple[list[int | SampleFailure], list[bool]]:
    """`sample`, with `flags` ([R] bool on the logits' device, e.g. `screen_rows`) fetched in the
    same device->host copy as the ids: the step's one copy. -> (tokens, flags as bools, [] when
    none). A row's token is drawn whatever its logits hold; the caller discards flagged rows'."""
    tokens = argmax_rows(logits)  # [R]: every greedy row at once
    hot = [row for row, p in enumerate(params) if not p.greedy]
    if not hot:
        return _fetch(tokens, flags)
    # each row's one draw from its own generator, taken first: the batch and the row-by-row
    # fallback use the same number, so a row's token does not depend on which path ran
    uniforms = torch.tensor([_uniform(generators[row]) for row in hot], dtype=torch.float64)  # [S]
    try:
        index = torch.tensor(hot).to(logits.device)
        hot_logits, hot_params = logits.index_select(0, index), [params[r] for r in hot]
        step = _chunk_rows(logits.device, len(hot))
        drawn = torch.cat([_draw_batch(hot_logits[i:i + step], hot_params[i:i + step], uniforms[i:i + step])
                           for i in range(0, len(hot), step)])
        return _fetch(tokens.index_copy(0, index, drawn), flags)
    except Exception as exc:  # redraw row by row: only a row that fails alone fails
        log.warning("batched sampling failed; drawing row by row", extra={"rows": len(hot), "error": repr(exc)})
    out, fetched = _fetch(tokens, flags)
    for row, u in zip(hot, uniforms.tolist()):
        try:
            out[row] = _draw(logits[row], params[row], u)
        except Exception as exc:  # one row's failure must not end the step for the others
            log.error("sampling failed for one row", extra={"row": row, "error": repr(exc)})
            out[row] = SampleFailure(ErrorCode.SAMPLING_ERROR, repr(exc))
    return out, fetched


def _fetch(tokens: torch.Tensor, flags: torch.Tensor | None) -> tuple[list, list[bool]]:
    """The step's one device->host copy: ids [R] (int64), with the flags riding along."""
    if flags is None:
        return tokens.tolist(), []
    both = torch.stack([tokens, flags.to(device=tokens.device, dtype=tokens.dtype)]).tolist()  # [2, R]
    return both[0], [bool(f) for f in both[1]]
