"""benchmarks/seed_flips.py: its batched draw is the engine's, its counts are right, and it runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peftserve.server.engine.request import SamplingParams
from peftserve.server.engine.sampler import draw_tokens

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import seed_flips
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return seed_flips


def test_every_uniform_draws_what_the_engine_draws(bench):
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(6, 300, generator=g) * 3, dim=-1)
    uniforms = torch.rand(40, dtype=torch.float64, generator=g)
    got = bench.draws(probs, uniforms)  # [6, 40]
    for d, u in enumerate(uniforms):
        assert torch.equal(got[:, d], draw_tokens(probs, u.expand(6)))


def test_equal_logits_never_flip_and_a_swap_at_the_cut_is_counted(bench):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 50, generator=g)
    uniforms = torch.rand(200, dtype=torch.float64, generator=g)
    for params in (SamplingParams(), SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, top_k=3),
                   SamplingParams(temperature=0.9, top_p=0.9)):
        assert bench.flip_rate(logits, logits.clone(), params, uniforms) == (0.0, 0)
    # row 0's 3rd and 4th best logits trade places: top-k 3 keeps another token there
    order = logits[0].argsort(descending=True)
    swapped = logits.clone()
    swapped[0, order[2]], swapped[0, order[3]] = logits[0, order[3]], logits[0, order[2]]
    rate, kept = bench.flip_rate(logits, swapped, SamplingParams(temperature=1.0, top_k=3), uniforms)
    assert kept == 1 and 0 < rate < 0.25 + 1e-9  # only row 0 (a quarter of the draws) can change
    demoted = logits.clone()
    demoted[0, order[0]] = -10.0  # row 0's argmax moves, the other rows' stay
    assert bench.flip_rate(logits, demoted, SamplingParams(), uniforms) == (0.25, 0)


def test_seed_flips_runs_at_smoke_size(tmp_path):
    out = tmp_path / "flips.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "seed_flips.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["pairs"] == 32 and result["max_logit_diff"] >= 0
    assert set(result["settings"]) >= {"greedy", "temperature 1.0", "top-k 5 (T 1.0)"}
    shapes = {tuple(s["shape"]): s for s in result["row_counts"]}
    assert (49152, 64) in shapes and "lm_head" in shapes[(49152, 64)]["modules"]  # every linear shape, named
    assert all(m < 64 for s in shapes.values() for m in s["differ"])


def test_ranges_read_like_the_docs(bench):
    assert bench._ranges([1, 2, 3, 7, 9, 10]) == "1-3, 7, 9-10"
    assert bench._ranges([]) == "none"
