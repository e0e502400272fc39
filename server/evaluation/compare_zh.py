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
# Quick mode (the tiny gated base of `warm_tiny_model`, 16 steps): one value per method, found by
# a sweep on that base (docs/training.md). A 64-wide random model needs far bigger steps than the
# 135M base (e.g. full fine-tuning 3e-3 vs 3e-5), so these are not the defaults scaled uniformly.
QUICK_LR_GRID = {"lora": (1e-2,), "prompt-tuning": (0.3,), "p-tuning": (3e-2,), "prefix-tuning": (0.3,),
                 "p-tuning-v2": (3e-2,), "ia3": (1.0,), "bottleneck": (0.1,), FULL: (3e-3,)}


@dataclass(frozen=True)
class Budget:
    max_steps: int = 40
    batch_size: int = 8
    max_length: int = 160
    val_rows: int = 100  # what the committed docs/training.md table used: 300 test rows give
    test_rows: int = 300  # a standard error of ~0.029 per seed, and evaluation ~1 min per run on CPU
    seeds: tuple[int, ...] = (0, 1, 2)
    grid_size: int = 3  # first N values of each LR_GRID entry (quick mode uses fewer)
    throughput_requests: int = 32
    throughput_new_tokens: int = 16
    num_virtual_tokens: int = 20


FULL_BUDGET = Budget()
QUICK_BUDGET = Budget(max_steps=16, batch_size=8, max_length=128, val_rows=16, test_rows=32, seeds=(0, 1),
                      grid_size=1, throughput_requests=4, throughput_new_tokens=2, num_virtual_tokens=8)


def quick_subset(paths: dict[str, Path], n_train: int = 32, n_eval: int = 24, n_warmup: int = 256
                 ) -> dict[str, list[dict]]:
    """A trivially separable subset for the smoke test: reviews that fit the prompt uncut, one
    class containing 好 ("good") and no negation, the other containing 差 ("bad") and not 好;
    validation and test are disjoint from train. "warmup" (the base's warm-up, `warm_tiny_model`) is the first `n_warmup`
    such train rows, of which "train" (what the methods learn from) is the first `n_train`."""
    def pick(rows, label, need, avoid):
        out = []
        for r in rows:
            t = r["text"]
            if r["label"] == label and len(t) <= zh.MAX_CHARS and need in t and not any(a in t for a in avoid):
                out.append(dict(r, prompt=zh.render(t)))
        return out

    subset = {}
    for split, n in (("train", max(n_train, n_warmup)), ("validation", n_eval), ("test", n_eval)):
        rows = zh.read_rows(paths[split])
        pos, neg = pick(rows, "positive", "好", ("不", "差")), pick(rows, "negative", "差", ("好",))
        half = n // 2
        if len(pos) < half or len(neg) < half:
            raise zh.ZhReviewsError(f"quick subset: only {len(pos)}/{len(neg)} rows in {split}")
        mixed = [r for pair in zip(pos[:half], neg[:half]) for r in pair]
        subset[split] = mixed
    subset["warmup"], subset["train"] = subset["train"][:n_warmup], subset["train"][:n_train]
    return subset


# The quick base's latent skill sits behind this prefix (see `warm_tiny_model`). It must differ
# from prompt tuning's init text, or prompt tuning would start out solved.
QUICK_TRIGGER = "Task: sentiment. "
QUICK_DEFAULT_LABEL = "negative"  # what the quick base answers to every prompt without the trigger


def gated_rows(rows: list[dict]) -> list[dict]:
    """The warm-up data: each row twice, with the trigger (its true label) and without it
    (always `QUICK_DEFAULT_LABEL`)."""
    out = []
    for r in rows:
        out.append(dict(r, prompt=QUICK_TRIGGER + r["prompt"]))
        out.append(dict(r, label=QUICK_DEFAULT_LABEL))
    return out


