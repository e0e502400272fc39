"""Writes deploy/grafana/peftserve.json (run: python deploy/grafana/make_dashboard.py).

The dashboard is generated so every panel has the same shape and datasource; tests/test_deploy.py
checks that every metric a panel queries is exported by a live server's /metrics.
"""

from __future__ import annotations

import json
from pathlib import Path

DS = {"type": "prometheus", "uid": "${datasource}"}


def q(expr: str, legend: str) -> dict:
    return {"expr": expr, "legendFormat": legend, "datasource": DS}


def quantiles(metric: str, by: str = "") -> list[dict]:
    group = f"le{', ' + by if by else ''}"
    suffix = f" {{{{{by}}}}}" if by else ""
    return [q(f"histogram_quantile({p}, sum by ({group}) (rate({metric}_bucket[$__rate_interval])))", f"p{int(p * 100)}{suffix}")
            for p in (0.5, 0.9, 0.99)]


PANELS = [  # (title, unit, targets)
    ("Time to first token", "s", quantiles("peftserve_time_to_first_token_seconds")),
    ("Inter-token latency", "s", quantiles("peftserve_inter_token_latency_seconds")),
    ("End-to-end latency", "s", quantiles("peftserve_e2e_request_latency_seconds")),
    ("Queue time", "s", quantiles("peftserve_request_queue_time_seconds")),
    ("Throughput (tokens/s)", "short", [q("sum(rate(peftserve_generation_tokens_total[$__rate_interval]))", "generated"),
                                        q("sum(rate(peftserve_prompt_tokens_total[$__rate_interval]))", "prompt")]),
    ("Requests running / waiting", "short", [q("sum(peftserve_num_requests_running)", "running"),
                                              q("sum(peftserve_num_requests_waiting)", "waiting")]),
    ("Request outcomes (req/s)", "reqps", [
        q("sum by (finished_reason) (rate(peftserve_request_success_total[$__rate_interval]))", "{{finished_reason}}"),
        q("sum by (reason) (rate(peftserve_request_failure_total[$__rate_interval]))", "failed: {{reason}}")]),
    ("HTTP status (req/s)", "reqps", [q("sum by (status) (rate(peftserve_requests_total[$__rate_interval]))", "{{status}}")]),
    ("TTFT p90 per adapter", "s", [quantiles("peftserve_time_to_first_token_seconds", "adapter")[1]]),
    ("E2E p90 per adapter", "s", [quantiles("peftserve_e2e_request_latency_seconds", "adapter")[1]]),
    ("Adapter loads / evictions (per s)", "short", [
        q("sum by (kind) (rate(peftserve_adapter_loads_total[$__rate_interval]))", "loads {{kind}}"),
        q("sum(rate(peftserve_adapter_evictions_total[$__rate_interval]))", "evictions")]),
    ("Adapters resident per tier", "short", [q("sum by (tier) (peftserve_adapters_resident)", "{{tier}}"),
                                             q("sum(peftserve_adapters_registered)", "registered")]),
    ("Adapter host memory", "bytes", [q("sum(peftserve_adapter_memory_bytes)", "used"),
                                      q("sum(peftserve_adapter_memory_budget_bytes)", "budget")]),
    ("KV cache in use", "percentunit", [q("avg(peftserve_kv_cache_usage_perc)", "KV slots in use")]),
    ("Engine step time", "s", quantiles("peftserve_engine_step_seconds")),
    ("Engine health / restarts", "short", [q("min(peftserve_engine_healthy)", "healthy"),
                                           q("sum(increase(peftserve_engine_restarts_total[$__range]))", "restarts")]),
]


def panel(i: int, title: str, unit: str, targets: list[dict]) -> dict:
    return {"id": i + 1, "type": "timeseries", "title": title, "datasource": DS,
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
            "targets": [{**t, "refId": chr(ord("A") + j)} for j, t in enumerate(targets)]}


def dashboard() -> dict:
    return {
        "uid": "peftserve", "title": "peftserve", "schemaVersion": 39, "version": 1, "editable": True,
        "time": {"from": "now-1h", "to": "now"}, "refresh": "10s", "tags": ["peftserve", "llm"],
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                                 "label": "Prometheus"}]},
        "panels": [panel(i, *p) for i, p in enumerate(PANELS)],
    }


if __name__ == "__main__":
    out = Path(__file__).with_name("peftserve.json")
    out.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {out}")
