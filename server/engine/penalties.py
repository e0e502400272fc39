"""Logit processing before sampling: presence/frequency/repetition penalties and min_tokens.

Definitions follow vLLM (which follows OpenAI for the first two and HF for the third):

- presence_penalty p, frequency_penalty f, over the tokens *generated so far* (not the prompt):
  `logit[t] -= f * count[t] + p * (count[t] > 0)`;
- repetition_penalty r, over the prompt *and* the generated tokens: a seen token's logit is
  divided by r when positive, multiplied by r when not (r > 1 discourages repeats);
- min_tokens m: while fewer than m tokens were generated, every EOS id gets -inf.

Only rows whose `SamplingParams.processes_logits` is true are touched (a Python loop over those
rows: each needs its own token history); when no row needs it the logits tensor is returned
as is, so plain requests pay nothing and greedy rows stay on the one vectorised argmax.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch


def penalize_row(row: torch.Tensor, params, prompt_ids: list[int], output_ids: list[int],
                 eos_ids: Seq[int]) -> None:
    """row: [V] float32 logits of one sequence, modified in place."""
    vocab = row.shape[-1]
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long, device=row.device)
        if seen.numel():
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    if (params.presence_penalty != 0.0 or params.frequency_penalty != 0.0) and output_ids:
        ids = torch.tensor(output_ids, dtype=torch.long, device=row.device)
        counts = torch.bincount(ids, minlength=vocab)[:vocab].to(row.dtype)  # [V]
        row -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(row.dtype)
    if len(output_ids) < params.min_tokens and eos_ids:
        row[torch.tensor(list(eos_ids), dtype=torch.long, device=row.device)] = float("-inf")


def apply_penalties(logits: torch.Tensor, seqs: list, eos_ids: Seq[int]) -> torch.Tensor:
    """logits: [R, V] raw model logits, one row per sequence in `seqs` -> processed [R, V].

    Returns `logits` itself when no row needs processing; otherwise a copy (the raw tensor stays
    intact for the logprobs, which report the model's own distribution)."""
    rows = [i for i, s in enumerate(seqs) if s.params.processes_logits]
    if not rows:
        return logits
    out = logits.clone()
    for i in rows:
        s = seqs[i]
        penalize_row(out[i], s.params, s.prompt_ids, s.output_ids, eos_ids)
    return out
