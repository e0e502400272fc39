"""benchmarks/step_overhead.py must not rot: a smoke size runs here, through the fixed-shape step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_step_overhead_benchmark_runs_at_smoke_size(tmp_path):
    out = tmp_path / "overhead.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_overhead.py"), "--batches", "4",
                           "--contexts", "8", "--new", "4", "--repeats", "1", "--metrics", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (case,) = json.loads(out.read_text())["results"]
    ms = case["ms_per_step"]
    assert case["batch"] == 4 and case["steps"] >= 3  # the decode steps after the prefill
    for phase in ("schedule", "bucket", "fill", "forward", "sample", "nonfinite", "emit", "execute", "sample_and_emit",
                  "publish"):
        assert ms[phase] > 0, phase  # every wrapped phase was reached
    assert ms["step"] >= ms["host"] > 0
