"""Prometheus metrics: one registry per app (never the global default), fed by the engine.

`Metrics` is both the engine's `EngineObserver` (engine/observer.py: per-token / per-request /
per-step / adapter-slot callbacks on the engine thread; prometheus_client is thread-safe; a step's
token counts and inter-token gaps are published together at its end, metrics_batch.py) and the
owner of the HTTP-level counters (fed by `api/http_metrics.py`'s middleware). Gauges that describe the
current state (queue depth, KV usage, health) are computed at scrape time from the engine's
published snapshot (`AsyncEngine.snapshot`), never from the engine thread's own structures. Names
follow vLLM's with the `peftserve_` prefix. The `/metrics` route only renders the registry.

No web framework here (the API layer imports this module, never the other way round); the
adapter series live in metrics_adapters.py, vLLM's names for the same data in metrics_vllm.py.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from .metrics_adapters import AdapterMetrics
from .metrics_batch import BatchedHistogram
from .metrics_vllm import VllmMetrics
from .engine.request import AdapterHandle

# `*_created` series double every counter/histogram and no dashboard reads them (process-wide switch)
disable_created_metrics()

# vLLM's bucket sets
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)

BASE_LABEL = "base"
OTHER_LABEL = "other"
SUCCESS_REASONS = ("length", "stop", "eos")


def adapter_name(handle: AdapterHandle | None) -> str | None:
    """The adapter's display name (None for the base model, or a handle without a usable name:
    metrics never fail a request, it is counted as "other")."""
    name = getattr(handle, "name", None)
    return name if isinstance(name, str) and name else None


class _LabelLimiter:
    """Bounds a label's cardinality: the first `limit` distinct values pass, later ones -> other."""

    def __init__(self, limit: int):
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str | None) -> str:
        if value is None:
            return OTHER_LABEL
        if value in (BASE_LABEL, OTHER_LABEL):
            return value
        with self._lock:
            if value in self._seen:
                return value
            if len(self._seen) < self.limit:
                self._seen.add(value)
                return value
        return OTHER_LABEL


class _StateCollector:
    """Scrape-time gauges of the bound ServerState (zeros until bound): the engine's published
    snapshot, its lifecycle flags and the server's draining flag."""

    def __init__(self):
        self.state = None

    def describe(self):
        return list(self._families(None))

    def collect(self):
        return list(self._families(self.state))

    @staticmethod
    def _families(state):
        running = waiting = kv_used = kv_total = block_size = preemptions = 0
        kv = 0.0
        healthy = draining = restarts = 0
        if state is not None:
            engine = state.engine
            snap = engine.snapshot  # one consistent state, published by the engine thread
            running, kv = snap.running, snap.kv_usage
            kv_used, kv_total, block_size, preemptions = (snap.kv_blocks_used, snap.kv_blocks_total,
                                                          snap.kv_block_size, snap.preemptions)
            waiting = engine.num_waiting  # the snapshot's queue + submissions not drained into it yet
            healthy = int(engine.running)
            draining = int(state.draining)
            restarts = int(getattr(engine, "restarts", 0))
        yield GaugeMetricFamily("peftserve_num_requests_running", "Requests running in the engine (hold KV blocks).",
                                value=running)
        yield GaugeMetricFamily("peftserve_num_requests_waiting", "Requests waiting to be scheduled.", value=waiting)
        yield GaugeMetricFamily("peftserve_kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).",
                                value=kv)
        blocks = GaugeMetricFamily("peftserve_kv_cache_blocks", "KV-cache pool blocks by state "
                                   "(used: held by running requests or shared KV prefixes).", labels=["state"])
        blocks.add_metric(["used"], kv_used)
        blocks.add_metric(["free"], kv_total - kv_used)
        yield blocks
        yield GaugeMetricFamily("peftserve_kv_cache_block_size", "Tokens per KV-cache block.", value=block_size)
        yield CounterMetricFamily("peftserve_num_preemptions", "Running requests whose KV blocks were taken back "
                                  "because the pool was full (they recompute).", value=preemptions)
        yield _host_buffers()
        yield GaugeMetricFamily("peftserve_engine_healthy", "1 while the engine loop is running.", value=healthy)
        yield GaugeMetricFamily("peftserve_draining", "1 while the server drains for shutdown.", value=draining)
        # the supervisor's count (async_engine.AsyncEngine.restarts), read at scrape time
        yield CounterMetricFamily("peftserve_engine_restarts", "Times the engine loop died and was rebuilt.",
                                  value=restarts)


