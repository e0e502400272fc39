"""tests/margin_audit.py (the suite's near-tie audit): its margins are the right distances, and it
leaves the draws alone."""

from __future__ import annotations

import json
import math

import torch

from peftserve.server.engine.request import SamplingParams
from peftserve.server.engine.sampler import _uniform
from tests.margin_audit import MarginAudit, draw_margins, greedy_gap


def test_greedy_gap_is_best_minus_runner_up():
    assert math.isclose(greedy_gap(torch.tensor([0.5, 2.0, 1.75, -3.0])), 0.25)
    assert greedy_gap(torch.tensor([1.0])) == math.inf


def test_draw_margins_are_distances_to_the_nearest_cut():
    # probabilities 0.5, 0.25, 0.125, 0.125 (log-space): CDF edges at 0.5, 0.75, 0.875
    row = torch.tensor([0.5, 0.25, 0.125, 0.125]).log()
    m = draw_margins(row, SamplingParams(temperature=1.0), 0.70)
    assert math.isclose(m["cdf_margin"], 0.05, abs_tol=1e-6) and set(m) == {"cdf_margin"}  # in [0.5, 0.75)
    m = draw_margins(row, SamplingParams(temperature=1.0, top_k=2), 0.1)
    assert math.isclose(m["top_k_gap"], math.log(0.25) - math.log(0.125), rel_tol=1e-5)
    # top-k 2 leaves 2/3, 1/3: the draw 0.1 sits 0.1 from the lower edge of token 0
    assert math.isclose(m["cdf_margin"], 0.1, abs_tol=1e-6)
    m = draw_margins(row, SamplingParams(temperature=1.0, top_p=0.7), 0.2)
    assert math.isclose(m["top_p_margin"], 0.05, abs_tol=1e-6)  # mass before token 1 is 0.5, before 2 is 0.75


def test_record_keeps_the_smallest_margins_and_does_not_touch_the_generators(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTEST_CURRENT_TEST", "tests/x.py::test_y (call)")
    audit = MarginAudit(tmp_path / "m.jsonl")
    gen = torch.Generator().manual_seed(5)
    state = gen.get_state()
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.0, 0.1], [float("nan"), 0.0, 0.0]])
    params = [SamplingParams(), SamplingParams(), SamplingParams(temperature=1.0)]
    audit.record(logits, params, [None, None, gen])
    assert torch.equal(gen.get_state(), state)  # the engine still draws its own number
    audit.record(logits[2:3].nan_to_num(0.0), params[2:], [gen])
    audit.write()
    (line,) = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert line["test"] == "tests/x.py::test_y" and line["rows"] == 3  # the NaN row is skipped
    assert math.isclose(line["greedy_gap"], 0.1, rel_tol=1e-5)
    u = _uniform(torch.Generator().manual_seed(5))  # uniform logits: edges at 1/3, 2/3
    assert math.isclose(line["cdf_margin"], min(abs(u - e) for e in (0.0, 1 / 3, 2 / 3, 1.0)), abs_tol=1e-6)
    assert line["top_k_gap"] is None and line["top_p_margin"] is None
