"""A shard's per-IQ meters are gathered and written together (scalepub/shard/stats.py).

What a scrape shows after a flush must be exactly what one ``observe``/``inc`` per IQ would
have written: the same bucket counts, sums and counters. Checked against the real
prometheus_client children (whichever value class this process uses).
"""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Histogram

from scalepub.shard import metrics, stats
from scalepub.shard.stats import Meters
from scalepub.xmpp.batch import Batch, Entry

_SHARD = 917  # a label no other test uses: the default registry is the process's


def _batch(n: int, age_s: float, size: int = 300, shard: int = _SHARD) -> Batch:
    now_ns = time.time_ns()
    batch = Batch("/t/n", shard, read_at=time.monotonic() - age_s / 2)
    for i in range(n):
        sid = f"{now_ns // 1_000_000 - int(age_s * 1000)}-{i}".encode()
        batch.add(Entry(sid, "/t/n", i + 1, now_ns - int(age_s * 1e9), b"x" * (size // n)))
    batch.sent_at = time.monotonic() - age_s / 4
    return batch


def _sample(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return value or 0.0


def _buckets(name: str, **labels: str) -> dict[str, float]:
    return {s.labels["le"]: s.value for m in REGISTRY.collect() for s in m.samples
            if s.name == f"{name}_bucket"
            and all(s.labels.get(k) == v for k, v in labels.items())}


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {le: after[le] - before.get(le, 0.0) for le in after}


def _reference(values: list[float], buckets: tuple[float, ...]) -> dict[str, float]:
    """Bucket counts one observe() per value gives (cumulative, by ``le``)."""
    ref = Histogram("ref", "ref", buckets=buckets, registry=CollectorRegistry())
    for v in values:
        ref.observe(v)
    return {s.labels["le"]: s.value for s in next(iter(ref.collect())).samples
            if s.name == "ref_bucket"}


def test_a_flush_writes_what_one_update_per_iq_would() -> None:
    async def scenario() -> None:
        shard = str(_SHARD)
        sizes = [1, 3, 1, 250, 7, 1, 40]
        before = {"published": _sample("scalepub_entries_published_total", shard=shard),
                  "iqs": _sample("scalepub_publish_iqs_total", shard=shard),
                  "sum": _sample("scalepub_batch_entries_sum", shard=shard)}
        entries_before = _buckets("scalepub_batch_entries", shard=shard)
        meters = Meters(shard)
        for i, n in enumerate(sizes):
            batch = _batch(n, 0.002 * (i + 1))
            meters.sent(batch)
            meters.confirmed(batch, time.time_ns())
        # Gathered, not yet written: a flush is due within FLUSH_S.
        assert _sample("scalepub_publish_iqs_total", shard=shard) == before["iqs"]
        meters.flush()
        assert _sample("scalepub_publish_iqs_total", shard=shard) - before["iqs"] == len(sizes)
        assert (_sample("scalepub_entries_published_total", shard=shard)
                - before["published"]) == sum(sizes)
        assert (_sample("scalepub_batch_entries_sum", shard=shard) - before["sum"]
                == pytest.approx(sum(sizes)))
        got = _delta(entries_before, _buckets("scalepub_batch_entries", shard=shard))
        bounds = tuple(metrics.BATCH_ENTRIES._upper_bounds)
        assert got == _reference([float(n) for n in sizes], bounds)
        hops = {hop: _sample("scalepub_hop_latency_seconds_count", shard=shard, hop=hop)
                for hop in metrics.HOPS}
        assert all(count >= len(sizes) for count in hops.values()), hops
        assert _sample("scalepub_last_publish_timestamp_seconds", shard=shard) > 0

    asyncio.run(scenario())


def test_gathered_updates_are_written_within_flush_s() -> None:
    async def scenario() -> None:
        shard = str(_SHARD + 1)
        meters = Meters(shard)
        batch = _batch(2, 0.001, shard=_SHARD + 1)
        meters.sent(batch)
        meters.confirmed(batch, time.time_ns())
        meters.in_flight(3)
        await asyncio.sleep(stats.FLUSH_S + 0.2)
        assert _sample("scalepub_publish_iqs_total", shard=shard) == 1
        assert _sample("scalepub_entries_published_total", shard=shard) == 2
        assert _sample("scalepub_inflight_iqs", shard=shard) == 3
        assert _sample("scalepub_publish_rtt_seconds_count", shard=shard) == 1

    asyncio.run(scenario())


def test_outside_an_event_loop_updates_are_written_at_once() -> None:
    shard = str(_SHARD + 2)
    meters = Meters(shard)
    batch = _batch(1, 0.001, shard=_SHARD + 2)
    meters.confirmed(batch, time.time_ns())
    assert _sample("scalepub_publish_iqs_total", shard=shard) == 1
