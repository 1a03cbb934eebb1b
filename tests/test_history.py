"""The history endpoint subscribers catch up from: per-node history, exact ``lost``."""

from __future__ import annotations

import contextlib
import time
from typing import Any, cast

import pytest
import redis
from django.test import Client
from twitter.models import Tweet

from scalepub.history import read_history
from scalepub.producer import PendingEntry, StreamProducer
from scalepub.settings import Settings
from scalepub.sharding import Keys, shard_for
from tests.conftest import django_side
from tests.streams import RawEntries

pytestmark = [pytest.mark.stack, pytest.mark.django_db(transaction=True)]


def get(client: Client, **params: object) -> dict[str, Any]:
    response = client.get("/scalepub/history", params)
    assert response.status_code == 200, response.content
    return cast(dict[str, Any], response.json())


def bury(settings: Settings, node: str, count: int, busy_nodes: int = 20) -> list[str]:
    """Append ``count`` entries of other nodes of ``node``'s shard, in bulk; their names."""
    shard = shard_for(node, settings.shards)
    others = [n for n in (f"/busy/{shard}/{i}" for i in range(busy_nodes * settings.shards * 4))
              if shard_for(n, settings.shards) == shard][:busy_nodes]
    producer = StreamProducer(settings)
    payload = b"<row><text>" + b"x" * 200 + b"</text></row>"
    try:
        for start in range(0, count, 5000):
            batch = [PendingEntry(others[i % len(others)], time.time_ns(), "busy.row", str(i),
                                  "xml", payload) for i in range(start, min(start + 5000, count))]
            result = producer.append(batch)
            assert not result.failures, result.failures[0].message
    finally:
        producer.close()
    return others


def test_entries_after_a_seq_in_order(scalepub_django: Settings) -> None:
    for i in range(30):
        Tweet.objects.create(author=f"h{i % 3}", text=f"t{i}")
    client = Client()
    body = get(client, node="/twitter/Tweet/h1", after=4)
    assert [e["seq"] for e in body["entries"]] == [5, 6, 7, 8, 9, 10]
    assert body["last_seq"] == 10 and body["lost"] is False
    assert all(e["node"] == "/twitter/Tweet/h1" for e in body["entries"])
    assert body["entries"][0]["payload"].startswith("<django-objects")
    assert get(client, node="/twitter/Tweet/h1", after=10)["entries"] == []
    paged = get(client, node="/twitter/Tweet/h1", after=0, limit=4)
    assert [e["seq"] for e in paged["entries"]] == [1, 2, 3, 4] and paged["lost"] is False


@pytest.mark.timeout(300)
def test_quiet_node_behind_200000_entries_of_its_shard(scalepub_django: Settings,
                                                       redis_client: redis.Redis) -> None:
    """The old backwards scan of the shard stream answered this with no entries, lost: true."""
    Tweet.objects.create(author="quiet", text="first")
    Tweet.objects.create(author="quiet", text="second")
    node = "/twitter/Tweet/quiet"
    bury(scalepub_django, node, 200_000)
    stream = Keys(scalepub_django.key_prefix).stream(shard_for(node, scalepub_django.shards))
    assert redis_client.xlen(stream) == 200_002
    body = get(Client(), node=node, after=0)
    assert [e["seq"] for e in body["entries"]] == [1, 2]
    assert body["lost"] is False and body["last_seq"] == 2
    assert [e["pk"] for e in body["entries"]] == [
        str(t.pk) for t in Tweet.objects.filter(author="quiet").order_by("pk")]
    # the shard stream id, as in the pubsub item (docs/protocol.md section 3)
    stream_ids = {sid.decode() for sid, _ in cast(RawEntries, redis_client.xrange(stream, count=2))}
    assert {e["id"] for e in body["entries"]} == stream_ids
    assert get(Client(), node=node, after=1)["entries"][0]["seq"] == 2


