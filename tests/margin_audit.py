"""How close each of the suite's token choices came to going the other way (a pytest plugin).

Many tests compare tokens computed two ways whose logits are equal only up to rounding: the
engine against PEFT (another order of operations), a request alone against the same request in a
batch (a matmul's rows round differently with the row count, docs/openai.md "seed"), eager
against fixed-shape steps. Such a comparison is deterministic on one machine, but a CPU with
other SIMD widths rounds differently, and a choice that was a near-tie there may flip: a test
that passes here fails on CI's machine. This plugin records, for every row the engine samples in
this process, how far that choice was from flipping:

- greedy: the logit gap between the chosen token and the runner-up;
- sampled: the distance of the draw from the nearest edge of the chosen token's slice of the CDF
  (as a fraction of the total mass); where top-k cut, the gap between the k-th and the (k+1)-th
  logit; where top-p cut, the distance between top_p and the nearest mass before a token (a
  near-tie at either cut changes which tokens can be drawn at all).

    .venv/bin/python -m pytest -q -p no:cacheprovider -p tests.margin_audit tests [...]

writes `runs/margins.jsonl` (or `$PEFTSERVE_MARGIN_AUDIT`): one line per test with the smallest
margins it met, and prints the tightest tests at the end. The top-p margin is in probability
mass; the greedy and top-k gaps are in logit
units, so they compare directly with how far rounding moves logits: a batch of another size moves
the tiny test models' by up to ~5e-7, the default model's by up to ~2.4e-4 at float32 and ~1.6 at
bf16 (benchmarks/seed_flips.py), and another implementation (PEFT's forward) by similar amounts.
A gap within that reach can flip on another machine. The CDF margin is not: a boundary moves by
the logit difference times the probability mass it reshuffles, so over the tiny models'
near-uniform 49k-token distributions margins of 1e-8 are common and mostly safe; what a setting
risks per token is what benchmarks/seed_flips.py measures. Servers in other processes (uvicorn
subprocesses) are not seen.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from peftserve.server.engine import engine as engine_mod
from peftserve.server.engine.sampler import _uniform, draw_tokens, filter_logits_batch

KEYS = ("greedy_gap", "cdf_margin", "top_k_gap", "top_p_margin")


def peek_uniform(gen: torch.Generator | None) -> float:
    """The uniform the sampler is about to take from `gen`, from a copy (the stream is untouched)."""
    twin = torch.Generator()
    if gen is not None:
        twin.set_state(gen.get_state())
    return _uniform(twin)


def greedy_gap(row: torch.Tensor) -> float:
    """row [V] -> logit gap between the best and the second best token (inf for V == 1)."""
    if row.numel() < 2:
        return math.inf
    top = torch.topk(row.float(), 2).values
    return float(top[0] - top[1])


def top_k_gap(row: torch.Tensor, params) -> float | None:
    """row [V] -> the gap between its k-th and (k+1)-th logit, where `params.top_k` cuts (else None)."""
    k = params.top_k
    if not k or k >= row.numel():
        return None
    values = torch.topk(row.float(), k + 1).values
    return float(values[k - 1] - values[k])


def top_p_margin(row: torch.Tensor, params) -> float | None:
    """row [V] -> how close top_p comes to the mass before some token (most likely first, over what
    top-k kept): top-p keeps a token while that mass is below top_p. None where top-p is off."""
    if params.top_p >= 1.0:
        return None
    kept = torch.softmax(filter_logits_batch(row.float()[None], [replace(params, top_p=1.0)])[0], dim=-1)
    ordered = kept.double().sort(descending=True).values
    before = ordered.cumsum(dim=-1) - ordered  # [V]
    return float((before - params.top_p).abs().min())


def draw_margins(row: torch.Tensor, params, u: float) -> dict:
    """One sampled row: the CDF margin of the draw `u` (on the token the engine's draw takes), and
    the top-k gap and top-p margin where they cut."""
    probs = torch.softmax(filter_logits_batch(row[None], [params])[0], dim=-1)  # [V]
    token = int(draw_tokens(probs[None], torch.tensor([u], dtype=torch.float64))[0])
    cdf = probs.double().cumsum(dim=-1)
    total = float(cdf[-1])
    target = u * total
    lo = float(cdf[token - 1]) if token else 0.0
    out = {"cdf_margin": min(target - lo, float(cdf[token]) - target) / total}
    for key, value in (("top_k_gap", top_k_gap(row, params)), ("top_p_margin", top_p_margin(row, params))):
        if value is not None:
            out[key] = value
    return out


class MarginAudit:
    def __init__(self, path: Path):
        self.path = path
        self.per_test: dict[str, dict] = defaultdict(lambda: {key: math.inf for key in KEYS} | {"rows": 0})

    def record(self, logits, params, generators) -> None:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
        best = self.per_test[test]
        rows = logits.detach().float().cpu()
        for r, (p, gen) in enumerate(zip(params, generators)):
            row = rows[r]
            if not torch.isfinite(row).all():
                continue  # a poisoned row: the engine fails it, nothing is compared
            best["rows"] += 1
            found = {"greedy_gap": greedy_gap(row)} if p.greedy else draw_margins(row, p, peek_uniform(gen))
            for key, value in found.items():
                best[key] = min(best[key], value)

    def write(self) -> list[tuple[str, dict]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tests = sorted(self.per_test.items(), key=lambda kv: min(kv[1][k] for k in KEYS))
        with self.path.open("w") as f:
            for test, margins in tests:
                f.write(json.dumps({"test": test, **{k: (None if math.isinf(v) else v) for k, v in margins.items()}})
                        + "\n")
        return tests


_AUDIT: MarginAudit | None = None


def pytest_configure(config):
    global _AUDIT
    _AUDIT = MarginAudit(Path(os.environ.get("PEFTSERVE_MARGIN_AUDIT", "runs/margins.jsonl")))
    real = engine_mod.sample_step

    def audited(logits, params, generators, flags=None):
        _AUDIT.record(logits, params, generators)  # before: the draw takes the generators' next numbers
        return real(logits, params, generators, flags)

    engine_mod.sample_step = audited  # the engine looks it up at each step; tests that wrap it wrap this


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    if _AUDIT is None or not _AUDIT.per_test:
        return
    tests = _AUDIT.write()
    terminalreporter.write_sep("-", f"tightest token choices (all in {_AUDIT.path})")
    for test, m in tests[:25]:
        shown = " ".join(f"{k}={m[k]:.2e}" for k in KEYS if not math.isinf(m[k]))
        terminalreporter.write_line(f"{shown}  rows={m['rows']}  {test}")
