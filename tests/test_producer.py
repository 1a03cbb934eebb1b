"""The stream producer against real Redis: seq splicing, shard-count guard, spill."""

from __future__ import annotations

import time
from collections.abc import Sequence

import pytest
import redis

from scalepub.producer import PendingEntry, StreamProducer
from scalepub.settings import Settings
from scalepub.sharding import Keys
from tests.streams import read_all

pytestmark = pytest.mark.stack


class Recorder:
    """A spill that keeps what it was given."""

    def __init__(self) -> None:
        self.spilled: list[tuple[PendingEntry, Exception]] = []

    def spill(self, entries: Sequence[PendingEntry], error: Exception) -> None:
        self.spilled += [(e, error) for e in entries]


def entry(node: str, n: int) -> PendingEntry:
    return PendingEntry(node, time.time_ns(), "app.model", str(n), "xml", f"<x>{n}</x>".encode())


def test_seq_is_per_node_and_spliced_into_the_envelope(
    settings_for: Settings, redis_client: redis.Redis
) -> None:
    producer = StreamProducer(settings_for)
    batch = [entry(f"/n/{i % 3}", i) for i in range(30)]
    appended = producer.enqueue(batch)
    assert appended is not None and len(appended) == 30
    producer.enqueue([entry("/n/0", 99)])
    stored = read_all(redis_client, settings_for)
    by_node: dict[str, list[int]] = {}
    for s in stored:
        by_node.setdefault(s.env.node, []).append(s.env.seq)
    assert by_node == {"/n/0": list(range(1, 12)), "/n/1": list(range(1, 11)),
                       "/n/2": list(range(1, 11))}


def test_shard_count_mismatch_is_refused_and_spilled(
    settings_for: Settings, redis_client: redis.Redis
) -> None:
    StreamProducer(settings_for).enqueue([entry(f"/n/{i}", i) for i in range(20)])
    recorder = Recorder()
    other = StreamProducer(settings_for.replace(shards=settings_for.shards * 2), spill=recorder)
    assert other.enqueue([entry("/n/1", 1)]) is None
    [(_, error)] = recorder.spilled
    assert "SHARDMISMATCH" in str(error)


def test_redis_down_spills(settings_for: Settings) -> None:
    recorder = Recorder()
    down = settings_for.replace(redis_url="redis://127.0.0.1:1/0", redis_timeout=0.2)
    assert StreamProducer(down, spill=recorder).enqueue([entry("/n/x", 1)]) is None
    assert isinstance(recorder.spilled[0][1], redis.ConnectionError)


def test_maxlen_bounds_the_stream(settings_for: Settings, redis_client: redis.Redis) -> None:
    small = settings_for.replace(stream_maxlen=100, shards=1)
    producer = StreamProducer(small)
    for i in range(20):
        producer.enqueue([entry("/n/m", j) for j in range(i * 50, i * 50 + 50)])
    length = redis_client.xlen(Keys(small.key_prefix).stream(0))
    assert 100 <= length < 1000  # MAXLEN ~ trims whole macro nodes, approximately