def _host_buffers() -> GaugeMetricFamily:
    """The buffers kept resident to make uploads fast (each bounded: docs/design.md, "Uploads")."""
    from peftserve.adapters.host_arena import ARENA
    from peftserve.adapters.safetensors_io import scratch_bytes

    from .durable_write import kept_bytes
    from .streamed_upload import RECEIVE_BUFFERS

    family = GaugeMetricFamily("peftserve_host_buffer_bytes", "Host memory kept resident for uploads, by buffer: "
                               "receive (streamed bodies), direct_write (O_DIRECT store writes), scratch "
                               "(misaligned safetensors), arena (the next load's warm copy).", labels=["buffer"])
    for name, nbytes in (("receive", RECEIVE_BUFFERS.nbytes()), ("direct_write", kept_bytes()),
                         ("scratch", scratch_bytes()), ("arena", ARENA.nbytes())):
        family.add_metric([name], nbytes)
    return family


class Metrics:
    """Per-app metrics registry + EngineObserver implementation (engine/observer.py)."""

    def __init__(self, *, base_model: str = "", dtype: str = "", version: str = "", max_adapter_labels: int = 64,
                 vllm_names: bool = True):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.adapter_label = _LabelLimiter(max_adapter_labels)
        self.ttft = Histogram("peftserve_time_to_first_token_seconds", "Time to first token (from arrival).",
                              ["adapter"], buckets=TTFT_BUCKETS, registry=r)
        self.itl = BatchedHistogram("peftserve_inter_token_latency_seconds", "Time between consecutive output tokens.",
                                    buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("peftserve_e2e_request_latency_seconds", "End-to-end latency of finished requests.",
                             ["adapter"], buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("peftserve_request_queue_time_seconds", "Time from arrival to first scheduling.",
                                    buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        self.prefill_time = Histogram("peftserve_request_prefill_time_seconds",
                                      "Time from first scheduling to first token.",
                                      buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        self.decode_time = Histogram("peftserve_request_decode_time_seconds", "Time from first to last token.",
                                     buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("peftserve_prompt_tokens", "Prefilled prompt tokens.", registry=r)
        self.generation_tokens = Counter("peftserve_generation_tokens", "Generated tokens.", registry=r)
        self.requests = Counter("peftserve_requests", "HTTP requests by endpoint and status code.",
                                ["endpoint", "status"], registry=r)
        self.success = Counter("peftserve_request_success", "Finished requests by finish reason.",
                               ["finished_reason"], registry=r)
        self.failure = Counter("peftserve_request_failure", "Failed or aborted requests by reason.", ["reason"],
                               registry=r)
        self.batch_size = Histogram("peftserve_batch_size", "Sequences per engine step.",
                                    buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.iteration_tokens = Histogram("peftserve_iteration_tokens", "Tokens processed per engine step.",
                                          buckets=ITERATION_TOKEN_BUCKETS, registry=r)
        self.step_time = Histogram("peftserve_engine_step_seconds", "Wall time of one engine step.",
                                   buckets=TTFT_BUCKETS, registry=r)
        self.build_info = Gauge("peftserve_build_info", "Build and model information.",
                                ["version", "base_model", "dtype"], registry=r)
        self.build_info.labels(version=version, base_model=base_model, dtype=dtype).set(1)
        for reason in SUCCESS_REASONS:  # export zeros so rates work from the first scrape
            self.success.labels(finished_reason=reason)
        for reason in ("abort", "error"):
            self.failure.labels(reason=reason)
        self._collector = _StateCollector()
        r.register(self._collector)
        self.adapters = AdapterMetrics(r)
        # vLLM's names for the same data (metrics_vllm.py); None when --no-vllm-metric-names
        self.vllm = VllmMetrics(r, TTFT_BUCKETS, ITL_BUCKETS, REQUEST_LATENCY_BUCKETS) if vllm_names else None
        # a step's tokens, published together by `on_step` (engine thread only): per-token
        # prometheus_client calls cost ~15 us a token (metrics_batch.py)
        self._step_tokens = 0
        self._step_gaps: list[float] = []  # inter-token gaps, seconds

    def bind(self, state) -> None:
        """Attach the ServerState whose engine the scrape-time gauges describe."""
        self._collector.state = state
        self.adapters.state = state
        if self.vllm is not None:
            names = tuple(getattr(state.settings, "served_model_names", ()) or ()) or (state.model_name,)
            self.vllm.bind(state, names[0])

    # -- EngineObserver: adapter device tier (engine thread) ---------------------------------
    def on_adapter_load(self, adapter, seconds: float) -> None:
        self.adapters.on_adapter_load(adapter, seconds)

    def on_adapter_evict(self) -> None:
        self.adapters.on_adapter_evict()

    # -- adapter uploads (API) -------------------------------------------------------------
    def adapter_upload(self, result: str, reason: str = "", nbytes: int = 0, seconds: float = 0.0) -> None:
        self.adapters.adapter_upload(result, reason, nbytes, seconds)

    def label_for(self, handle) -> str:
        if handle is None:
            return BASE_LABEL
        return self.adapter_label(adapter_name(handle))

    # -- EngineObserver (engine thread) ------------------------------------------------------
    def on_step(self, batch_size: int, num_tokens: int, seconds: float) -> None:
        """The step's end: its per-step series, and the tokens `on_token` gathered during it."""
        self.batch_size.observe(batch_size)
        self.iteration_tokens.observe(num_tokens)
        self.step_time.observe(seconds)
        self._publish_tokens()

    def on_token(self, seq, now: float) -> None:
        """Per token, only a count and the gap are kept; `on_step` publishes them at the step's end
        (so a scrape sees whole steps). A first token (rare: once a request) is published at once."""
        self._step_tokens += 1
        if len(seq.output_ids) == 1:  # the first token: prefill is complete
            self.ttft.labels(adapter=self.label_for(seq.adapter)).observe(max(0.0, now - seq.arrival))
            self.prompt_tokens.inc(len(seq.prompt_ids))
            if self.vllm is not None:
                self.vllm.on_first_token(seq, now)
        elif seq.last_token_at is not None:
            self._step_gaps.append(max(0.0, now - seq.last_token_at))

    def _publish_tokens(self) -> None:
        n, gaps = self._step_tokens, self._step_gaps
        if not n:
            return
        self._step_tokens, self._step_gaps = 0, []
        self.generation_tokens.inc(n)
        gaps = self.itl.tally(gaps)  # bucketed once for all three inter-token histograms (same buckets)
        self.itl.add(gaps)
        if self.vllm is not None:
            self.vllm.on_tokens(n, gaps)

    def on_finish(self, seq, now: float) -> None:
        reason = getattr(seq.finish_reason, "value", seq.finish_reason)
        if reason not in SUCCESS_REASONS:
            self.failure.labels(reason=str(reason)).inc()
            return
        self.success.labels(finished_reason=reason).inc()
        if self.vllm is not None:
            self.vllm.on_finish(seq, reason, now)
        self.e2e.labels(adapter=self.label_for(seq.adapter)).observe(max(0.0, now - seq.arrival))
        if seq.first_scheduled is not None:
            self.queue_time.observe(max(0.0, seq.first_scheduled - seq.arrival))
            if seq.first_token_at is not None:
                self.prefill_time.observe(max(0.0, seq.first_token_at - seq.first_scheduled))
        if seq.first_token_at is not None and seq.last_token_at is not None:
            self.decode_time.observe(max(0.0, seq.last_token_at - seq.first_token_at))

    # -- HTTP ------------------------------------------------------------------------------
    def observe_http(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
