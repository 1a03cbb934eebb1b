"""The stream producer against real Redis: seq splicing, shard-count guard, spill."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import cast

import pytest
import redis

from scalepub.producer import PendingEntry, Refusal, StreamProducer
from scalepub.settings import Settings
from scalepub.sharding import CONSUMER_GROUP, Keys
from tests.streams import RawEntries, RawRead, read_all

pytestmark = pytest.mark.stack


class Recorder:
    """A spill that keeps what it was given."""

    def __init__(self) -> None:
        self.spilled: list[tuple[PendingEntry, Refusal]] = []
        self.messages: list[str] = []

    def spill(self, entries: Sequence[PendingEntry], reason: Refusal, message: str) -> None:
        self.spilled += [(e, reason) for e in entries]
        self.messages.append(message)


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
    [(_, reason)] = recorder.spilled
    assert reason is Refusal.SHARD_MISMATCH
    assert f"{settings_for.shards * 2} shards" in recorder.messages[0]


def test_more_shards_than_the_pool_runs_with_are_refused_too(
    settings_for: Settings, redis_client: redis.Redis
) -> None:
    """A pool recorded 4 shards; a producer with 8: the entries of streams 4-7, which have no
    record of their own yet, are refused as well (they were appended, and nobody read them)."""
    from scalepub.backlog import backlogs
    from scalepub.shard.streams import agree_shard_count

    keys = Keys(settings_for.key_prefix)
    agree_shard_count(redis_client, keys, 4)  # what `scalepub run --shards 4` does at start
    recorder = Recorder()
    producer = StreamProducer(settings_for.replace(shards=8), spill=recorder)
    assert producer.enqueue([entry(f"/n/many/{i}", i) for i in range(40)]) is None
    assert {reason for _, reason in recorder.spilled} == {Refusal.SHARD_MISMATCH}
    assert len(recorder.spilled) == 40
    assert "the pool runs with 4" in recorder.messages[0]
    assert not any(b.lag for b in backlogs(redis_client, keys))
    assert StreamProducer(settings_for.replace(shards=4)).enqueue([entry("/n/ok", 1)])


def test_redis_down_spills(settings_for: Settings) -> None:
    recorder = Recorder()
    down = settings_for.replace(redis_url="redis://127.0.0.1:1/0", redis_timeout=0.2)
    assert StreamProducer(down, spill=recorder).enqueue([entry("/n/x", 1)]) is None
    assert recorder.spilled[0][1] is Refusal.REDIS


def test_waiting_entries_are_bounded_by_maxlen(settings_for: Settings,
                                               redis_client: redis.Redis) -> None:
    """Past STREAM_MAXLEN waiting entries the script appends what fits and refuses the rest."""
    small = settings_for.replace(stream_maxlen=100, shards=1)
    recorder = Recorder()
    producer = StreamProducer(small, spill=recorder)
    assert producer.enqueue([entry("/n/m", j) for j in range(60)]) is not None
    assert producer.enqueue([entry("/n/m", j) for j in range(60, 120)]) is None
    assert [e.pk for e, _ in recorder.spilled] == [str(j) for j in range(100, 120)]
    assert {reason for _, reason in recorder.spilled} == {Refusal.BACKPRESSURE}
    stream = Keys(small.key_prefix).stream(0)
    assert redis_client.xlen(stream) == 100  # no group yet: every entry counts as waiting
    # Once a pool has read and acknowledged them, they no longer count, and MAXLEN trims them.
    redis_client.xgroup_create(stream, CONSUMER_GROUP, id="0")
    for _, got in cast(RawRead, redis_client.xreadgroup(CONSUMER_GROUP, "t", {stream: ">"})):
        redis_client.xack(stream, CONSUMER_GROUP, *[sid for sid, _ in got])
    for i in range(20):
        assert producer.enqueue([entry("/n/m", j) for j in range(i * 50, i * 50 + 50)])
        for _, got in cast(RawRead, redis_client.xreadgroup(CONSUMER_GROUP, "t", {stream: ">"})):
            redis_client.xack(stream, CONSUMER_GROUP, *[sid for sid, _ in got])
    assert 100 <= redis_client.xlen(stream) < 400  # MAXLEN ~ trims whole macro nodes
    reasons = [f.reason for _ in range(3)  # 100 waiting again
               for f in producer.append([entry("/n/m", j) for j in range(50)]).failures]
    assert reasons == [Refusal.BACKPRESSURE]


def test_entries_of_a_lost_read_reply_are_found_again(settings_for: Settings) -> None:
    """A shard whose XREADGROUP reply was lost finds those entries among its own pending."""
    import asyncio

    from scalepub.shard import streams
    from tests.streams import FencedConsumer

    StreamProducer(settings_for.replace(shards=1)).enqueue(
        [entry("/n/lost", j) for j in range(30)])
    key = Keys(settings_for.key_prefix).stream(0)

    async def scenario() -> tuple[list[bytes], list[bytes]]:
        async with FencedConsumer(settings_for) as shard:
            seen = await shard.read(10, "c1")
            await shard.read(15, "c1")  # delivered, reply "lost"
            [(_, found)] = await streams.read_own_pending(shard.redis, {key: seen[-1][0]},
                                                          "c1", 100)
            rest = await shard.read(100, "c1")
        return [sid for sid, _ in found], [sid for sid, _ in seen + rest]

    found, others = asyncio.run(scenario())
    assert len(found) == 15 and not set(found) & set(others)
    assert len(found) + len(others) == 30


def test_counters_count_what_waits(settings_for: Settings, redis_client: redis.Redis) -> None:
    """appended by the append script; done by the ack script for what XACK really removed
    (a repeated ack counts nothing), dead letters included; lag and pending follow."""
    import asyncio

    from scalepub.backlog import stream_backlog
    from tests.streams import FencedConsumer

    settings = settings_for.replace(shards=1)
    keys = Keys(settings.key_prefix)
    key = keys.stream(0)
    StreamProducer(settings).enqueue([entry("/n/c", j) for j in range(10)])

    async def scenario() -> None:
        async with FencedConsumer(settings) as shard:
            got = await shard.read(8)  # 2 stay unread
            assert [await shard.ack([sid for sid, _ in got[:5]]) for _ in range(2)] == [5, 0]
            assert await shard.dead_letter(got[5][0], b"x", "t") == 1

    asyncio.run(scenario())
    counts = cast(list[bytes], redis_client.hmget(keys.meta(0), ["appended", "done"]))
    assert [int(c) for c in counts] == [10, 6]
    assert stream_backlog(redis_client, key) == (2, 2)
    assert redis_client.xlen(keys.dead(0)) == 1


def test_history_is_written_with_the_entry(settings_for: Settings,
                                           redis_client: redis.Redis) -> None:
    capped = settings_for.replace(history_maxlen=3, history_ttl_s=100)
    appended = StreamProducer(capped).enqueue([entry("/n/h", j) for j in range(5)])
    assert appended is not None
    key = Keys(capped.key_prefix).history(appended[0].shard, "/n/h")
    kept = cast(RawEntries, redis_client.xrange(key))
    assert [sid for sid, _ in kept] == [b"3-0", b"4-0", b"5-0"]  # ids are the seqs
    assert [f[b"i"].decode() for _, f in kept] == [a.stream_id for a in appended[2:]]
    assert 0 < redis_client.ttl(key) <= 100
