"""Training data: JSONL reading, validation, tokenisation with completion-only labels, batching.

Accepted rows (one JSON object per line; blank lines are skipped):
  {"prompt": str, "completion": str}
  {"instruction": str, "input": str (optional), "output": str}     (Alpaca, rendered below)
  {"messages": [{"role": str, "content": str}, ...]}                (chat; last turn = assistant)
Every problem is a DataError that names the file and the 1-based line, so the CLI can print one
clear line and exit 2 instead of a traceback.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE_INDEX = -100  # labels value the loss skips (prompt and padding tokens)
ALPACA_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


class DataError(ValueError):
    """Bad training data; `str()` is `path:line: message` (or `path: message`)."""

    def __init__(self, path: str | Path, line: int | None, message: str):
        self.path, self.line, self.message = str(path), line, message
        super().__init__(f"{path}:{line}: {message}" if line else f"{path}: {message}")


@dataclass(frozen=True)
class Example:
    prompt: str  # fully rendered text the model sees before the completion
    completion: str
    source: str  # "path:line", for error messages
    chat: bool = False  # chat prompts already contain the template's special tokens


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens
    prompt_ids: list[int]  # what generation is conditioned on at eval time
    example: Example


def _str_field(obj: dict, key: str, path: Path, line: int, *, required: bool = True) -> str:
    if key not in obj:
        if required:
            raise DataError(path, line, f"missing field {key!r}")
        return ""
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(path, line, f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def _chat_example(obj: dict, path: Path, line: int, tokenizer) -> Example:
    msgs = obj["messages"]
    if not isinstance(msgs, list) or len(msgs) < 2:
        raise DataError(path, line, "field 'messages' must be a list of at least 2 messages")
    for k, m in enumerate(msgs):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(path, line, f"messages[{k}] must be an object with string 'role' and 'content'")
    if msgs[-1]["role"] != "assistant":
        raise DataError(path, line, "the last message must have role 'assistant' (it is the completion)")
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(path, line, "chat rows need a tokenizer with a chat template")
    history = [{"role": m["role"], "content": m["content"]} for m in msgs[:-1]]
    prompt = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    return Example(prompt, msgs[-1]["content"], f"{path}:{line}", chat=True)


def parse_row(obj: object, path: Path, line: int, tokenizer) -> Example:
    if not isinstance(obj, dict):
        raise DataError(path, line, f"each line must be a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        ex = _chat_example(obj, path, line, tokenizer)
    elif "prompt" in obj or "completion" in obj:
        ex = Example(_str_field(obj, "prompt", path, line), _str_field(obj, "completion", path, line),
                     f"{path}:{line}")
    elif "instruction" in obj or "output" in obj:
        inst, inp = _str_field(obj, "instruction", path, line), _str_field(obj, "input", path, line, required=False)
        template = ALPACA_WITH_INPUT if inp else ALPACA_NO_INPUT
        ex = Example(template.format(instruction=inst, input=inp), _str_field(obj, "output", path, line),
                     f"{path}:{line}")
    else:
        raise DataError(path, line, "expected fields prompt/completion, instruction/input/output, or messages")
    if not ex.completion.strip():
        raise DataError(path, line, "the completion is empty")
    return ex


def read_examples(path: str | Path, tokenizer) -> list[Example]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(path, None, "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(path, None, f"cannot read: {exc}") from None
    examples = []
    for line_no, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DataError(path, line_no, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
        examples.append(parse_row(obj, path, line_no, tokenizer))
    if not examples:
        raise DataError(path, None, "empty file: no examples")
    return examples


def encode(examples: list[Example], tokenizer, max_length: int) -> list[Encoded]:
    """Tokenise prompt and completion separately (so eval generation sees exactly the training
    prompt ids), append EOS so the model learns to stop, and truncate the completion if needed."""
    eos = tokenizer.eos_token_id
    out = []
    for ex in examples:
        prompt_ids = tokenizer(ex.prompt, add_special_tokens=not ex.chat).input_ids
        completion_ids = tokenizer(ex.completion, add_special_tokens=False).input_ids
        completion_ids += [eos] if eos is not None else []
        if len(prompt_ids) >= max_length:
            path, line = ex.source.rsplit(":", 1)
            raise DataError(path, int(line), f"prompt is {len(prompt_ids)} tokens, which leaves no room for the "
                                             f"completion within --max-length {max_length}")
        ids = (prompt_ids + completion_ids)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_length]
        out.append(Encoded(ids, labels, prompt_ids, ex))
    return out


def split_eval(examples: list, fraction: float, seed: int, path: str | Path = "--data") -> tuple[list, list]:
    """Seeded random hold-out of `fraction` of the rows (at least one, never all)."""
    if not 0 < fraction < 1:
        raise ValueError(f"--eval-split must be in (0, 1), got {fraction}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(len(examples) * fraction)), len(examples) - 1)
    if n_eval < 1:
        raise DataError(path, None, "--eval-split needs at least 2 examples")
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def collate(rows: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids / attention_mask / labels, each [B, T]."""
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r.input_ids)
        ids[b, :n], labels[b, :n], mask[b, :n] = torch.tensor(r.input_ids), torch.tensor(r.labels), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class MicroBatches:
    """A deterministic, endless stream of micro-batches: micro-batch m belongs to epoch
    m // per_epoch and is fully determined by (seed, epoch, m), so resuming at step s just restarts
    the stream at micro-batch s * grad_accum. Each rank of a data-parallel run takes a disjoint
    shard of every epoch's permutation (truncated so every rank sees the same number of batches)."""

    def __init__(self, rows: list[Encoded], batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if len(rows) < world:
            raise ValueError(f"{len(rows)} training rows cannot be split over {world} processes")
        self.rows, self.batch_size, self.seed, self.rank, self.world = rows, batch_size, seed, rank, world
        shard = len(rows) // world
        self.per_epoch = -(-shard // batch_size)  # ceil

    def batch(self, m: int) -> list[Encoded]:
        epoch, pos = divmod(m, self.per_epoch)
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(len(self.rows), generator=gen).tolist()
        shard = perm[: len(perm) // self.world * self.world][self.rank::self.world]
        return [self.rows[i] for i in shard[pos * self.batch_size:(pos + 1) * self.batch_size]]
