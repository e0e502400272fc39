"""training_report.json and loss_curve.png."""

from __future__ import annotations

import enum
import json
import math
import resource
import sys
from pathlib import Path

import torch

REPORT_FILE = "training_report.json"
PLOT_FILE = "loss_curve.png"


def peak_memory_mb() -> dict[str, float | None]:
    """Peak resident memory of this process (the whole process: base model + training), and peak
    CUDA allocation when on GPU. ru_maxrss is KiB on Linux, bytes on macOS."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mb = rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"peak_rss_mb": round(rss_mb, 1), "peak_gpu_mb": None if gpu is None else round(gpu, 1)}


def _json_default(obj):
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def _finite(x):
    """JSON has no NaN: map non-finite floats to null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def write_report(out_dir: Path, report: dict) -> Path:
    path = Path(out_dir) / REPORT_FILE
    path.write_text(json.dumps(_finite(report), indent=2, default=_json_default) + "\n")
    return path


def plot_loss(out_dir: Path, history: dict, title: str) -> Path | None:
    """Train loss per step (line) and eval loss (markers). Skipped when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on servers / CI
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if history.get("train"):
        steps, losses = zip(*history["train"])
        ax.plot(steps, losses, label="train", linewidth=1)
    if history.get("eval"):
        steps, losses = zip(*history["eval"])
        ax.plot(steps, losses, "o-", label="eval")
    ax.set(xlabel="optimizer step", ylabel="loss (completion tokens)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(out_dir) / PLOT_FILE
    fig.savefig(path)
    plt.close(fig)
    return path
