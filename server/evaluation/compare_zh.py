"""`train-adapter compare --task zh-reviews`: every method + full fine-tuning on real Chinese reviews.

Protocol (the same for every method, so the comparison is fair):
  * same base (`--model`), same training rows in the same order (seeded MicroBatches), same
    `--max-steps` x `--batch-size` (the same token budget), same prompt template;
  * learning rate: each method trains once per value of its grid `LR_GRID[method]` (seed 0) and
    the value with the best served accuracy on the first `--val-rows` validation rows wins (ties:
    the earlier grid value); the test split plays no part in this choice;
  * then seeds `--seeds` at that learning rate (seed 0 reused), each scored on the first
    `--test-rows` test rows through the serving engine (`serving_eval`), and its adapter's served
    throughput measured in a mixed batch (half adapter, half base requests).

Resumable: every finished training run (training_report.json with the expected step, lr, seed) and
every finished evaluation (eval-<split>.json) is reused by `--skip-existing`; results.json and
comparison.md are rewritten after every method and say PARTIAL until every method has every seed.

Full mode trains each run in its own `train-adapter` process (peak RSS per run). `--quick` (suite
smoke test) trains in-process on a tiny random model and a trivially separable subset.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from peftserve.adapters.training.methods import DEFAULT_LR, FULL, TRAIN_METHODS
from peftserve.adapters.training.report import REPORT_FILE
from peftserve.adapters.training.tasks import zh_reviews as zh

# Learning-rate grids: each method's default (tuned on the demo tasks) and x1/3, x3 around it.
LR_GRID = {m: (round(DEFAULT_LR[m] / 3, 8), DEFAULT_LR[m], round(DEFAULT_LR[m] * 3, 8)) for m in TRAIN_METHODS}
# Quick mode (tiny warmed-up model, a few steps): x3 and x10 the defaults, since a random 64-wide
# model needs bigger steps than the 135M base to move within seconds.
QUICK_LR_GRID = {m: (round(DEFAULT_LR[m] * 10, 8), round(DEFAULT_LR[m] * 3, 8)) for m in TRAIN_METHODS}


@dataclass(frozen=True)
class Budget:
    max_steps: int = 40
    batch_size: int = 8
    max_length: int = 160
    val_rows: int = 200
    test_rows: int = 500
    seeds: tuple[int, ...] = (0, 1, 2)
    grid_size: int = 3  # first N values of each LR_GRID entry (quick mode uses fewer)
    throughput_requests: int = 32
    throughput_new_tokens: int = 16
    num_virtual_tokens: int = 20


FULL_BUDGET = Budget()
QUICK_BUDGET = Budget(max_steps=6, batch_size=8, max_length=96, val_rows=8, test_rows=16, seeds=(0, 1),
                      grid_size=1, throughput_requests=4, throughput_new_tokens=2, num_virtual_tokens=8)


def quick_subset(paths: dict[str, Path], n_train: int = 32, n_eval: int = 24) -> dict[str, list[dict]]:
    """A trivially separable subset for the smoke test: short reviews, one class containing 好
    ("good") and no negation, the other containing 差 ("bad") and not 好; validation and test are
    disjoint from train. Separable by one character, so a tiny random model learns it in seconds."""
    def pick(rows, label, need, avoid):
        out = []
        for r in rows:
            t = r["text"]
            if r["label"] == label and len(t) <= 30 and need in t and not any(a in t for a in avoid):
                out.append(dict(r, prompt=zh.render(t)))
        return out

    subset = {}
    for split, n in (("train", n_train), ("validation", n_eval), ("test", n_eval)):
        rows = zh.read_rows(paths[split])
        pos, neg = pick(rows, "positive", "好", ("不", "差")), pick(rows, "negative", "差", ("好",))
        half = n // 2
        if len(pos) < half or len(neg) < half:
            raise zh.ZhReviewsError(f"quick subset: only {len(pos)}/{len(neg)} rows in {split}")
        mixed = [r for pair in zip(pos[:half], neg[:half]) for r in pair]
        subset[split] = mixed
    return subset


def warm_tiny_model(out: Path, rows: list[dict], budget: Budget, seed: int = 0) -> Path:
    """The quick mode's base model: a tiny random Llama, fully fine-tuned on the quick train rows
    with SHUFFLED labels. Why: a random model over a 49k vocabulary never greedily emits a label
    word, so every method would score 0 whatever it learned. After this warm-up the base answers
    with a label word, but at chance (the labels it saw carried no signal), so each method still
    has to learn the real mapping for the "beats chance" check to pass."""
    from peftserve.adapters.base_model import save_tiny_model_dir

    raw = save_tiny_model_dir(out.parent / "tiny-random", seed=seed)
    rng = random.Random(seed)
    data = out.parent / "data" / "warmup-shuffled-labels.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(dict(r, completion=rng.choice(list(zh.LABEL_WORDS.values()))),
                                       ensure_ascii=False) + "\n" for r in rows))
    argv = train_args(FULL, 3e-3, seed, data, out, str(raw), Budget(**{**asdict(budget), "max_steps": 30}))
    if train_inprocess(argv, out) != 0:
        raise RuntimeError(f"quick mode: warming up the tiny model failed (see {out})")
    for sub in ("last", "best"):
        shutil.rmtree(out / sub, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------- runs


def run_name(method: str, lr: float, seed: int) -> str:
    return f"{method}/lr{lr:g}-s{seed}"


def finished_report(run_dir: Path, budget: Budget, lr: float, seed: int) -> dict | None:
    path = run_dir / REPORT_FILE
    if not path.is_file():
        return None
    r = json.loads(path.read_text())
    h = r.get("hyperparameters", {})
    ok = (r.get("step") == budget.max_steps and not r.get("interrupted") and h.get("seed") == seed
          and abs(h.get("lr", -1) - lr) < 1e-12 and h.get("batch_size") == budget.batch_size)
    return r if ok else None


def train_args(method: str, lr: float, seed: int, data: Path, out: Path, model: str, budget: Budget) -> list[str]:
    return ["--method", method, "--data", str(data), "--output", str(out), "--model", model, "--lr", repr(lr),
            "--seed", str(seed), "--max-steps", str(budget.max_steps), "--batch-size", str(budget.batch_size),
            "--max-length", str(budget.max_length), "--eval-every", str(budget.max_steps),
            "--num-virtual-tokens", str(budget.num_virtual_tokens), "--eval-max-examples", "0",
            "--no-progress", "--overwrite", "--cpu"]


def train_subprocess(argv: list[str], out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.log", "w") as log:
        return subprocess.call([sys.executable, "-m", "peftserve.adapters.training.cli", *argv],
                               stdout=log, stderr=subprocess.STDOUT)


def train_inprocess(argv: list[str], out: Path) -> int:
    from peftserve.adapters.training.cli import run_train

    out.mkdir(parents=True, exist_ok=True)
    return run_train(argv)


def artifact_bytes(run_dir: Path) -> int:
    """What a deployment stores: the adapter files, or the whole model for full fine-tuning."""
    names = ("adapter_config.json", "adapter_model.safetensors", "config.json", "model.safetensors",
             "generation_config.json")
    return sum((run_dir / n).stat().st_size for n in names if (run_dir / n).is_file())


# ----------------------------------------------------------------------------- the comparison


class Comparison:
    def __init__(self, ns: argparse.Namespace, budget: Budget, splits: dict[str, list[dict]], model: str):
        self.ns, self.budget, self.model = ns, budget, model
        self.out = Path(ns.output)
        self.out.mkdir(parents=True, exist_ok=True)
        self.splits = splits
        (self.out / "data").mkdir(parents=True, exist_ok=True)
        for name, rows in ({} if ns.report_only else splits).items():  # exactly the rows this comparison used
            (self.out / "data" / f"{name}.jsonl").write_text(
                "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        self.train_file = self.out / "data" / "train.jsonl"
        self.train = train_inprocess if ns.quick else train_subprocess
        self._evaluator = None
        self.labels = None
        self.trained: set[Path] = set()  # runs trained by this invocation

    # -- helpers
    def log(self, **event) -> None:
        event["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with open(self.out / "progress.jsonl", "a") as f:
            f.write(json.dumps(event) + "\n")
        print(json.dumps(event), flush=True)

    def evaluator(self):
        from .serving_eval import LabelSpace, ServingEvaluator

        if self._evaluator is None:
            self._evaluator = ServingEvaluator(self.model, max_model_len=self.budget.max_length + 64)
            self.labels = LabelSpace.from_words(self._evaluator.tokenizer, zh.LABEL_WORDS)
        return self._evaluator

    def ensure_trained(self, method: str, lr: float, seed: int) -> dict | None:
        run_dir = self.out / "runs" / run_name(method, lr, seed)
        reuse = self.ns.skip_existing or self.ns.report_only or run_dir in self.trained  # seed 0 is reused
        if reuse and (r := finished_report(run_dir, self.budget, lr, seed)) is not None:
            return r
        if self.ns.report_only:
            return None
        self.trained.add(run_dir)
        t0 = time.perf_counter()
        rc = self.train(train_args(method, lr, seed, self.train_file, run_dir, self.model, self.budget), run_dir)
        seconds = time.perf_counter() - t0
        report = finished_report(run_dir, self.budget, lr, seed)
        self.log(event="train", run=run_name(method, lr, seed), rc=rc, seconds=round(seconds, 1),
                 ok=report is not None)
        if report is not None and not self.ns.keep_checkpoints:
            for sub in ("last", "best"):  # resumable checkpoints; full fine-tuning's are ~2 GB each
                shutil.rmtree(run_dir / sub, ignore_errors=True)
        return report

    def ensure_eval(self, method: str, lr: float, seed: int, split: str, throughput: bool) -> dict | None:
        run_dir = self.out / "runs" / run_name(method, lr, seed)
        path = run_dir / f"eval-{split}.json"
        rows = self.splits[split]
        if (self.ns.skip_existing or self.ns.report_only) and path.is_file():
            done = json.loads(path.read_text())
            if done.get("n") == len(rows) and (done.get("throughput") or not throughput or method == FULL):
                return done
        if self.ns.report_only:
            return None
        t0 = time.perf_counter()
        result = self._evaluate(method, run_dir, rows, split, throughput)
        result["eval_seconds"] = round(time.perf_counter() - t0, 1)
        path.write_text(json.dumps(result, indent=1) + "\n")
        self.log(event="eval", run=run_name(method, lr, seed), split=split, accuracy=result["accuracy"],
                 seconds=result["eval_seconds"])
        return result

    def _evaluate(self, method: str, run_dir: Path, rows: list[dict], split: str, throughput: bool) -> dict:
        from .serving_eval import ServingEvaluator

        ev = self.evaluator()
        if method == FULL:  # a whole model, not an adapter: it is the base of its own engine
            own = ServingEvaluator(run_dir, max_model_len=self.budget.max_length + 64)
            try:
                result = own.classify(rows, self.labels, None, progress=None if self.ns.quick else split)
            finally:
                own.close()
            result["throughput"] = None
            return result
        name = str(run_dir.relative_to(self.out / "runs")).replace("/", "--").replace(".", "_")
        ev.add_adapter(run_dir, name)
        result = ev.classify(rows, self.labels, name, progress=None if self.ns.quick else split)
        if throughput:
            prompts = [r["prompt"] for r in rows]
            b = self.budget
            result["throughput"] = ev.mixed_throughput(name, prompts, requests=b.throughput_requests,
                                                       new_tokens=b.throughput_new_tokens)
        return result

    def base_reference(self) -> dict:
        """The untrained base model through the same engine (zero-shot), and its throughput."""
        path = self.out / "base-eval-test.json"
        if (self.ns.skip_existing or self.ns.report_only) and path.is_file():
            done = json.loads(path.read_text())
            if done.get("n") == len(self.splits["test"]):
                return done
        ev = self.evaluator()
        result = ev.classify(self.splits["test"], self.labels, None, progress=None if self.ns.quick else "base")
        b = self.budget
        result["throughput"] = ev.mixed_throughput(None, [r["prompt"] for r in self.splits["test"]],
                                                   requests=b.throughput_requests, new_tokens=b.throughput_new_tokens)
        path.write_text(json.dumps(result, indent=1) + "\n")
        return result

    def method(self, method: str) -> dict:
        grid = (QUICK_LR_GRID if self.ns.quick else LR_GRID)[method][: self.budget.grid_size]
        search = []
        for lr in grid:
            rep = self.ensure_trained(method, lr, 0)
            ev = self.ensure_eval(method, lr, 0, "validation", False) if rep else None
            search.append({"lr": lr, "val_accuracy": ev and ev["accuracy"]})
        scored = [s for s in search if s["val_accuracy"] is not None]
        if not scored or len(scored) < len(grid) and self.ns.report_only:  # the choice is not made yet
            return {"method": method, "grid": list(grid), "search": search, "seeds": [], "failed": True}
        best = max(scored, key=lambda s: s["val_accuracy"])["lr"]  # max keeps the first of equals
        seeds = []
        for seed in self.budget.seeds:
            rep = self.ensure_trained(method, best, seed)
            if rep is None:
                continue
            ev = self.ensure_eval(method, best, seed, "test", True)
            if ev is None:  # --report-only and not evaluated yet
                continue
            run_dir = self.out / "runs" / run_name(method, best, seed)
            seeds.append({"seed": seed, "test_accuracy": ev["accuracy"], "off_label": ev["off_label"],
                          "served_requests_per_s": ev["requests_per_s"], "throughput": ev.get("throughput"),
                          "params": rep["params"], "tokens_per_s": rep["speed"]["tokens_per_s"],
                          "train_time_s": rep["speed"]["train_time_s"], "peak_rss_mb": rep["memory"]["peak_rss_mb"],
                          "artifact_bytes": artifact_bytes(run_dir)})
        return {"method": method, "grid": list(grid), "search": search, "lr": best, "seeds": seeds,
                "failed": len(seeds) < len(self.budget.seeds)}


def recorded_seconds(out: Path, base: dict) -> float:
    """Compute time spent so far according to progress.jsonl (every run and evaluation) + the base eval."""
    path = out / "progress.jsonl"
    events = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return sum(e.get("seconds", 0.0) for e in events) + base.get("seconds", 0.0)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train-adapter compare --task zh-reviews",
                                description="Every method + full fine-tuning on zh-reviews, evaluated through "
                                            "the serving engine (see docs/training.md).")
    p.add_argument("--task", choices=(zh.TASK,), default=zh.TASK)
    p.add_argument("--output", help=f"default: runs/compare-{zh.TASK} (quick: runs/compare-{zh.TASK}-quick)")
    p.add_argument("--model", default="default")
    p.add_argument("--methods", default=",".join(TRAIN_METHODS))
    p.add_argument("--quick", action="store_true", help="tiny random model + trivially separable subset (smoke test)")
    p.add_argument("--skip-existing", action="store_true", help="reuse finished runs and evaluations in OUTPUT")
    p.add_argument("--report-only", action="store_true",
                   help="train and evaluate nothing: rebuild the (possibly PARTIAL) report from OUTPUT")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each run's last/ and best/")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--val-rows", type=int)
    p.add_argument("--test-rows", type=int)
    p.add_argument("--seeds", help="comma list (default 0,1,2)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    return p


def budget_from(ns) -> Budget:
    b = QUICK_BUDGET if ns.quick else FULL_BUDGET
    over = {k: v for k, v in (("max_steps", ns.max_steps), ("val_rows", ns.val_rows),
                              ("test_rows", ns.test_rows)) if v is not None}
    if ns.seeds:
        over["seeds"] = tuple(int(s) for s in ns.seeds.split(","))
    return Budget(**{**asdict(b), **over})


def main(argv: list[str] | None = None) -> int:
    from . import zh_report

    ns = parser().parse_args(argv)
    methods = [m.strip() for m in ns.methods.split(",") if m.strip()]
    if bad := [m for m in methods if m not in TRAIN_METHODS]:
        print(f"train-adapter compare: error: unknown method(s) {bad}", file=sys.stderr)
        return 2
    if ns.threads:
        import torch

        torch.set_num_threads(ns.threads)
    budget = budget_from(ns)
    ns.output = ns.output or f"runs/compare-{zh.TASK}{'-quick' if ns.quick else ''}"
    try:
        paths = zh.prepare()
    except zh.ZhReviewsError as exc:
        print(f"train-adapter compare: error: {exc}", file=sys.stderr)
        return 2
    if ns.quick:
        splits = quick_subset(paths, n_eval=max(budget.val_rows, budget.test_rows))
        splits = {"train": splits["train"], "validation": splits["validation"][: budget.val_rows],
                  "test": splits["test"][: budget.test_rows]}
        model_dir = Path(ns.output) / "tiny-model"
        model = str(model_dir if (model_dir / "model.safetensors").is_file() else
                    warm_tiny_model(model_dir, splits["train"], budget))
    else:
        splits = {"train": zh.read_rows(paths["train"]), "validation": zh.read_rows(paths["validation"], budget.val_rows),
                  "test": zh.read_rows(paths["test"], budget.test_rows)}
        model = ns.model
    cmp = Comparison(ns, budget, splits, model)
    t0 = time.perf_counter()
    base = cmp.base_reference()
    results = {}
    for m in methods:
        results[m] = cmp.method(m)
        elapsed = recorded_seconds(cmp.out, base) if ns.report_only else time.perf_counter() - t0
        zh_report.write(cmp.out, ns, budget, base, results, methods, elapsed,
                        json.loads((paths["train"].parent / "meta.json").read_text()))
    print((cmp.out / "comparison.md").read_text())
    return 0 if all(not r.get("failed") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
