"""Evaluation: teacher-forced loss on completion tokens, and exact match of greedy generation."""

from __future__ import annotations

import torch
from torch import nn

from .data import IGNORE_INDEX, Encoded, collate


@torch.no_grad()
def eval_loss(model: nn.Module, rows: list[Encoded], pad_id: int, batch_size: int, device) -> float:
    """Mean loss per completion token over all rows (token-weighted, so batching does not matter)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate(rows[i:i + batch_size], pad_id).items()}
        n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # the loss is over shifted labels
        total += float(model(**batch).loss) * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


def _left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] ids and mask, padded on the LEFT so every row's next token is at position T."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):], mask[b, width - len(p):] = torch.tensor(p), 1
    return ids, mask


@torch.no_grad()
def generate_completions(model: nn.Module, tokenizer, prompts: list[list[int]], *, batch_size: int,
                         max_new_tokens: int, device) -> list[str]:
    was_training = model.training
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts = []
    for i in range(0, len(prompts), batch_size):
        ids, mask = _left_pad(prompts[i:i + batch_size], pad_id)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                             eos_token_id=tokenizer.eos_token_id)
        # [B, T + new]; PEFT prompt-learning generate also returns only real tokens, so slice at T.
        texts += tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    model.train(was_training)
    return texts


def exact_match(model: nn.Module, tokenizer, rows: list[Encoded], *, batch_size: int, max_new_tokens: int,
                device) -> tuple[float, list[dict]]:
    """Fraction of rows whose greedy completion equals the reference (both whitespace-stripped)."""
    if not rows:
        return float("nan"), []
    preds = generate_completions(model, tokenizer, [r.prompt_ids for r in rows], batch_size=batch_size,
                                 max_new_tokens=max_new_tokens, device=device)
    samples = [{"prompt": r.example.prompt, "expected": r.example.completion, "predicted": p.strip(),
                "correct": p.strip() == r.example.completion.strip()} for r, p in zip(rows, preds)]
    return sum(s["correct"] for s in samples) / len(samples), samples


def new_token_budget(rows: list[Encoded], cap: int) -> int:
    """Enough new tokens for the longest reference completion (+EOS), at most `cap`."""
    longest = max((sum(1 for x in r.labels if x != IGNORE_INDEX) for r in rows), default=1)
    return max(1, min(cap, longest + 1))
