"""The relay round of a sparse commit (loadtest/bench_paced_save.py): one round per commit,
its statements on the DB-API connection, Django's cursor where something watches queries.

Runs in both passes (SQLite and PostgreSQL); the test of the notified leader is PostgreSQL's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any, cast

import pytest
import redis
from django.db import connection
from twitter.models import Tweet

from scalepub.django import outbox, relay
from scalepub.django.relay import Relay, Round
from scalepub.django.runtime import runtime
from scalepub.producer import PendingEntry, StreamProducer
from scalepub.settings import Settings
from scalepub.sharding import shard_for
from tests.conftest import django_side
from tests.e2e import wait_until
from tests.streams import wait_for_entries

pytestmark = [pytest.mark.stack, pytest.mark.django_db(transaction=True)]

SAVES = 10


@pytest.fixture
def polling_never(outbox_django: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Idle relays that would look only every 60 s: commits alone wake them."""
    monkeypatch.setattr(relay, "LISTENING_POLL_S", 60.0)
    yield from django_side(outbox_django.replace(outbox_poll_ms=60_000))


def _this_process_relay(settings: Settings, redis_client: redis.Redis) -> Relay:
    """Start this process's relay with a first save; it leads once that entry is in Redis."""
    Tweet.objects.create(author="ann", text="starts this process's relay")
    assert len(wait_for_entries(redis_client, settings, 1)) == 1
    return runtime._relays[connection.alias].relay


def _count_rounds(monkeypatch: pytest.MonkeyPatch, leader: Relay) -> list[Round]:
    """The rounds the relay thread runs from now on."""
    rounds: list[Round] = []
    original = leader.relay_once

    def counted() -> Round:
        done = original()
        rounds.append(done)
        return done

    monkeypatch.setattr(leader, "relay_once", counted)
    return rounds


