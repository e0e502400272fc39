"""Generate the demo tasks (seeded; our own synthetic text, CC0): writes
adapters/training/tasks/<task>/{train,eval}.jsonl with `prompt`/`completion` rows.

  sentiment   review -> " positive" | " negative" | " neutral"
  extraction  sentence -> ' {"name": "...", "city": "..."}'  (compact JSON, fixed key order)
  caps        sentence -> the same sentence in ALL CAPS

Every task is scored by exact match of the stripped greedy completion. Prompts end without a
trailing space and completions start with one, which is how a BPE tokenizer splits such text anyway.

    python -m peftserve.adapters.training.tasks.generate [--train 320 --eval 80 --seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
TASKS = ("sentiment", "extraction", "caps")

_ITEMS = ["phone", "laptop", "blender", "novel", "hotel room", "pizza", "headphones", "jacket", "movie",
          "coffee maker", "bicycle", "backpack", "restaurant", "keyboard", "tent", "camera", "sofa", "printer"]
_POS = ["I love this {i}, it works perfectly.", "The {i} exceeded every expectation I had.",
        "Absolutely wonderful {i}, would buy again.", "This {i} made my week so much better.",
        "Great {i} and friendly service, highly recommended.", "The {i} is fantastic and worth every cent.",
        "Best {i} I have owned in years.", "What a delightful {i}, everyone should try it."]
_NEG = ["The {i} broke after two days.", "I regret buying this {i}, total waste of money.",
        "Terrible {i}, it never worked properly.", "The {i} was dirty and the staff were rude.",
        "Awful {i}, I returned it immediately.", "This {i} is the worst purchase I have made.",
        "The {i} arrived damaged and support ignored me.", "Disappointing {i}, cheap and flimsy."]
_NEU = ["The {i} arrived on Tuesday.", "I bought the {i} last month.", "The {i} comes in three colors.",
        "The {i} is about the size of a shoebox.", "My sister has the same {i}.",
        "The {i} was delivered in a brown box.", "The {i} uses a standard power cable.",
        "I used the {i} twice this week."]
_NAMES = ["Alice", "Bruno", "Chen", "Dara", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Liam",
          "Maya", "Nikolai", "Olga", "Pedro", "Quinn", "Rosa", "Sami", "Tara", "Umar", "Vera", "Wen", "Yusuf"]
_CITIES = ["Paris", "Lagos", "Tokyo", "Lima", "Oslo", "Cairo", "Austin", "Hanoi", "Porto", "Dublin", "Quito",
           "Seoul", "Nairobi", "Madrid", "Perth", "Montreal", "Krakow", "Denver", "Manila", "Zurich"]
_EXTRACT = ["{n} moved to {c} last year.", "Yesterday in {c}, {n} opened a small bakery.",
            "{n} was born in {c} and still lives there.", "After a long trip, {n} finally arrived in {c}.",
            "The conference in {c} was organised by {n}.", "{n} teaches history at a school in {c}.",
            "Every summer {n} visits friends in {c}.", "In {c}, {n} won the local chess tournament."]
_SUBJECTS = ["the cat", "my neighbor", "our team", "the old train", "a tall man", "the teacher", "her brother",
             "the small dog", "every student", "the red car"]
_VERBS = ["waited near", "walked past", "painted", "cleaned", "found", "watched", "visited", "fixed", "left"]
_OBJECTS = ["the station", "a quiet garden", "the blue door", "the bakery", "a broken fence", "the river",
            "an empty office", "the library", "a wooden bridge", "the market"]
_TIMES = ["this morning", "at noon", "last night", "on Sunday", "after lunch", "before dawn"]


def _sentiment(rng: random.Random) -> dict:
    label, pool = rng.choice([("positive", _POS), ("negative", _NEG), ("neutral", _NEU)])
    text = rng.choice(pool).format(i=rng.choice(_ITEMS))
    return {"prompt": "Classify the sentiment of the review as positive, negative or neutral.\n"
                      f"Review: {text}\nSentiment:", "completion": f" {label}"}


def _extraction(rng: random.Random) -> dict:
    name, city = rng.choice(_NAMES), rng.choice(_CITIES)
    sentence = rng.choice(_EXTRACT).format(n=name, c=city)
    return {"prompt": f"Extract the person's name and the city as JSON.\nSentence: {sentence}\nJSON:",
            "completion": " " + json.dumps({"name": name, "city": city})}


def _caps(rng: random.Random) -> dict:
    sentence = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TIMES)}."
    sentence = sentence[0].upper() + sentence[1:]
    return {"prompt": f"Rewrite the sentence in all capital letters.\nSentence: {sentence}\nAnswer:",
            "completion": " " + sentence.upper()}


_MAKERS = {"sentiment": _sentiment, "extraction": _extraction, "caps": _caps}


def make_task(name: str, n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Distinct prompts; eval rows never appear in train."""
    rng = random.Random(f"{name}-{seed}")
    rows, seen = [], set()
    for _ in range(100 * (n_train + n_eval)):
        row = _MAKERS[name](rng)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
        if len(rows) == n_train + n_eval:
            break
    if len(rows) < n_train + n_eval:
        raise ValueError(f"{name}: only {len(rows)} distinct rows possible")
    return rows[:n_train], rows[n_train:]


def write_task(name: str, out_dir: Path = TASKS_DIR, n_train: int = 320, n_eval: int = 80, seed: int = 0) -> Path:
    train, evals = make_task(name, n_train, n_eval, seed)
    d = out_dir / name
    d.mkdir(parents=True, exist_ok=True)
    for fname, rows in (("train.jsonl", train), ("eval.jsonl", evals)):
        (d / fname).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def task_paths(name: str) -> tuple[Path, Path]:
    """(train, eval) JSONL of a demo task, regenerating it when the files are missing."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    d = TASKS_DIR / name
    if not ((d / "train.jsonl").is_file() and (d / "eval.jsonl").is_file()):
        write_task(name)
    return d / "train.jsonl", d / "eval.jsonl"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=320)
    p.add_argument("--eval", type=int, default=80)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=TASKS_DIR)
    ns = p.parse_args(argv)
    for name in TASKS:
        print(write_task(name, ns.out, ns.train, ns.eval, ns.seed))


if __name__ == "__main__":
    main()