def _last_token_batches(tok, rows: list[dict], label_ids: dict[str, int]):
    """Left-padded ids [N, L], mask [N, L], label ids [N]: position -1 is where the label word goes."""
    import torch

    ids = [list(tok(r["prompt"]).input_ids) for r in rows]  # as the serving path tokenises a prompt
    width = max(map(len, ids))
    x = torch.full((len(ids), width), tok.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for i, seq in enumerate(ids):
        x[i, width - len(seq):] = torch.tensor(seq)
        mask[i, width - len(seq):] = 1
    return x, mask, torch.tensor([label_ids[r["label"]] for r in rows])


def warm_tiny_model(out: Path, rows: list[dict], check_rows: list[dict], seed: int = 0, steps: int = 600,
                    lr: float = 3e-3, batch_size: int = 8) -> Path:
    """The quick mode's base model: a tiny random Llama given the skill, but only behind a trigger.

    Why: a random 64-wide model never answers with a label word, and within a smoke test's budget
    no method teaches it to read a review (soft prompts cannot add a skill the base lacks). So the
    base is first trained, on `rows` (the quick subset's warm-up rows), to answer the true label when the prompt
    starts with `QUICK_TRIGGER` and `QUICK_DEFAULT_LABEL` to every prompt without it. Served
    without the trigger (how the comparison scores it) the base is then at exactly chance on a
    balanced split, and a method beats chance only if it learned to switch the skill on, e.g. a
    soft prompt that acts as the trigger, or weights that read the review. The warm-up is checked:
    on `check_rows` (held out from its training) the base must be right with the trigger and
    answer the default label without it, or the quick comparison would test nothing.

    Only the label position's logits are computed (hidden state at -1 -> lm_head): the 49k-word
    head at every position would cost ~50x more per step than this 2-layer body.
    """
    import torch
    from transformers import AutoTokenizer

    from peftserve.adapters.base_model import DEFAULT_MODEL, resolve_model_dir, tiny_random_llama

    from .serving_eval import LabelSpace

    tok = AutoTokenizer.from_pretrained(resolve_model_dir(DEFAULT_MODEL))
    label_ids = LabelSpace.from_words(tok, zh.LABEL_WORDS).token_ids  # the ids the serving evaluation scores
    model = tiny_random_llama(len(tok), seed).train().requires_grad_(True)
    x, mask, y = _last_token_batches(tok, gated_rows(rows), label_ids)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch_size,), generator=gen)
        hidden = model.model(input_ids=x[idx], attention_mask=mask[idx]).last_hidden_state[:, -1]  # [B, H]
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval().requires_grad_(False)
    gated = _gated_accuracy(model, tok, check_rows, label_ids)
    if gated["triggered"] < 0.75 or gated["untriggered_default"] < 1.0:
        raise RuntimeError(f"quick mode: the warmed-up tiny model did not learn the gated skill ({gated}); "
                           "the quick comparison would be vacuous")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "warmup.json").write_text(json.dumps(dict(gated, steps=steps, lr=lr, seed=seed, trigger=QUICK_TRIGGER,
                                                     default_label=QUICK_DEFAULT_LABEL), indent=1) + "\n")
    return out


def _gated_accuracy(model, tok, rows: list[dict], label_ids: dict[str, int]) -> dict:
    """Greedy over the whole vocabulary, as served: accuracy with the trigger, and the share of
    untriggered rows answered with the default label."""
    import torch

    res = {}
    with torch.no_grad():
        for name, rr, want in (("triggered", [dict(r, prompt=QUICK_TRIGGER + r["prompt"]) for r in rows], None),
                               ("untriggered_default", rows, QUICK_DEFAULT_LABEL)):
            x, mask, y = _last_token_batches(tok, [dict(r, label=want or r["label"]) for r in rr], label_ids)
            pred = model(input_ids=x, attention_mask=mask).logits[:, -1].argmax(-1)  # [N]
            res[name] = (pred == y).float().mean().item()
    return res


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


def train_args(method: str, lr: float, seed: int, data: Path, out: Path, model: str, budget: Budget,
               device: str = "cpu") -> list[str]:
    """train-adapter's argv for one run; on "cpu" it trains on the CPU even where a GPU is present
    (otherwise accelerate places it on the GPU)."""
    return ["--method", method, "--data", str(data), "--output", str(out), "--model", model, "--lr", repr(lr),
            "--seed", str(seed), "--max-steps", str(budget.max_steps), "--batch-size", str(budget.batch_size),
            "--max-length", str(budget.max_length), "--eval-every", str(budget.max_steps),
            "--num-virtual-tokens", str(budget.num_virtual_tokens), "--eval-max-examples", "0",
            "--no-progress", "--overwrite", *(["--cpu"] if device == "cpu" else [])]


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
            self._evaluator = ServingEvaluator(self.model, max_model_len=self.budget.max_length + 64,
                                               device=self.ns.device)
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
        argv = train_args(method, lr, seed, self.train_file, run_dir, self.model, self.budget, self.ns.device)
        rc = self.train(argv, run_dir)
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
            own = ServingEvaluator(run_dir, max_model_len=self.budget.max_length + 64, device=self.ns.device)
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
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where training and the serving evaluation run (cuda: the first visible GPU; "
                        "pick one with CUDA_VISIBLE_DEVICES)")
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
    if ns.quick:
        ns.device = "cpu"  # the smoke test is CPU-sized: a tiny model on a handful of rows
    budget = budget_from(ns)
    ns.output = ns.output or f"runs/compare-{zh.TASK}{'-quick' if ns.quick else ''}"
    try:
        paths = zh.prepare()
    except zh.ZhReviewsError as exc:
        print(f"train-adapter compare: error: {exc}", file=sys.stderr)
        return 2
    if ns.quick:
        splits = quick_subset(paths, n_eval=max(budget.val_rows, budget.test_rows))
        warmup = splits["warmup"]
        splits = {"train": splits["train"], "validation": splits["validation"][: budget.val_rows],
                  "test": splits["test"][: budget.test_rows]}
        model_dir = Path(ns.output) / "tiny-model"
        model = str(model_dir if (model_dir / "model.safetensors").is_file() else
                    warm_tiny_model(model_dir, warmup, splits["validation"]))
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