def test_sparse_commits_each_move_at_once_in_one_round(
        polling_never: Settings, redis_client: redis.Redis,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With no poll to fall back on, every commit still reaches Redis (woken by the commit:
    its own process's wake-up on SQLite, the notification on PostgreSQL), in one round."""
    leader = _this_process_relay(polling_never, redis_client)
    time.sleep(0.5)  # idle now; on PostgreSQL LISTENing (its first wake-up done)
    rounds = _count_rounds(monkeypatch, leader)
    for i in range(SAVES):
        Tweet.objects.create(author="bob", text=f"sparse {i}")
        def relayed(count: int = i + 2) -> bool:
            return len(read_nodes(redis_client, polling_never)) == count

        assert wait_until(relayed, timeout=5), f"commit {i} not relayed in 5 s ({rounds})"
        time.sleep(0.02)
    time.sleep(0.3)
    assert [r.moved for r in rounds if r.moved] == [1] * SAVES, rounds
    # On PostgreSQL the commit wakes the relay once (its notification), not also from this
    # process: that second wake-up was an empty round (a SELECT finding nothing) per commit.
    assert sum(1 for r in rounds if not r.moved) <= 1, rounds


def read_nodes(client: redis.Redis, settings: Settings) -> list[str]:
    """The nodes of the entries in Redis so far."""
    return [e.env.node for e in wait_for_entries(client, settings, 0, timeout=0)]


@pytest.mark.postgres
def test_a_listening_leader_is_not_woken_by_its_own_commits(
        polling_never: Settings, redis_client: redis.Redis) -> None:
    leader = _this_process_relay(polling_never, redis_client)
    assert wait_until(lambda: leader.notified, timeout=10), "the LISTEN session never came up"
    wake = runtime._relays[connection.alias].wake
    time.sleep(0.3)
    wake.clear()
    runtime.wake(connection.alias)  # what a commit of this process calls
    assert not wake.is_set()
    # the listener is what wakes it
    Tweet.objects.create(author="cy", text="notified")
    entries = wait_for_entries(redis_client, polling_never, 2, timeout=10)
    assert [e.env.node for e in entries][-1] == "/twitter/Tweet/cy"


def test_relay_statements_skip_djangos_cursor_unless_watched(outbox_django: Settings) -> None:
    """oldest_entries/delete/count run on the DB-API connection (Django's cursor refuses here), and
    through Django's cursor while an execute_wrapper watches (it sees every statement)."""
    entries = [PendingEntry(f"/n/{i}", time.time_ns(), "twitter.tweet", str(i), "xml",
                            b"<o>%d</o>" % i) for i in range(3)]
    outbox.write(entries, connection.alias)
    connection.ensure_connection()

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the relay's statement went through Django's cursor")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(connection, "cursor", refuse)
        rows = outbox.oldest_entries(connection.alias, 2)
        assert [(r.node, r.pk, r.payload) for r in rows] == [
            ("/n/0", "0", b"<o>0</o>"), ("/n/1", "1", b"<o>1</o>")]
        assert outbox.count(connection.alias) == 3
        outbox.delete(connection.alias, [cast(int, rows[0].oid)])  # oldest_entries sets oids
    seen: list[str] = []

    def watch(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        seen.append(sql.split(maxsplit=1)[0])
        return execute(sql, params, many, context)

    with connection.execute_wrapper(watch):
        rows = outbox.oldest_entries(connection.alias, 10)
        assert [r.pk for r in rows] == ["1", "2"]
        outbox.delete(connection.alias, [cast(int, r.oid) for r in rows])
        assert outbox.count(connection.alias) == 0
    assert seen == ["SELECT", "DELETE", "SELECT"]


def test_a_round_over_several_shards_is_one_pipeline_without_script_exists(
        settings_for: Settings, redis_client: redis.Redis) -> None:
    """The relay's append of rows of several shards: one EVALSHA per shard in one pipeline,
    no SCRIPT EXISTS round trip first; a Redis that lost the script still takes them."""
    producer = StreamProducer(settings_for)
    nodes = [f"/round/{i}" for i in range(40)]
    shards = {shard_for(n, settings_for.shards) for n in nodes}
    assert len(shards) == settings_for.shards
    entries = [PendingEntry(n, time.time_ns(), "twitter.tweet", str(i), "xml", b"<o/>", oid=i)
               for i, n in enumerate(nodes)]
    try:
        producer.append(entries[:1], source="round-test")  # loads the script
        redis_client.config_resetstat()
        result = producer.append(entries[1:20], source="round-test")
        assert not result.failures and len(result.appended) == 19
        stats = redis_client.info("commandstats")
        assert "cmdstat_script|exists" not in stats, stats
        redis_client.script_flush()
        result = producer.append(entries[20:], source="round-test")
        assert not result.failures and len(result.appended) == 20
    finally:
        producer.close()
    assert len(read_nodes(redis_client, settings_for)) == 40


def test_an_idle_leader_looks_about_once_a_second_and_still_finds_unannounced_rows(
        outbox_django: Settings, redis_client: redis.Redis,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Woken by commits (notifications on PostgreSQL, this process's wake-ups and the other
    relays' nudges elsewhere), an idle leader's poll is the 1 s safety net, not a round every
    OUTBOX_POLL_MS (10 ms: 100 empty rounds a second on SQLite before)."""
    leader = _this_process_relay(outbox_django, redis_client)
    assert wait_until(lambda: leader.notified or leader._nudged(), timeout=10)
    time.sleep(0.3)
    rounds = _count_rounds(monkeypatch, leader)
    time.sleep(2.0)
    assert len(rounds) <= 4, f"{len(rounds)} rounds in 2 s idle"
    # a row nobody announced (no wake-up, no nudge: e.g. a process without a relay thread)
    # moves at the safety net's next look
    outbox.write([PendingEntry("/twitter/Tweet/quiet", time.time_ns(), "twitter.tweet", "7",
                               "xml", b"<object/>")], connection.alias)
    entries = wait_for_entries(redis_client, outbox_django, 2, timeout=5)
    assert [e.env.node for e in entries][-1] == "/twitter/Tweet/quiet"


@pytest.mark.parametrize("mode", ["thread", "external"])
def test_the_idle_poll_stays_short_where_nobody_nudges(outbox_django: Settings,
                                                      mode: str) -> None:
    """With ``OUTBOX_RELAY = "external"`` no process runs a relay thread to nudge the service:
    without LISTEN/NOTIFY it keeps polling every OUTBOX_POLL_MS."""
    settings = outbox_django.replace(outbox_relay=mode, outbox_poll_ms=7.0)
    leader, wake, stop = Relay(settings), threading.Event(), threading.Event()
    try:
        assert leader.lease.hold()
        leader._idle_wait(wake, stop)  # opens its LISTEN session or nudge subscription
        session = leader._listener or leader._nudges
        assert session is not None and wait_until(lambda: session.listening, timeout=10)
        waits = leader._idle_wait(wake, stop)
    finally:
        stop.set()
        leader._unsubscribe()
        if leader._listener is not None:
            leader._listener.join()
        leader.lease.release()
    notified = connection.vendor == "postgresql"  # every writer's commit notifies
    expected = relay.LISTENING_POLL_S if notified or mode == "thread" else 0.007
    assert waits == expected


def _spin(seconds: float) -> None:
    """Use ``seconds`` of this thread's CPU."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_the_gather_window_keeps_its_floor_while_the_process_idles() -> None:
    assert relay.round_gap(0.0, 0.0) == relay._MIN_ROUND_GAP_S
    assert relay.round_gap(0.0, relay._BUSY_FROM) == relay._MIN_ROUND_GAP_S


def test_the_gather_window_widens_with_the_process_load_up_to_its_cap() -> None:
    gaps = [relay.round_gap(0.0, tenths / 10) for tenths in range(11)]
    assert gaps == sorted(gaps)
    middle = relay.round_gap(0.0, (relay._BUSY_FROM + relay._BUSY_FULL) / 2)
    assert relay._MIN_ROUND_GAP_S < middle < relay._MAX_ROUND_GAP_S
    assert relay.round_gap(0.0, relay._BUSY_FULL) == relay._MAX_ROUND_GAP_S
    assert relay.round_gap(0.0, 1.0) == relay._MAX_ROUND_GAP_S
    # a round that cost more CPU than the floor allows still spaces the next by its CPU
    took = relay._MAX_ROUND_GAP_S / relay._ROUND_GAP_FACTOR / 2
    assert relay.round_gap(took, 0.0) == relay._ROUND_GAP_FACTOR * took


def test_process_load_counts_the_other_threads_not_the_caller() -> None:
    load = relay.ProcessLoad()
    _spin(0.2)  # the relay's own rounds are not the load it backs off from
    assert load.others() < relay._BUSY_FROM
    spinner = threading.Thread(target=_spin, args=(0.3,))
    spinner.start()
    spinner.join()
    assert load.others() > relay._BUSY_FROM


def test_rows_coming_fast_count_as_a_busy_process_without_its_cpu() -> None:
    """On a machine short of cores the saving thread gets little CPU, yet rows keep coming:
    at twice _FULL_RATE rows a second the window is as wide as for a busy process."""
    load = relay.ProcessLoad()
    time.sleep(2 * relay._LOAD_AVERAGE_S)
    assert load.busy(0) < relay._BUSY_FROM
    time.sleep(2 * relay._LOAD_AVERAGE_S)
    assert load.busy(int(4 * relay._LOAD_AVERAGE_S * relay._FULL_RATE)) >= relay._BUSY_FULL
    time.sleep(2 * relay._LOAD_AVERAGE_S)  # then none: the average follows
    assert load.busy(int(4 * relay._LOAD_AVERAGE_S * relay._FULL_RATE)) < relay._BUSY_FROM


def test_process_load_is_not_fooled_by_one_save_between_two_looks() -> None:
    """Paced saves (100/s) fall one at a time between two of the relay's looks a few ms
    apart: busy for that gap, not for the process (the window would delay their entries)."""
    load = relay.ProcessLoad()
    time.sleep(2 * relay._LOAD_AVERAGE_S)
    assert load.others() < relay._BUSY_FROM
    spinner = threading.Thread(target=_spin, args=(relay._LOAD_AVERAGE_S / 50,))
    spinner.start()
    spinner.join()
    assert load.others() < relay._BUSY_FROM


@pytest.mark.parametrize("busy_window", [True, False])
def test_saving_flat_out_widens_the_relay_window(
        outbox_django: Settings, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch,
        busy_window: bool) -> None:
    """While this process saves flat out its relay sizes its window by that load (fewer,
    fuller rounds); with BUSY_WINDOW off (the control) by its own rounds' CPU alone. Every
    entry arrives either way."""
    monkeypatch.setattr(relay, "BUSY_WINDOW", busy_window)
    _this_process_relay(outbox_django, redis_client)
    loads: list[float] = []
    original = relay.round_gap

    def recorded(took: float, busy: float = 0.0) -> float:
        loads.append(busy)
        return original(took, busy)

    monkeypatch.setattr(relay, "round_gap", recorded)
    saves, end = 0, time.monotonic() + 1.0
    while time.monotonic() < end:
        Tweet.objects.create(author=f"a{saves % 16}", text=f"flat out {saves}")
        saves += 1
    assert len(wait_for_entries(redis_client, outbox_django, saves + 1, timeout=10)) == saves + 1
    assert loads, "no round gathered a window"
    if busy_window:
        assert max(loads) > relay._BUSY_FROM, loads
        assert max(original(0.0, b) for b in loads) > relay._MIN_ROUND_GAP_S
    else:
        assert set(loads) == {0.0}, loads


@pytest.mark.postgres
def test_a_one_statement_create_starts_this_process_relay(
        outbox_django: Settings, redis_client: redis.Redis) -> None:
    """A process that saves but serves no request (a management command) runs a relay once
    it commits outbox rows, also when the create is one statement (PostgreSQL) that sends a
    commit notification (its relay does not lead: it has none)."""
    _this_process_relay(outbox_django, redis_client)  # the create's statement is ready
    runtime.stop()
    assert connection.alias not in runtime.relaying()
    Tweet.objects.create(author="dee", text="starts this process's relay again")
    assert connection.alias in runtime.relaying()
    assert len(wait_for_entries(redis_client, outbox_django, 2)) == 2
