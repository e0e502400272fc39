"""A Prometheus histogram fed a step's observations at once.

prometheus_client's `Histogram.observe` costs a few microseconds a call (a Python scan of the
buckets, a lock). The engine thread observed every token's inter-token gap into three histograms
(ours, vLLM's ITL and TPOT) beside two counters: ~15 us a token on this VM, ~4 ms of a 256-row
decode step whose forward a GPU replays in a few. `BatchedHistogram` takes a step's gaps in one
call (bucket counts with numpy's searchsorted + bincount), keeps the counts per label set, and is
exposed at scrape time (a custom collector) as an ordinary histogram: the same name, type, `le`
buckets, `_count` and `_sum` as prometheus_client's `Histogram` fed the same values one by one —
`tests/test_metrics_batch.py` holds the two expositions equal. Buckets are upper-inclusive
(`value <= le`), `+Inf` last, as prometheus_client's.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from prometheus_client import CollectorRegistry
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString


class Tally(NamedTuple):
    """Values bucketed by `BatchedHistogram.tally`."""

    bounds: np.ndarray  # [K] the upper bounds they were bucketed by
    counts: np.ndarray  # [K] values per bucket, not cumulative
    values: Sequence[float]


class BatchedHistogram:
    def __init__(self, name: str, documentation: str, buckets: Sequence[float], labelnames: Sequence[str] = (),
                 registry: CollectorRegistry | None = None):
        bounds = [float(b) for b in buckets]
        if bounds != sorted(bounds) or len(set(bounds)) != len(bounds):
            raise ValueError("buckets must be strictly increasing")
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self._bounds = np.asarray(bounds)  # [K] upper bounds, +Inf last
        self._le = [floatToGoString(b) for b in bounds]
        self._lock = threading.Lock()  # the engine thread adds, the scrape reads
        # label values -> (per-bucket counts [K], not cumulative; sum of the values)
        self._series: dict[tuple[str, ...], tuple[np.ndarray, float]] = {}
        if not self.labelnames:  # an unlabelled histogram shows zeros from the first scrape, as prometheus_client's
            self._series[()] = (np.zeros(len(bounds), dtype=np.int64), 0.0)
        if registry is not None:
            registry.register(self)

    def observe_many(self, values: Sequence[float], labels: Sequence[str] = ()) -> None:
        """Add every value (finite or +-inf floats) to the series of these label values."""
        self.add(self.tally(values), labels)

    def tally(self, values: Sequence[float]) -> Tally:
        """The values bucketed once, for `add` to any histogram with these bounds (the engine's
        gaps go to three: ours and vLLM's ITL and TPOT)."""
        at = np.searchsorted(self._bounds, np.asarray(values, dtype=np.float64), side="left")  # first le >= value
        return Tally(self._bounds, np.bincount(at, minlength=len(self._bounds)), values)

    def add(self, tally: Tally, labels: Sequence[str] = ()) -> None:
        """Add a tally's values to the series of these label values."""
        labels = tuple(labels)
        if len(labels) != len(self.labelnames):
            raise ValueError(f"{self.name}: labels {self.labelnames} expected, got {labels}")
        if tally.bounds is not self._bounds and not np.array_equal(tally.bounds, self._bounds):
            raise ValueError(f"{self.name}: a tally of other buckets")
        if not len(tally.values):
            return
        with self._lock:
            old, total = self._series.get(labels, (None, 0.0))
            for v in tally.values:  # one by one, in order: the same float sum as observing them singly
                total += v
            self._series[labels] = (tally.counts if old is None else old + tally.counts, total)

    def describe(self):
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self):
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            series = [(labels, counts.cumsum().tolist(), total) for labels, (counts, total) in self._series.items()]
        for labels, cumulative, total in series:
            family.add_metric(list(labels), list(zip(self._le, cumulative)), total)
        return [family]
