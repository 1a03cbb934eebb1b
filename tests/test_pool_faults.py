"""The pool under faults: server restarts, refused batches, poison entries, SIGTERM."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
import redis

from scalepub import exitcodes
from scalepub.backlog import backlogs
from scalepub.producer import PendingEntry, StreamProducer
from scalepub.settings import Settings, env_mapping
from scalepub.sharding import CONSUMER_GROUP, ENTRY_FIELD, Keys, shard_for
from tests.e2e import Collector, PoolProcess, create_nodes, stored_entries, wait_until
from tests.stack import Stack, running
from tests.streams import RawEntries, drained, produce

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def storing_stack() -> Iterator[Stack]:
    """A second stack whose ejabberd keeps 1000 items per node on disk: the server itself
    can then be asked, after a restart, which entries it acknowledged."""
    yield from running(SCALEPUB_PUBSUB_MAX_ITEMS="1000")


def test_ejabberd_restart_mid_stream_loses_nothing(storing_stack: Stack, tmp_path: Path) -> None:
    settings = Settings.from_mapping(env_mapping(storing_stack.env),
                                     key_prefix=f"r{uuid.uuid4().hex[:8]}", shards=2)
    nodes = [f"/faults/restart/{settings.key_prefix}/n{i}" for i in range(20)]
    produce(settings, nodes, 100)
    pool = PoolProcess(settings, tmp_path / "pool.log", "--shards", "2", "--window", "4",
                       "--batch-max-entries", "10")
    try:
        assert wait_until(lambda: len(pool.shard_pids()) == 2, 30), pool.output()[-3000:]
        shards = sorted(pool.shard_pids())
        time.sleep(1.0)  # let it publish part of the backlog
        done = storing_stack.run("restart", "ejabberd")
        assert done.returncode == 0, done.stderr
        produce(settings, nodes, 100)
        assert wait_until(lambda: drained(settings), 120), pool.output()[-3000:]
        assert sorted(pool.shard_pids()) == shards, "a shard died instead of reconnecting"
        assert pool.stop() == 0
    finally:
        pool.kill()
    stored = stored_entries(storing_stack.env, nodes)
    for node in nodes:
        assert sorted({g.seq for g in stored[node]}) == list(range(1, 201)), node


@pytest.fixture
def nodes_created(stack: Stack) -> list[str]:
    nodes = [f"/faults/{uuid.uuid4().hex[:8]}/n{i}" for i in range(4)]
    create_nodes(stack.env, nodes)
    return nodes


def test_refused_batch_is_split_and_poison_is_dead_lettered(
    settings_for: Settings, stack: Stack, nodes_created: list[str], redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    settings = settings_for.replace(shards=1)
    keys = Keys(settings.key_prefix)
    node = nodes_created[0]
    collector = Collector(stack.env, [node]).start()
    produce(settings, [node], 50, size=6000)  # 50 x 6 kB in one batch > max_payload_size
    bad = [PendingEntry(node, time.time_ns(), "t.row", "ctl", "xml", b"<row>\x01</row>")]
    StreamProducer(settings).enqueue(bad)  # a control character XML cannot carry
    redis_client.xadd(keys.stream(0), {ENTRY_FIELD: b"\x93not an envelope"})
    produce(settings, [node], 20)
    # The byte cap is set above ejabberd's max_payload_size, so the server must refuse.
    pool = PoolProcess(settings, tmp_path / "pool.log", "--shards", "1",
                       "--batch-max-bytes", "400000", "--batch-max-entries", "1000")
    try:
        assert wait_until(lambda: drained(settings), 90), pool.output()[-3000:]
        assert collector.wait_for(lambda got: len(got) >= 70, 30)
        assert pool.stop() == 0
    finally:
        pool.kill()
        collector.stop()
    got = collector.by_node()[node]
    # Entries 1-50 (300 kB) were read together and fit one batch under --batch-max-bytes;
    # the server refuses a payload that big, so arriving in several items means it was split.
    assert len({g.item for g in got if g.seq <= 50}) >= 2, "the refused batch was not split"
    dead = cast(RawEntries, redis_client.xrange(keys.dead(0)))
    reasons = sorted(fields[b"reason"].decode() for _, fields in dead)
    assert len(reasons) == 2, reasons
    assert any("not well-formed" in r for r in reasons), reasons
    assert any("unreadable entry" in r for r in reasons), reasons
    assert sorted({g.seq for g in got}) == [s for s in range(1, 72) if s != 51]


def test_sigterm_under_load_exits_fast_and_acks_only_published(
    settings_for: Settings, stack: Stack, nodes_created: list[str], redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    settings = settings_for.replace(shards=2)
    collector = Collector(stack.env, nodes_created).start()
    per_node = 10_000
    produce(settings, nodes_created, per_node)
    # one small IQ in flight per shard: what the graceful stop still drains stays far below the
    # load, and the load lasts well beyond the stop's signal even with no linger (~1 ms per IQ)
    pool = PoolProcess(settings, tmp_path / "pool.log", "--shards", "2", "--window", "1",
                       "--batch-max-entries", "20")
    keys = Keys(settings.key_prefix)

    def published() -> int:  # what the pool had confirmed: the subscriber may lag behind
        return 4 * per_node - sum(b.lag + b.pending for b in backlogs(redis_client, keys))

    try:  # both shard processes up (a stop during a shard's start-up is another test)
        pool.wait_serving(redis_client)
        assert wait_until(lambda: published() > 2000, 60)
        started = time.monotonic()
        assert pool.stop(timeout=30) == 0
        stop_seconds = time.monotonic() - started
    finally:
        pool.kill()
    time.sleep(1.0)  # deliveries already sent by ejabberd reach the collector
    collector.stop()
    assert stop_seconds < 10, stop_seconds
    received = {g.id for g in collector.received}
    acked = set()
    for key in {keys.stream(shard_for(n, 2)) for n in nodes_created}:  # 4 nodes may share one
        [group] = [g for g in redis_client.xinfo_groups(key) if g["name"] == CONSUMER_GROUP.encode()]
        pending = {p["message_id"] for p in redis_client.xpending_range(key, CONSUMER_GROUP, "-", "+", 100_000)}
        last = group["last-delivered-id"]
        entries = cast(RawEntries, redis_client.xrange(key, max=last))
        acked |= {sid.decode() for sid, _ in entries if sid not in pending}
    assert acked, "nothing was acknowledged"
    assert acked <= received, f"{len(acked - received)} acked entries never reached a subscriber"
    assert len(acked) < 4 * per_node, "the stop did not interrupt the load"
    print(f"stopped in {stop_seconds:.1f} s with {len(acked)} of 20000 acknowledged")


def test_shard_count_mismatch_refused_while_entries_wait(
    settings_for: Settings, nodes_created: list[str], tmp_path: Path,
) -> None:
    settings = settings_for.replace(shards=2)
    produce(settings, nodes_created, 10)
    pool = PoolProcess(settings.replace(shards=3), tmp_path / "pool.log", "--shards", "3")
    try:
        assert pool.proc.wait(30) == exitcodes.SHARD_COUNT_MISMATCH
    finally:
        pool.kill()
    assert "written for 2 shards" in pool.output() and "--shards 2" in pool.output()
    assert shard_for(nodes_created[0], 2) in (0, 1)


def test_shard_count_change_allowed_when_no_waiting_entry_would_be_misread(
    settings_for: Settings, nodes_created: list[str], redis_client: redis.Redis,
) -> None:
    from scalepub.shard.streams import agree_shard_count

    keys = Keys(settings_for.key_prefix)
    assert agree_shard_count(redis_client, keys, 1) is None  # an earlier pool ran with 1
    settings = settings_for.replace(shards=4)
    # Producers switched to 4 first: refused while the pool runs with 1 (their rows would
    # wait in the outbox), so nothing is written where a pool would misread it.
    assert produce(settings, nodes_created, 5, refused_ok=True) == 5 * len(nodes_created)
    assert not any(b.lag for b in backlogs(redis_client, keys))
    assert agree_shard_count(redis_client, keys, 4) == 1  # nothing waits where 4 misreads
    assert redis_client.get(keys.shard_count) == b"4"
    assert {redis_client.hget(keys.meta(s), "shards") for s in range(4)} == {b"4"}
    produce(settings, nodes_created, 5)  # the pool runs with 4 now: accepted
    with pytest.raises(Exception, match="written for 4 shards"):
        agree_shard_count(redis_client, keys, 2)  # entries wait, written for 4
