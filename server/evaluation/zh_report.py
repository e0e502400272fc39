"""results.json, comparison.md and comparison.png for the zh-reviews comparison.

Every figure comes from the run directories' reports and eval files; nothing is typed in except
the source table (the published numbers we compare against), which is labelled as such. A run
that has not finished every method and seed is written as PARTIAL, in the file name's heading
and in results.json (`complete: false`), so it is never mistaken for the result.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict
from pathlib import Path

# The source material's table (ChnSentiCorp accuracy); methods it does not list are absent.
SOURCE_TABLE = {"lora": 0.898, "p-tuning": 0.846, "prefix-tuning": 0.762, "prompt-tuning": 0.704, "full": 0.694}

COLUMNS = ("method", "test acc (mean ± std)", "seeds", "source table", "chosen lr", "trainable params",
           "trainable %", "train tokens/s", "peak RSS MB", "size on disk", "served tok/s (mixed)")


def _mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.0f} KB"


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarise(r: dict) -> dict:
    """One method's row. Speeds are medians over the seeds: the seeds' runs and probes are the same
    computation on same-shaped weights, so they are repeats of one measurement, and a median keeps
    one run slowed by another job on the machine from moving the figure (a mean would not)."""
    s = r["seeds"]
    acc, std = _mean_std([x["test_accuracy"] for x in s])
    thr = [x["throughput"]["generated_tokens_per_s"] for x in s if x.get("throughput")]
    first = s[0] if s else None
    return {"method": r["method"], "test_accuracy_mean": acc, "test_accuracy_std": std, "n_seeds": len(s),
            "lr": r.get("lr"), "trainable": first and first["params"]["trainable"],
            "trainable_percent": first and first["params"]["trainable_percent"],
            "tokens_per_s": _median([x["tokens_per_s"] for x in s if x["tokens_per_s"]]),
            "peak_rss_mb": max((x["peak_rss_mb"] for x in s), default=None),
            "artifact_bytes": first and first["artifact_bytes"],
            "served_tokens_per_s_mixed": _median(thr), "source": SOURCE_TABLE.get(r["method"])}


def row(s: dict) -> list[str]:
    def f(x, spec):
        return "n/a" if x is None else format(x, spec)

    acc = "n/a" if s["test_accuracy_mean"] is None else (
        f"{s['test_accuracy_mean']:.3f}" + (f" ± {s['test_accuracy_std']:.3f}" if s["test_accuracy_std"] is not None
                                            else ""))
    served = "not an adapter" if s["method"] == "full" else f(s["served_tokens_per_s_mixed"], ".1f")
    return [s["method"], acc, str(s["n_seeds"]), f(s["source"], ".3f"), f(s["lr"], "g"),
            f(s["trainable"], ","), f(s["trainable_percent"], ".3f"), f(s["tokens_per_s"], ".0f"),
            f(s["peak_rss_mb"], ".0f"), "n/a" if not s["artifact_bytes"] else _size(s["artifact_bytes"]), served]


def markdown(ns, budget, base: dict, summaries: list[dict], results: dict, complete: bool, elapsed_s: float,
             meta: dict, n_methods: int) -> str:
    state = "complete" if complete else (f"PARTIAL ({sum(len(r['seeds']) == len(budget.seeds) for r in results.values())}"
                                         f" of {n_methods} methods finished) — not the result")
    b = budget
    lines = [f"# Method comparison on `zh-reviews` ({'quick smoke test, figures mean nothing' if ns.quick else state})",
             "",
             f"model `{'tiny random (quick)' if ns.quick else ns.model}`; {b.max_steps} optimizer steps × batch "
             f"{b.batch_size} for every method (same rows, same order); learning rate per method picked on the "
             f"first {b.val_rows} validation rows from its grid; seeds {list(b.seeds)}; "
             f"test accuracy = served greedy label word on the first {b.test_rows} test rows; "
             f"chance (majority class) {base['majority']:.3f}; base model zero-shot {base['accuracy']:.3f} "
             f"({base['off_label']} of {base['n']} answers were neither label word). Wall time so far "
             f"{elapsed_s / 60:.1f} min.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(s)) + " |" for s in summaries]
    lines += ["", "Learning-rate search (validation accuracy, seed 0):", "",
              "| method | " + " | ".join(f"lr {i + 1}" for i in range(b.grid_size)) + " | chosen |",
              "|---|" + "---|" * (b.grid_size + 1)]
    for m, r in results.items():
        cells = [f"{s['lr']:g}: " + ("n/a" if s["val_accuracy"] is None else f"{s['val_accuracy']:.3f}")
                 for s in r["search"]]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {r.get('lr', 'n/a')} |")
    base_thr = (base.get("throughput") or {}).get("generated_tokens_per_s")
    lines += ["", f"Served tok/s (mixed): {b.throughput_requests} requests × {b.throughput_new_tokens} new tokens "
                  f"submitted at once, every other one with the adapter, the rest on the base model; the base "
                  f"model alone measured {base_thr:.1f} tok/s in the same process. Train tokens/s and served "
                  f"tok/s are medians over the seeds." if base_thr else "",
              f"Data: {meta.get('kept')} reviews after de-duplication, splits {meta.get('splits')}."]
    return "\n".join(lines) + "\n"


def plot(path: Path, summaries: list[dict], chance: float, complete: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s["method"] for s in summaries]
    ours = [s["test_accuracy_mean"] or 0.0 for s in summaries]
    err = [s["test_accuracy_std"] or 0.0 for s in summaries]
    src = [s["source"] for s in summaries]
    x = range(len(names))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), dpi=100)
    ax.bar([i - 0.2 for i in x], ours, 0.4, yerr=err, capsize=3, label="ours (zh-reviews, served)")
    ax.bar([i + 0.2 for i in x], [v or 0.0 for v in src], 0.4, label="source table (ChnSentiCorp)")
    ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label="majority class")
    ax.set_xticks(list(x), names, rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.set_title("test accuracy")
    ax.legend(fontsize=8, loc="lower right")
    served = [(s["method"], s["served_tokens_per_s_mixed"]) for s in summaries if s["served_tokens_per_s_mixed"]]
    ax2.bar([m for m, _ in served], [v for _, v in served], color="tab:green")
    ax2.set_title("served tokens/s, mixed batch")
    ax2.tick_params(axis="x", rotation=45)
    if not complete:
        fig.suptitle("PARTIAL — not the result (missing bars = not run yet)", color="tab:red")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write(out: Path, ns, budget, base: dict, results: dict, methods: list[str], elapsed_s: float,
          meta: dict) -> dict:
    labels = [p["label"] for p in base["predictions"]]
    base = dict(base, majority=max(labels.count(x) for x in set(labels)) / len(labels))
    summaries = [summarise(r) for r in results.values()]
    complete = len(results) == len(methods) and all(len(r["seeds"]) == len(budget.seeds) for r in results.values())
    doc = {"complete": complete, "quick": ns.quick, "budget": asdict(budget), "model": ns.model,
           "elapsed_s": elapsed_s, "base": {k: v for k, v in base.items() if k != "predictions"},
           "summary": summaries, "runs": results, "source_table": SOURCE_TABLE, "data": meta}
    (out / "results.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    (out / "comparison.md").write_text(markdown(ns, budget, base, summaries, results, complete, elapsed_s, meta,
                                                len(methods)))
    plot(out / "comparison.png", summaries, base["majority"], complete)
    return doc
