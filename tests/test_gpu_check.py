"""The prepared GPU run (benchmarks/gpu_check.sh) must not rot between the sessions that have a
GPU: its smoke sizes run here on CPU, through the same shim and scripts the device machine uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_script_runs_at_smoke_sizes(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, QUICK="1", OUT=str(tmp_path))
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_quick.json").read_text())
    parity = result["parity_fp32"]
    assert parity["rows"] == parity["equal"] == 20 and parity["mismatched"] == []
    fixed = result["parity_fp32_fixed_shape"]  # "static" here: the step a GPU captures, run eagerly
    assert fixed["mode"] == "static" and fixed["rows"] == fixed["equal"] == 20 and fixed["fixed_shape_steps"] > 0
    rows = result["throughput"]
    for key in ("ours_0_loras_tok_s", "ours_32_loras_tok_s", "ours_mixed_kinds_tok_s", "ours_base_batch_16_tok_s",
                "hf_static_base_tok_s", "peft_mixed_32_loras_tok_s", "ours_0_loras_eager_tok_s",
                "ours_32_loras_eager_tok_s"):
        assert rows[key] > 0, key
    assert "errors" not in rows
    for row in ("ours_0_loras", "ours_32_loras", "ours_mixed_kinds", "ours_base_batch_16"):  # where a step goes
        split = result["step_breakdown_ms"][row]
        assert split["steps"] > 0 and split["step_ms"] >= split["host_ms"] > 0 and split["device_wait_ms"] >= 0
    floor = result["memory_floor"]  # bytes per decode step over the bandwidth measured in the same run
    assert floor["bandwidth_gb_s"] > 0 and floor["floor_tok_s"] > 0 and result["ratios"]["base_vs_memory_floor"] > 0
    assert "passed" in (tmp_path / "tests.log").read_text()
