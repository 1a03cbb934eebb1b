"""The transactional outbox and its relay, against the real Redis and ejabberd of the stack."""

from __future__ import annotations

import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
import redis
from django.core.management import CommandError, call_command
from django.db import transaction
from twitter.models import Tweet

from scalepub.django.models import OutboxEntry
from scalepub.django.relay import Relay, Round
from scalepub.producer import PendingEntry
from scalepub.settings import Settings
from scalepub.sharding import CONSUMER_GROUP, Keys, shard_for
from tests.conftest import django_side
from tests.e2e import Collector, PoolProcess, assert_complete_and_ordered, create_nodes, wait_until
from tests.stack import Stack
from tests.streams import RawRead, StoredEntry, read_all, wait_for_entries

pytestmark = [pytest.mark.stack, pytest.mark.django_db(transaction=True)]


def assert_creation_order(entries: list[StoredEntry], per_node: int) -> None:
    """Per node: seq 1..n with no gap, and pks in creation (ascending) order."""
    by_node: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for e in entries:
        by_node[e.env.node].append((e.env.seq, int(e.env.pk)))
    for node, got in by_node.items():
        assert [seq for seq, _ in got] == list(range(1, per_node + 1)), node
        pks = [pk for _, pk in got]
        assert pks == sorted(pks), f"{node}: relayed out of creation order"


def test_entry_is_written_in_the_saves_transaction(outbox_django: Settings,
                                                   redis_client: redis.Redis) -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        Tweet.objects.create(author="ann", text="rolled back")
        [row] = OutboxEntry.objects.all()  # visible inside the transaction, with the row
        assert row.node == "/twitter/Tweet/ann"
        raise RuntimeError("roll back")
    assert not OutboxEntry.objects.exists() and not Tweet.objects.exists()
    tweet = Tweet.objects.create(author="ann", text="kept")
    [entry] = wait_for_entries(redis_client, outbox_django, 1)
    assert (entry.env.pk, entry.env.seq, entry.env.model) == (str(tweet.pk), 1, "twitter.tweet")


def test_thousand_saves_relayed_in_creation_order(outbox_django: Settings,
                                                  redis_client: redis.Redis) -> None:
    for i in range(1000):
        Tweet.objects.create(author=f"w{i % 50}", text=f"tweet {i}")
    entries = wait_for_entries(redis_client, outbox_django, 1000, timeout=60)
    assert len(entries) == 1000
    assert all(e.shard == shard_for(e.env.node, outbox_django.shards) for e in entries)
    assert_creation_order(entries, 20)
    deadline = time.monotonic() + 10
    while OutboxEntry.objects.exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # the relay deletes after the append
    assert not OutboxEntry.objects.exists()


