"""benchmarks/decode_modes.py must not rot: its smoke size runs here (both modes, one LoRA)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_decode_modes_benchmark_runs_at_smoke_size(tmp_path):
    out = tmp_path / "modes.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode_modes.py"), "--quick", "--dtype", "float32",
                           "--loras", "1", "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["tok_s"]["dynamic"] > 0 and result["tok_s"]["static"] > 0
    assert result["fixed_steps"] > 0  # the static runs did take fixed-shape steps
