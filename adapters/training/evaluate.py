"""Evaluation: teacher-forced loss on completion tokens, and exact match of greedy generation
(a no-cache forward loop, the same for every method: see `greedy_no_cache`)."""

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


def _right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> ids [B, T], mask [B, T], last [B] (index of each row's last real token), padded on the
    RIGHT: every real token keeps positions 0..len-1, and causal attention never lets a real
    position see the padding after it, so each row computes exactly what it would alone."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, :len(r)], mask[b, :len(r)] = torch.tensor(r), 1
    return ids, mask, torch.tensor([len(r) - 1 for r in rows])


@torch.no_grad()
def greedy_no_cache(model: nn.Module, prompts: list[list[int]], *, max_new_tokens: int, eos_id: int | None,
                    pad_id: int, device) -> list[list[int]]:
    """Greedy continuations by re-running the full forward each step, without a KV cache.

    Why not `model.generate`: PEFT's prompt-learning methods reach the model through generate's
    cache plumbing, which moves under us across transformers releases (5.24 renamed the cache
    kwarg to `cache`; PEFT 0.21.2 still injects `past_key_values`, so soft prompts are re-inserted
    at every step and prefixes are dropped). `PeftModel.forward` without a cache is the method's
    definition and the path training uses; it also decodes every method the same way, which a
    fair `compare` needs. Cost: O(new^2) tokens per row instead of O(new); completions here are short.
    """
    outs: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts)))
    for _ in range(max_new_tokens):
        rows = [prompts[i] + outs[i] for i in live]
        ids, mask, last = _right_pad(rows, pad_id)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        # [B, P + T, V]: prompt-tuning / P-tuning prepend P virtual positions; prefix tuning does not
        offset = logits.shape[1] - ids.shape[1]
        nxt = logits[torch.arange(len(live), device=logits.device), last.to(logits.device) + offset].argmax(-1)
        still = []
        for i, tok in zip(live, nxt.tolist()):
            outs[i].append(tok)
            if tok != eos_id:
                still.append(i)
        live = still
        if not live:
            break
    return outs


@torch.no_grad()
def generate_completions(model: nn.Module, tokenizer, prompts: list[list[int]], *, batch_size: int,
                         max_new_tokens: int, device) -> list[str]:
    was_training = model.training
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts = []
    for i in range(0, len(prompts), batch_size):
        outs = greedy_no_cache(model, prompts[i:i + batch_size], max_new_tokens=max_new_tokens,
                               eos_id=tokenizer.eos_token_id, pad_id=pad_id, device=device)
        texts += tokenizer.batch_decode(outs, skip_special_tokens=True)
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
