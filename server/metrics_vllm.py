"""vLLM's metric names, alongside our `peftserve_*` ones, so vLLM dashboards and routers work unchanged.

The Kubernetes Gateway API Inference Extension reads `vllm:num_requests_waiting`,
`vllm:kv_cache_usage_perc` (older releases: `vllm:gpu_cache_usage_perc`) and
`vllm:lora_requests_info{running_lora_adapters, waiting_lora_adapters, max_lora}` (value = the
scrape time; the newest sample wins); vLLM's Grafana dashboard reads the latency histograms and
token counters below, all labelled `model_name` (the first `--served-model-name`).

Same data as the `peftserve_*` series (fed by the same engine callbacks, read from the same
engine snapshot at scrape time): only the names and the `model_name` label differ. Off with
`--no-vllm-metric-names`.
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .metrics_adapters import lora_info_labels
from .metrics_batch import BatchedHistogram, Tally

SUCCESS_REASONS = ("length", "stop", "eos")


class VllmMetrics:
    """vLLM-named histograms/counters (fed through `Metrics`) + gauges from the engine snapshot."""

    def __init__(self, registry, ttft_buckets, itl_buckets, latency_buckets):
        r = registry
        self.model_name = ""
        lbl = ["model_name"]
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", lbl,
                              buckets=ttft_buckets, registry=r)
        self.itl = BatchedHistogram("vllm:inter_token_latency_seconds", "Inter-token latency.", itl_buckets, lbl,
                                    registry=r)
        self.tpot = BatchedHistogram("vllm:time_per_output_token_seconds", "Time per output token (older vLLM name).",
                                     itl_buckets, lbl, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency.", lbl,
                             buckets=latency_buckets, registry=r)
        self.queue = Histogram("vllm:request_queue_time_seconds", "Time waiting before first scheduling.", lbl,
                               buckets=latency_buckets, registry=r)
        self.prefill = Histogram("vllm:request_prefill_time_seconds", "First scheduling to first token.", lbl,
                                 buckets=latency_buckets, registry=r)
        self.decode = Histogram("vllm:request_decode_time_seconds", "First to last token.", lbl,
                                buckets=latency_buckets, registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefilled prompt tokens.", lbl, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens.", lbl, registry=r)
        self.success = Counter("vllm:request_success", "Finished requests.", ["model_name", "finished_reason"],
                               registry=r)
        self.state = None
        r.register(_Collector(self))

    def bind(self, state, model_name: str) -> None:
        self.state, self.model_name = state, model_name
        for reason in SUCCESS_REASONS:  # zeros from the first scrape, so rate() works
            self.success.labels(model_name=model_name, finished_reason=_reason(reason))

    # engine thread (called by Metrics, the EngineObserver)
    def on_first_token(self, seq, now: float) -> None:
        m = self.model_name
        self.ttft.labels(model_name=m).observe(max(0.0, now - seq.arrival))
        self.prompt_tokens.labels(model_name=m).inc(len(seq.prompt_ids))

    def on_tokens(self, n: int, gaps: Tally) -> None:
        """A step's `n` generated tokens and their inter-token gaps (the first tokens have none),
        bucketed by the ITL buckets."""
        m = (self.model_name,)
        self.generation_tokens.labels(*m).inc(n)
        self.itl.add(gaps, m)
        self.tpot.add(gaps, m)

    def on_finish(self, seq, reason: str, now: float) -> None:
        m = self.model_name
        self.success.labels(model_name=m, finished_reason=_reason(reason)).inc()
        self.e2e.labels(model_name=m).observe(max(0.0, now - seq.arrival))
        if seq.first_scheduled is not None:
            self.queue.labels(model_name=m).observe(max(0.0, seq.first_scheduled - seq.arrival))
            if seq.first_token_at is not None:
                self.prefill.labels(model_name=m).observe(max(0.0, seq.first_token_at - seq.first_scheduled))
        if seq.first_token_at is not None and seq.last_token_at is not None:
            self.decode.labels(model_name=m).observe(max(0.0, seq.last_token_at - seq.first_token_at))


def _reason(reason: str) -> str:
    """vLLM's finished_reason values: stop (EOS and stop strings) and length."""
    return "length" if reason == "length" else "stop"


class _Collector:
    """vLLM's scrape-time gauges, from the bound state's engine snapshot (nothing until bound)."""

    def __init__(self, owner: VllmMetrics):
        self.owner = owner

    def describe(self):
        return []

    def collect(self):
        state, m = self.owner.state, self.owner.model_name
        if state is None:
            return []
        engine = state.engine
        snap = engine.snapshot  # one consistent state, published by the engine thread
        kv = snap.kv_usage
        out = []
        for name, doc, value in (
                ("vllm:num_requests_running", "Requests running (hold KV blocks).", snap.running),
                # the snapshot's queue + submissions not drained into it yet
                ("vllm:num_requests_waiting", "Requests waiting to be scheduled.", engine.num_waiting),
                ("vllm:kv_cache_usage_perc", "KV-cache usage (0..1).", kv),
                ("vllm:gpu_cache_usage_perc", "KV-cache usage (0..1), older vLLM name.", kv)):
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric([m], value)
            out.append(g)
        max_lora = snap.adapter_slots_total if snap.adapter_slots_total is not None else snap.max_adapters_per_batch
        info = GaugeMetricFamily("vllm:lora_requests_info", "Running/waiting adapters (value: scrape time).",
                                 labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
        info.add_metric(lora_info_labels(snap, max_lora), time.time())
        out.append(info)
        preempt = CounterMetricFamily("vllm:num_preemptions", "Requests preempted (KV cache full).", labels=["model_name"])
        preempt.add_metric([m], snap.preemptions)
        out.append(preempt)
        return out
