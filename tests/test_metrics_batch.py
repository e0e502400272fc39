"""`BatchedHistogram` (server/metrics_batch.py) against prometheus_client's `Histogram`: fed the same
values (one batch per "step" vs one `observe` per value), the two registries render the same text."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from peftserve.server.metrics import ITL_BUCKETS
from peftserve.server.metrics_batch import BatchedHistogram


def _pair(labelnames=()):
    ours, ref = CollectorRegistry(auto_describe=True), CollectorRegistry(auto_describe=True)
    args = ("demo_seconds", "A demo histogram.")
    return (BatchedHistogram(*args, buckets=ITL_BUCKETS, labelnames=labelnames, registry=ours), ours,
            Histogram(*args, labelnames=labelnames, buckets=ITL_BUCKETS, registry=ref), ref)


@pytest.mark.parametrize("labelled", [False, True])
def test_batches_render_as_one_observe_per_value(labelled):
    rng = random.Random(labelled)
    names = ("model_name",) if labelled else ()
    batched, ours, single, ref = _pair(names)
    assert generate_latest(ours) == generate_latest(ref)  # before any value: zeros, or no series
    edges = [0.0, *ITL_BUCKETS, 80.0000001, 1e9]  # on every bound (upper-inclusive) and past the last
    for step in range(40):
        values = [rng.choice((rng.expovariate(20.0), rng.choice(edges))) for _ in range(rng.randint(0, 30))]
        label = (rng.choice(("a", "b")),) if labelled else ()
        batched.observe_many(values, label)
        for v in values:
            (single.labels(*label) if labelled else single).observe(v)
        assert generate_latest(ours) == generate_latest(ref), step
    assert b'le="+Inf"' in generate_latest(ours) and b"demo_seconds_sum" in generate_latest(ours)


def test_labels_are_checked_and_buckets_must_increase():
    batched, _, _, _ = _pair(("model_name",))
    with pytest.raises(ValueError):
        batched.observe_many([0.1])  # a label value is missing
    with pytest.raises(ValueError):
        BatchedHistogram("x", "x", buckets=(1.0, 0.5))
    with pytest.raises(ValueError):  # a tally made with other buckets
        batched.add(BatchedHistogram("y", "y", buckets=(1.0, 2.0)).tally([0.5]), ("m",))
