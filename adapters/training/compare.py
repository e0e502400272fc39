"""`peftserve train-adapter compare --task NAME`: every method, same data and step budget.

Each method trains in its own subprocess, so peak RSS is per method (ru_maxrss never goes down
within a process) and one method crashing does not stop the others. Writes
OUTPUT/comparison.md (table), OUTPUT/comparison.png (bar charts), OUTPUT/<method>/ (adapter,
report, train.log).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from .methods import METHODS
from .report import REPORT_FILE
from .tasks.generate import TASKS, task_paths

COLUMNS = ("method", "total params", "trainable params", "trainable %", "peak RSS MB", "train steps/s",
           "train tokens/s", "eval loss ex/s", "generate ex/s", "eval loss", "exact match")


def compare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peftserve train-adapter compare",
                                description="Train every method on one demo task with the same budget.")
    p.add_argument("--task", choices=TASKS, required=True)
    p.add_argument("--max-steps", type=int, default=30)
    p.add_argument("--methods", default=",".join(METHODS), help="comma list (default: all)")
    p.add_argument("--output", default=None, help="default: runs/compare-TASK")
    p.add_argument("--model", default="default")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-max-examples", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-existing", action="store_true",
                   help="reuse a method's finished report in OUTPUT instead of retraining it")
    p.add_argument("--extra", default="", help="extra train-adapter arguments, e.g. '--num-virtual-tokens 10'")
    return p


def _existing(out: Path, max_steps: int) -> dict | None:
    path = out / REPORT_FILE
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    return report if report.get("step") == max_steps and not report.get("interrupted") else None


def run_method(method: str, ns, train: Path, evals: Path, out: Path) -> dict | None:
    if ns.skip_existing and (report := _existing(out, ns.max_steps)) is not None:
        print(f"  {method}: reusing {out / REPORT_FILE}")
        return report
    cmd = [sys.executable, "-m", "peftserve.adapters.training.cli", "--method", method, "--data", str(train),
           "--eval-data", str(evals), "--max-steps", str(ns.max_steps), "--output", str(out), "--overwrite",
           "--model", ns.model, "--batch-size", str(ns.batch_size), "--eval-every", str(ns.max_steps),
           "--eval-max-examples", str(ns.eval_max_examples), "--seed", str(ns.seed), "--no-progress",
           *ns.extra.split()]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.log", "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    report = out / REPORT_FILE
    if rc != 0 or not report.is_file():
        print(f"  {method}: failed (exit {rc}), see {out / 'train.log'}", file=sys.stderr)
        return None
    return json.loads(report.read_text())


def _fmt(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def table_row(method: str, r: dict | None) -> list[str]:
    if r is None:
        return [method, "failed"] + [""] * (len(COLUMNS) - 2)
    p, s, e = r["params"], r["speed"], r["eval"] or {}
    return [method, f"{p['total']:,}", f"{p['trainable']:,}", f"{p['trainable_percent']:.3f}",
            _fmt(r["memory"]["peak_rss_mb"], ".0f"), _fmt(s["steps_per_s"], ".3f"), _fmt(s["tokens_per_s"], ".0f"),
            _fmt(e.get("eval_examples_per_s"), ".1f"), _fmt(e.get("generate_examples_per_s"), ".1f"),
            _fmt(e.get("loss"), ".4f"), _fmt(e.get("exact_match"), ".3f")]


def write_markdown(path: Path, ns, rows: list[list[str]]) -> None:
    lines = [f"# Method comparison: task `{ns.task}`", "",
             f"model `{ns.model}`, {ns.max_steps} optimizer steps, batch size {ns.batch_size}, seed {ns.seed}, "
             f"per-method default learning rates; exact match on the first {ns.eval_max_examples} eval rows.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, results: dict[str, dict | None]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = {m: r for m, r in results.items() if r is not None}
    panels = [("exact match", lambda r: (r["eval"] or {}).get("exact_match")),
              ("eval loss", lambda r: (r["eval"] or {}).get("loss")),
              ("trainable params %", lambda r: r["params"]["trainable_percent"]),
              ("train steps/s", lambda r: r["speed"]["steps_per_s"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), dpi=100)
    for ax, (title, get) in zip(axes, panels):
        ax.bar(list(ok), [get(r) or 0.0 for r in ok.values()], color="tab:blue")
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ns = compare_parser().parse_args(argv)
    methods = [m.strip() for m in ns.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        print(f"train-adapter compare: error: unknown method(s) {bad}", file=sys.stderr)
        return 2
    out = Path(ns.output or f"runs/compare-{ns.task}")
    train, evals = task_paths(ns.task)
    results = {}
    for m in methods:
        print(f"training {m} ({ns.max_steps} steps) ...", flush=True)
        results[m] = run_method(m, ns, train, evals, out / m)
    write_markdown(out / "comparison.md", ns, [table_row(m, r) for m, r in results.items()])
    plot(out / "comparison.png", results)
    print((out / "comparison.md").read_text())
    return 0 if all(r is not None for r in results.values()) else 1
