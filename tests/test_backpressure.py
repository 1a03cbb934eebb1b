"""Backpressure: XMPP slower than the producers keeps Redis bounded, loses nothing, shows lag."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from prometheus_client import REGISTRY
from twitter.models import Tweet

from scalepub.django.models import OutboxEntry
from scalepub.settings import Settings
from scalepub.sharding import Keys
from scalepub.status import collect, collect_relays
from tests.conftest import django_side
from tests.e2e import (
    Collector,
    PoolProcess,
    assert_complete_and_ordered,
    create_nodes,
    wait_until,
)
from tests.stack import Stack

pytestmark = [pytest.mark.stack, pytest.mark.django_db(transaction=True)]

MAXLEN = 2_000
TWEETS = 8_000


def ejabberd_pid(stack: Stack) -> int:
    """The beam process of this stack's ejabberd node."""
    node = stack.control["SCALEPUB_EJABBERD_NODE"].encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"beam" in cmdline and node in cmdline:
            return int(pid)
    raise AssertionError(f"no ejabberd process for node {node!r}")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def backpressure_refusals() -> float:
    return REGISTRY.get_sample_value("scalepub_outbox_relay_errors_total",
                                     {"reason": "backpressure"}) or 0.0


@pytest.fixture
def small_streams(settings_for: Settings) -> Iterator[Settings]:
    """Outbox delivery, relay thread in this process, 2 shards of at most MAXLEN waiting."""
    settings = settings_for.replace(delivery="outbox", stream_maxlen=MAXLEN, shards=2)
    yield from django_side(settings)


@pytest.mark.timeout(300)
def test_stalled_xmpp_bounds_redis_and_loses_nothing(
    small_streams: Settings, stack: Stack, redis_client: redis.Redis, tmp_path: Path
) -> None:
    authors = [f"bp{uuid.uuid4().hex[:6]}u{i}" for i in range(40)]
    nodes = [f"/twitter/Tweet/{a}" for a in authors]
    create_nodes(stack.env, nodes)
    keys = Keys(small_streams.key_prefix)
    collector = Collector(stack.env, nodes).start()
    pool = PoolProcess(small_streams, tmp_path / "pool.log", "--shards", "2")
    beam = ejabberd_pid(stack)
    refusals = backpressure_refusals()
    try:
        pool.wait_serving(redis_client)
        shard_rss = {pid: rss_bytes(pid) for pid in pool.shard_pids()}
        os.kill(beam, signal.SIGSTOP)  # XMPP now infinitely slower than the producers
        stalled_at = time.monotonic()
        for i in range(TWEETS):
            Tweet.objects.create(author=authors[i % len(authors)], text=f"while stalled {i}")
        # The relay fills the streams up to MAXLEN waiting entries, then is refused.
        assert wait_until(lambda: backpressure_refusals() > refusals, timeout=60)
        assert wait_until(lambda: any(r.refusing and r.rows >= TWEETS - 2 * MAXLEN for r in
                                      collect_relays(small_streams, redis_client)), timeout=10)
        statuses = collect(small_streams, redis_client)
        waiting = [s.lag + s.pending for s in statuses]
        lengths = [int(redis_client.xlen(keys.stream(s))) for s in range(2)]
        in_outbox = OutboxEntry.objects.count()
        grown = {pid: rss_bytes(pid) - before for pid, before in shard_rss.items()}
        print(f"stalled: waiting per shard {waiting}, stream lengths {lengths}, "
              f"outbox {in_outbox}, shard RSS growth {sorted(grown.values())} bytes")
        assert all(0 < w <= MAXLEN for w in waiting), waiting  # lag visible, and bounded
        assert all(n <= MAXLEN for n in lengths), lengths  # Redis memory bounded
        assert in_outbox >= TWEETS - 2 * MAXLEN  # the rest waits, durable, in the database
        assert all(g < 64 * 2**20 for g in grown.values()), grown
        os.kill(beam, signal.SIGCONT)
        resumed_at = time.monotonic()
        assert collector.wait_for(lambda got: len({(g.node, g.seq) for g in got}) >= TWEETS,
                                  timeout=180), (collector.count(), pool.output()[-3000:])
        print(f"stalled {resumed_at - stalled_at:.1f} s; all {TWEETS} delivered "
              f"{time.monotonic() - resumed_at:.1f} s after the stall ended")
    finally:
        os.kill(beam, signal.SIGCONT)
        pool.kill()
        collector.stop()
    assert_complete_and_ordered(collector.by_node(), dict.fromkeys(nodes, TWEETS // 40))
    assert wait_until(lambda: not OutboxEntry.objects.exists(), timeout=30)
