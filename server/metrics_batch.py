"""A Prometheus histogram fed a step's observations at once, bucketed when read.

prometheus_client's `Histogram.observe` costs a few microseconds a call (a Python scan of the
buckets, a lock). The engine thread observed every token's inter-token gap into three histograms
(ours, vLLM's ITL and TPOT) beside two counters: ~15 us a token on this VM, ~4 ms of a 256-row
decode step whose forward a GPU replays in a few. `BatchedHistogram` takes a step's gaps in one
call, keeps the counts per label set, and is exposed at scrape time (a custom collector) as an
ordinary histogram: the same name, type, `le` buckets, `_count` and `_sum` as prometheus_client's
`Histogram` fed the same values one by one — `tests/test_metrics_batch.py` holds the two
expositions equal. Buckets are upper-inclusive (`value <= le`), `+Inf` last, as
prometheus_client's.

`defer` (the engine thread's call, once a step) only appends the values to a list: bucketing
them (numpy's searchsorted + bincount) has a fixed cost per call that a step's few hundred
values do not amortize (~0.14 ms of every decode step on this VM, its caches cold after the
forward). They are bucketed at the next scrape (`collect`), or by the writer once `fold_at`
wait (a bound on the memory they hold): every value is counted by every scrape that follows
its `defer`, and the sum adds the values in the order they came, as observing them one by one.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import numpy as np
from prometheus_client import CollectorRegistry
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString


class BatchedHistogram:
    FOLD_AT = 4096  # deferred values waiting before `defer` buckets them itself

    def __init__(self, name: str, documentation: str, buckets: Sequence[float], labelnames: Sequence[str] = (),
                 registry: CollectorRegistry | None = None, fold_at: int = FOLD_AT):
        bounds = [float(b) for b in buckets]
        if bounds != sorted(bounds) or len(set(bounds)) != len(bounds):
            raise ValueError("buckets must be strictly increasing")
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        if fold_at < 1:
            raise ValueError("fold_at >= 1 required")
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self.fold_at = fold_at
        self._bounds = np.asarray(bounds)  # [K] upper bounds, +Inf last
        self._le = [floatToGoString(b) for b in bounds]
        self._lock = threading.Lock()  # the engine thread adds, the scrape reads
        # label values -> (per-bucket counts [K], not cumulative; sum of the values)
        self._series: dict[tuple[str, ...], tuple[np.ndarray, float]] = {}
        # label values -> deferred values not bucketed yet, in arrival order; how many in all
        self._pending: dict[tuple[str, ...], list[float]] = {}
        self._num_pending = 0
        if not self.labelnames:  # an unlabelled histogram shows zeros from the first scrape, as prometheus_client's
            self._series[()] = (np.zeros(len(bounds), dtype=np.int64), 0.0)
        if registry is not None:
            registry.register(self)

    def observe_many(self, values: Sequence[float], labels: Sequence[str] = ()) -> None:
        """Add every value (finite or +-inf floats) to the series of these label values, now."""
        labels = self._labels(labels)
        with self._lock:
            self._fold()  # values deferred before these are summed before them
            self._add(labels, values)

    def defer(self, values: Sequence[float], labels: Sequence[str] = ()) -> None:
        """`observe_many`, bucketed later (at the next scrape, or here once `fold_at` values wait):
        a list extend under the lock. The values are copied."""
        labels = self._labels(labels)
        if not len(values):
            return
        with self._lock:
            pending = self._pending.get(labels)
            if pending is None:
                self._pending[labels] = list(values)
            else:
                pending.extend(values)
            self._num_pending += len(values)
            if self._num_pending >= self.fold_at:
                self._fold()

    def _labels(self, labels: Sequence[str]) -> tuple[str, ...]:
        labels = tuple(labels)
        if len(labels) != len(self.labelnames):
            raise ValueError(f"{self.name}: labels {self.labelnames} expected, got {labels}")
        return labels

    def _fold(self) -> None:
        """Bucket every deferred value (lock held)."""
        for labels, values in self._pending.items():
            self._add(labels, values)
        self._pending.clear()
        self._num_pending = 0

    def _add(self, labels: tuple[str, ...], values: Sequence[float]) -> None:
        """Add values to one series (lock held)."""
        if not len(values):
            return
        at = np.searchsorted(self._bounds, np.asarray(values, dtype=np.float64), side="left")  # first le >= value
        counts = np.bincount(at, minlength=len(self._bounds))  # [K]
        old, total = self._series.get(labels, (None, 0.0))
        for v in values:  # one by one, in order: the same float sum as observing them singly
            total += v
        self._series[labels] = (counts if old is None else old + counts, total)

    def describe(self):
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self):
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            self._fold()
            series = [(labels, counts.cumsum().tolist(), total) for labels, (counts, total) in self._series.items()]
        for labels, cumulative, total in series:
            family.add_metric(list(labels), list(zip(self._le, cumulative)), total)
        return [family]
