"""Adapter metrics: tier residency, loads/evictions, uploads, and vLLM's `lora_requests_info`.

`peftserve_lora_requests_info{running_lora_adapters, waiting_lora_adapters, max_lora}` mirrors
`vllm:lora_requests_info` (value = scrape timestamp), which LoRA-affinity routers such as the
Kubernetes Gateway API Inference Extension read.

Live state comes from the registry's own thread-safe accessors and from the engine's published
snapshot (device residency, running/waiting adapters), never from the engine thread's structures.
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LOAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BYTES_BUCKETS = tuple(float(1 << k) for k in range(10, 31, 2))


class AdapterMetrics:
    """The adapter series: event counters (fed through `Metrics`) + a scrape-time collector."""

    def __init__(self, registry):
        r = registry
        self.loads = Counter("peftserve_adapter_loads", "Adapters loaded into a device slot.", ["kind"], registry=r)
        self.load_seconds = Histogram("peftserve_adapter_load_seconds", "Time to install an adapter in a device slot.",
                                      ["kind"], buckets=LOAD_BUCKETS, registry=r)
        self.evictions = Counter("peftserve_adapter_evictions", "Adapters evicted from device slots.", registry=r)
        self.uploads = Counter("peftserve_adapter_uploads", "Adapter uploads by result.", ["result", "reason"],
                               registry=r)
        self.upload_bytes = Histogram("peftserve_adapter_upload_bytes", "Size of accepted adapter uploads.",
                                      buckets=BYTES_BUCKETS, registry=r)
        self.upload_seconds = Histogram("peftserve_adapter_upload_seconds", "Upload handling time once the body has arrived (parse, validate, store).",
                                        buckets=LOAD_BUCKETS, registry=r)
        self.state = None
        r.register(_AdapterCollector(self))

    # engine thread
    def on_adapter_load(self, adapter, seconds: float) -> None:
        kind = getattr(adapter.kind, "value", str(adapter.kind))
        self.loads.labels(kind=kind).inc()
        self.load_seconds.labels(kind=kind).observe(seconds)

    def on_adapter_evict(self) -> None:
        self.evictions.inc()

    # API
    def adapter_upload(self, result: str, reason: str = "", nbytes: int = 0, seconds: float = 0.0) -> None:
        self.uploads.labels(result=result, reason=reason[:40] or "none").inc()  # never an empty label value
        if result == "ok":
            self.upload_bytes.observe(nbytes)
            self.upload_seconds.observe(seconds)


class _AdapterCollector:
    """Registered / resident / memory gauges from the bound ServerState (nothing until bound)."""

    def __init__(self, owner: AdapterMetrics):
        self.owner = owner

    def describe(self):
        return []

    def collect(self):
        state = self.owner.state
        reg = getattr(state, "registry", None) if state is not None else None
        if reg is None:
            return []
        snap = state.engine.snapshot
        device_tier = snap.adapter_slots_total is not None
        versions = reg.list()
        in_memory = sum(1 for v in versions if v.loaded is not None)
        g = GaugeMetricFamily("peftserve_adapters_registered", "Registered adapters.", value=len(versions))
        tiers = GaugeMetricFamily("peftserve_adapters_resident", "Adapters resident per tier.", labels=["tier"])
        tiers.add_metric(["device"], snap.adapter_slots_resident if device_tier else 0)
        tiers.add_metric(["memory"], in_memory)  # the tier names GET /adapters uses: device, memory, disk
        tiers.add_metric(["disk"], len(versions))
        mem = GaugeMetricFamily("peftserve_adapter_memory_bytes",
                                "Host memory held by resident adapters and weighted combinations.",
                                value=reg.resident_bytes())
        budget = GaugeMetricFamily("peftserve_adapter_memory_budget_bytes", "Host-memory adapter budget.",
                                   value=reg.settings.max_cpu_bytes)
        hits = CounterMetricFamily("peftserve_adapter_merge_cache_hits", "Weighted-combination cache hits.",
                                   value=reg.combos.hits)  # only ever grows: a counter (exposed as *_total)
        combos = GaugeMetricFamily("peftserve_adapter_combinations", "Live weighted combinations in host memory.",
                                   value=len(reg.combos))
        errors = CounterMetricFamily("peftserve_adapter_store_errors",
                                     "Stored adapter versions that failed verification on load, by reason.",
                                     labels=["reason"])
        for reason in ("hash_mismatch", "missing", "unreadable", "invalid"):
            errors.add_metric([reason], reg.store_errors.get(reason, 0))
        out = [g, tiers, mem, budget, hits, combos, errors]
        if device_tier:
            out.append(GaugeMetricFamily("peftserve_adapter_device_bytes",
                                         "Device memory reserved by installed weight adapters (LoRA, (IA)3, bottleneck).",
                                         value=snap.adapter_device_bytes))
            if snap.adapter_device_budget is not None:
                out.append(GaugeMetricFamily("peftserve_adapter_device_budget_bytes",
                                             "Device-memory budget of installed weight adapters (--max-adapter-bytes).",
                                             value=snap.adapter_device_budget))
            out.append(_lora_info(snap))
        return out


def lora_info_labels(snap, max_lora: int) -> list[str]:
    """vLLM's `lora_requests_info` label values: comma-joined sorted adapter names, max_lora."""
    return [",".join(snap.running_adapters), ",".join(snap.waiting_adapters), str(max_lora)]


def _lora_info(snap) -> GaugeMetricFamily:
    info = GaugeMetricFamily("peftserve_lora_requests_info", "Running/waiting adapters (vLLM lora_requests_info).",
                             labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
    info.add_metric(lora_info_labels(snap, snap.adapter_slots_total), time.time())
    return info