def test_lost_is_exact_under_the_cap(settings_for: Settings, redis_client: redis.Redis) -> None:
    """With HISTORY_MAXLEN=5 and 12 entries, seqs 8..12 are kept: lost only before 7."""
    capped = settings_for.replace(delivery="direct", history_maxlen=5, history_ttl_s=600)
    with contextlib.contextmanager(django_side)(capped):
        for i in range(12):
            Tweet.objects.create(author="capped", text=f"t{i}")
        client = Client()
        node = "/twitter/Tweet/capped"

        def seqs_and_lost(after: int, limit: int = 1000) -> tuple[list[int], bool]:
            body = get(client, node=node, after=after, limit=limit)
            assert body["last_seq"] == 12
            return [e["seq"] for e in body["entries"]], body["lost"]

        assert seqs_and_lost(7) == ([8, 9, 10, 11, 12], False)  # 8..12 all kept
        assert seqs_and_lost(7, limit=2) == ([8, 9], False)
        assert seqs_and_lost(6) == ([8, 9, 10, 11, 12], True)  # 7 was trimmed
        assert seqs_and_lost(0) == ([8, 9, 10, 11, 12], True)
        assert seqs_and_lost(12) == ([], False)
        assert seqs_and_lost(11) == ([12], False)
        key = Keys(capped.key_prefix).history(shard_for(node, capped.shards), node)
        assert 0 < int(redis_client.ttl(key)) <= 600  # HISTORY_TTL_S after the newest entry
        redis_client.delete(key)  # as when it expires: every entry after 11 is gone
        assert seqs_and_lost(11) == ([], True)
        assert seqs_and_lost(12) == ([], False)


def test_no_history_when_history_maxlen_is_0(settings_for: Settings,
                                             redis_client: redis.Redis) -> None:
    off = settings_for.replace(delivery="direct", history_maxlen=0)
    with contextlib.contextmanager(django_side)(off):
        Tweet.objects.create(author="nohistory", text="t")
        body = get(Client(), node="/twitter/Tweet/nohistory", after=0)
    assert body == {"node": "/twitter/Tweet/nohistory", "lost": True, "last_seq": 1,
                    "entries": []}
    assert not list(redis_client.scan_iter(match=f"{off.key_prefix}:*:h:*"))


def test_a_history_older_than_its_seq_counter_does_not_block_the_shard(
    settings_for: Settings, redis_client: redis.Redis,
) -> None:
    """A node whose counter was reset (deleted by hand, a key prefix reused) while its history
    stayed: the history's ids are then above the new seqs, and an XADD below them would fail
    the whole append script, every entry of the shard refused. The script starts it again."""
    node = "/n/reset"
    keys, shard = Keys(settings_for.key_prefix), shard_for(node, settings_for.shards)
    producer = StreamProducer(settings_for)

    def append(count: int) -> list[int]:
        result = producer.append([PendingEntry(node, time.time_ns(), "t.row", str(i), "xml",
                                               b"<x/>") for i in range(count)])
        assert not result.failures, result.failures[0].message
        return [a.seq for a in result.appended]

    try:
        assert append(5) == [1, 2, 3, 4, 5]
        redis_client.hdel(keys.seqs(shard), node)  # the counter goes, the history (5-0) stays
        assert append(2) == [1, 2]
    finally:
        producer.close()
    kept = cast(RawEntries, redis_client.xrange(keys.history(shard, node)))
    assert [sid for sid, _ in kept] == [b"1-0", b"2-0"]
    found = read_history(redis_client, keys, settings_for.shards, node, 0, 100)
    assert [e.seq for e in found.entries] == [1, 2] and not found.lost and found.last_seq == 2


def test_bad_requests(scalepub_django: Settings) -> None:
    client = Client()
    assert client.get("/scalepub/history", {"node": "no slash"}).status_code == 400
    assert client.get("/scalepub/history", {"node": "/a", "after": "x"}).status_code == 400
    assert client.post("/scalepub/history").status_code == 405
    huge = get(client, node="/a", after=10**30)
    assert huge["entries"] == [] and huge["lost"] is False
