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
    with pytest.raises(ValueError):
        batched.defer([0.1])  # deferring checks its labels at once, not at the scrape
    with pytest.raises(ValueError):
        BatchedHistogram("x", "x", buckets=(1.0,), fold_at=0)


@pytest.mark.parametrize("fold_at", [1, 7, BatchedHistogram.FOLD_AT])
def test_deferred_values_render_as_one_observe_per_value(fold_at):
    """`defer` (the engine's call) mixed with `observe_many`: every scrape shows every value
    given before it, counts and sum exactly as observing them one by one in that order (the sum
    rounds differently if a fold reorders them), and what waits unbucketed stays under fold_at."""
    rng = random.Random(fold_at)
    ours, ref = CollectorRegistry(auto_describe=True), CollectorRegistry(auto_describe=True)
    args = ("demo_seconds", "A demo histogram.")
    batched = BatchedHistogram(*args, buckets=ITL_BUCKETS, labelnames=("m",), registry=ours, fold_at=fold_at)
    single = Histogram(*args, labelnames=("m",), buckets=ITL_BUCKETS, registry=ref)
    edges = [0.0, *ITL_BUCKETS, 1e9]
    # values whose float sum depends on the order they are added in
    pool = [1e-9, 0.1, 0.3, 1e8, -0.0, 3.3333333, *edges]
    deferred = 0
    for step in range(60):
        label = rng.choice(("a", "b"))
        values = [rng.choice(pool) if rng.random() < 0.5 else rng.expovariate(20.0) for _ in range(rng.randint(0, 12))]
        (batched.observe_many if rng.random() < 0.2 else batched.defer)(values, (label,))
        deferred += len(values)
        for v in values:
            single.labels(label).observe(v)
        assert batched._num_pending < fold_at
        if rng.random() < 0.3:  # a scrape
            assert generate_latest(ours) == generate_latest(ref), step
    assert deferred > 100
    assert generate_latest(ours) == generate_latest(ref)
    assert batched._num_pending == 0  # the scrape bucketed them
    batched.defer([0.5], ("a",))
    assert batched._num_pending == (1 if fold_at > 1 else 0)  # waits for the next scrape


def test_values_observed_at_once_are_summed_after_the_deferred_ones_before_them():
    """1 + 1 + 1e16 is 1e16 + 2 in floats; 1e16 + 1 + 1 is 1e16 (each +1 rounds back to even)."""
    batched, ours, single, ref = _pair()
    batched.defer([1.0, 1.0])
    batched.observe_many([1e16])
    for v in (1.0, 1.0, 1e16):
        single.observe(v)
    assert generate_latest(ours) == generate_latest(ref)
    assert b"demo_seconds_sum 1.0000000000000002e+16" in generate_latest(ours)


def test_a_deferred_list_is_copied():
    batched, ours, single, ref = _pair()
    values = [0.01, 0.02]
    batched.defer(values)
    values.append(5.0)  # the engine reuses nothing, but a caller may
    for v in (0.01, 0.02):
        single.observe(v)
    assert generate_latest(ours) == generate_latest(ref)