def test_redis_down_at_commit_loses_nothing(
    outbox_django: Settings, stack: Stack, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """Stop Redis, create 1,000 tweets, start Redis: all arrive at a subscriber, in order."""
    authors = [f"r{uuid.uuid4().hex[:6]}u{i}" for i in range(20)]
    nodes = [f"/twitter/Tweet/{a}" for a in authors]
    create_nodes(stack.env, nodes)
    collector = Collector(stack.env, nodes).start()
    pool = PoolProcess(outbox_django, tmp_path / "pool.log", "--shards", "4")
    try:
        pool.wait_serving(redis_client)
        redis_client.shutdown()  # SHUTDOWN: AOF fsynced, like a planned restart
        slowest = 0.0
        for i in range(1000):
            started = time.monotonic()
            Tweet.objects.create(author=authors[i % 20], text=f"during the outage {i}")
            slowest = max(slowest, time.monotonic() - started)
        assert OutboxEntry.objects.count() == 1000
        assert Tweet.objects.count() == 1000
        stack.up()  # Redis back (ejabberd was never down)
        assert collector.wait_for(lambda got: len({(g.node, g.seq) for g in got}) >= 1000,
                                  timeout=120), (len(collector.received),
                                                 OutboxEntry.objects.count(), pool.output()[-3000:])
    finally:
        stack.up()
        pool.kill()
        collector.stop()
    assert_complete_and_ordered(collector.by_node(), dict.fromkeys(nodes, 50))
    assert_creation_order(read_all(redis_client, outbox_django), 50)
    print(f"slowest save while Redis was down: {slowest * 1000:.1f} ms")


def test_relay_lease_lets_one_relay_work(outbox_django: Settings) -> None:
    first, second = Relay(outbox_django), Relay(outbox_django)
    assert first.lease.key == second.lease.key
    assert first.lease.hold() and first.lease.hold()
    assert not second.lease.hold()
    first.lease.release()
    assert second.lease.hold()
    second.lease.release()


@pytest.fixture
def external_relay(settings_for: Settings) -> Iterator[Settings]:
    """Outbox delivery with no relay thread: only `manage.py scalepub_relay` moves rows."""
    settings = settings_for.replace(delivery="outbox", outbox_relay="external",
                                    stream_maxlen=50, shards=1)
    yield from django_side(settings)


def test_backpressure_keeps_entries_in_the_outbox(external_relay: Settings,
                                                  redis_client: redis.Redis) -> None:
    """At STREAM_MAXLEN waiting entries the stream refuses more; the rest wait in the outbox."""
    for i in range(80):
        Tweet.objects.create(author="bp", text=str(i))
    assert read_all(redis_client, external_relay) == []  # external: nothing moved yet
    with pytest.raises(CommandError, match="30 entries are still in the outbox"):
        call_command("scalepub_relay", "--once", stdout=open("/dev/null", "w"))  # noqa: SIM115
    assert len(read_all(redis_client, external_relay)) == 50  # nothing trimmed unpublished
    state = relay_state(redis_client, external_relay)
    assert (state["rows"], state["refusing"], state["refused_reason"]) == ("30", "1",
                                                                          "backpressure")
    stream = Keys(external_relay.key_prefix).stream(0)
    redis_client.xgroup_create(stream, CONSUMER_GROUP, id="0")
    [[_, delivered]] = cast(RawRead, redis_client.xreadgroup(CONSUMER_GROUP, "test", {stream: ">"},
                                                             count=40))
    assert len(delivered) == 40
    redis_client.xack(stream, CONSUMER_GROUP, *[sid for sid, _ in delivered])
    # ... and counts them done in the shard's meta hash, as the pool's ack script does
    redis_client.hincrby(Keys(external_relay.key_prefix).meta(0), "done", len(delivered))
    # 10 undelivered wait now; 30 more make 40 ≤ 50: the relay moves the rest
    call_command("scalepub_relay", "--once", stdout=open("/dev/null", "w"))  # noqa: SIM115
    assert not OutboxEntry.objects.exists()
    entries = read_all(redis_client, external_relay)
    assert [e.env.seq for e in entries][-30:] == list(range(51, 81))
    state = relay_state(redis_client, external_relay)
    assert (state["rows"], state["refusing"], state["refused_reason"]) == ("0", "0", "")


def relay_state(client: redis.Redis, settings: Settings) -> dict[str, str]:
    """The backlog report of the relay of this test's database."""
    [key] = client.scan_iter(match=Keys(settings.key_prefix).relay_state_pattern)
    state = cast(dict[bytes, bytes], client.hgetall(key))
    return {k.decode(): v.decode() for k, v in state.items()}


def test_rows_appended_by_a_relay_that_died_are_not_appended_twice(
    external_relay: Settings, redis_client: redis.Redis
) -> None:
    for i in range(20):
        Tweet.objects.create(author=f"d{i % 2}", text=str(i))
    dying = Relay(external_relay)
    rows = OutboxEntry.objects.order_by("id")
    entries = [PendingEntry(r.node, r.ts_ns, r.model, r.object_pk, r.fmt, bytes(r.payload),
                            oid=r.id) for r in rows]
    assert len(dying.producer.append(entries, source=dying.database).appended) == 20
    # ... and it died before deleting the rows (or its reply was lost to a timeout)
    call_command("scalepub_relay", "--once", stdout=open("/dev/null", "w"))  # noqa: SIM115
    assert not OutboxEntry.objects.exists()
    stored = read_all(redis_client, external_relay)
    assert sorted((e.env.node, e.env.seq) for e in stored) == sorted(
        (f"/twitter/Tweet/d{n}", s) for n in range(2) for s in range(1, 11))
    # A new row that reuses a deleted row's id (MySQL < 8 after a restart) is still appended.
    reused = entries[0]._replace(ts_ns=entries[0].ts_ns + 1)
    assert dying.producer.append([reused], source=dying.database).appended
    assert len(read_all(redis_client, external_relay)) == 21


def test_a_bug_in_a_round_does_not_end_the_relay(outbox_django: Settings,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    relay = Relay(outbox_django)
    rounds: list[int] = []

    def broken_once() -> Round:
        rounds.append(1)
        if len(rounds) == 1:
            raise KeyError("a bug")
        return Round(0, 0)

    monkeypatch.setattr(relay, "relay_once", broken_once)
    stop = threading.Event()
    thread = threading.Thread(target=relay.run, args=(stop,))
    thread.start()
    try:
        assert wait_until(lambda: len(rounds) >= 2, timeout=10)  # after its 1 s back-off
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()
