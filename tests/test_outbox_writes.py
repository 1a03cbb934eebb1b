"""How outbox rows reach the database (issue 17 §3): few statements, no round trip of their own.

- ``publish_many`` of many rows (after ``bulk_create``) is one INSERT statement, ids in order.
- PostgreSQL (psycopg 3): a registered create under autocommit sends its outbox row together
  with the COMMIT in one pipeline, after the model's INSERT; the commit still notifies the
  relays, and a row written inside a savepoint is not held (its rollback takes it back) while
  the rows held before it keep their order.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from django.db import IntegrityError, connection, transaction
from django.test.utils import CaptureQueriesContext
from twitter.models import Tweet

import scalepub
from scalepub.django import atomic, notify, onestatement
from scalepub.django.models import OutboxEntry
from scalepub.django.registry import registry
from scalepub.django.runtime import runtime
from scalepub.settings import Settings
from tests.conftest import django_side

pytestmark = [pytest.mark.stack]


@pytest.fixture
def outbox_kept(settings_for: Settings) -> Iterator[Settings]:
    """``outbox`` delivery with no relay thread: rows stay in the outbox for the checks."""
    yield from django_side(settings_for.replace(delivery="outbox", outbox_relay="external"))


def outbox_inserts(queries: list[dict[str, Any]]) -> list[str]:
    return [q["sql"] for q in queries if q["sql"].startswith('INSERT INTO "scalepub_outbox"')]


@pytest.mark.django_db(transaction=True)
def test_publish_many_writes_its_rows_in_one_statement(outbox_kept: Settings) -> None:
    rows = [Tweet(author=f"a{i % 7}", text=f"bulk {i}") for i in range(150)]
    with CaptureQueriesContext(connection) as captured, transaction.atomic():
        created = Tweet.objects.bulk_create(rows)
        scalepub.publish_many(created)
    assert len(outbox_inserts(captured.captured_queries)) == 1
    entries = list(OutboxEntry.objects.order_by("id"))
    assert [e.object_pk for e in entries] == [str(t.pk) for t in created]


class Statements:
    """Django ``execute_wrapper``: each statement with the pipeline status of psycopg."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bool]] = []

    def __call__(self, execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        raw = context["connection"].connection
        piped = raw.pgconn.pipeline_status != psycopg.pq.PipelineStatus.OFF
        self.seen.append((sql.split("(", maxsplit=1)[0].strip(), piped))
        return execute(sql, params, many, context)


def session() -> psycopg.Connection[Any]:
    """Another session on the test database."""
    d = connection.settings_dict
    return psycopg.connect(dbname=str(d["NAME"]), user=str(d["USER"]), password=str(d["PASSWORD"]),
                           host=str(d["HOST"]), port=int(str(d["PORT"])), autocommit=True)


@pytest.fixture
def listener() -> Iterator[psycopg.Connection[Any]]:
    conn = session()
    conn.execute(f"LISTEN {notify.CHANNEL}")
    yield conn
    conn.close()


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_postgres_outbox_row_rides_with_the_commit(outbox_kept: Settings,
                                                   listener: psycopg.Connection[Any],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # The transaction path (where a create cannot be one statement: tests/test_one_statement)
    monkeypatch.setattr(onestatement, "ENABLED", False)
    statements = Statements()

    enter = atomic._Outer.__enter__

    def innermost(block: atomic._Outer) -> None:
        # inside scalepub's own wrapper, which the block installs as the create's transaction
        # begins
        enter(block)
        connection.execute_wrappers.append(statements)

    monkeypatch.setattr(atomic._Outer, "__enter__", innermost)
    try:
        tweet = Tweet.objects.create(author="ann", text="pipelined")
    finally:
        connection.execute_wrappers.remove(statements)
    # the model's INSERT rides in a pipeline with psycopg's BEGIN, the outbox row with the
    # COMMIT: two round trips for the save, as many as one statement inside a transaction
    assert [s for s in statements.seen if s[0].startswith("INSERT")] == [
        ('INSERT INTO "twitter_tweet"', True), ('INSERT INTO "scalepub_outbox"', True)]
    assert [n.channel for n in listener.notifies(timeout=5, stop_after=1)] == [notify.CHANNEL]
    other = session()
    try:  # committed: another session sees the row and its entry (no relay moves it)
        assert other.execute("SELECT count(*) FROM twitter_tweet WHERE id = %s",
                             [tweet.pk]).fetchone() == (1,)
        assert other.execute("SELECT count(*) FROM scalepub_outbox WHERE object_pk = %s",
                             [str(tweet.pk)]).fetchone() == (1,)
    finally:
        other.close()


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_postgres_savepoint_rows_are_not_held_and_order_is_kept(
        outbox_kept: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    # The transaction path (Held), and creates inside the create's own block: its node rule
    # is the user code that runs there, before the create's own entry is written.
    monkeypatch.setattr(onestatement, "ENABLED", False)
    original = registry.get(Tweet)
    assert original is not None

    def nested(tweet: Tweet) -> str:
        if tweet.text == "outer":
            Tweet.objects.create(author="ann", text="held too")
            with transaction.atomic():  # a savepoint: the held rows are written first
                Tweet.objects.create(author="ann", text="in a savepoint")
            try:
                with transaction.atomic():
                    Tweet.objects.create(author="ann", text="rolled back")
                    raise IntegrityError("the savepoint rolls back")
            except IntegrityError:
                pass
        return original.node_for(tweet)

    scalepub.register(Tweet, node=nested)
    try:
        Tweet.objects.create(author="ann", text="outer")
    finally:
        scalepub.register(Tweet, node=original.node)
    rows = dict(Tweet.objects.values_list("pk", "text"))
    assert sorted(rows.values()) == ["held too", "in a savepoint", "outer"]
    announced = [rows[int(pk)] for pk in
                 OutboxEntry.objects.order_by("id").values_list("object_pk", flat=True)]
    assert announced == ["held too", "in a savepoint", "outer"]  # ids in announcement order


def wakes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Calls of the relay's wake, recorded (the hook announce registers on commit)."""
    calls: list[str] = []
    monkeypatch.setattr(runtime, "wake", lambda using, notified=True: calls.append(using))
    return calls


@pytest.mark.django_db(transaction=True)
def test_saves_in_one_transaction_wake_the_relay_once(outbox_kept: Settings,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    called = wakes(monkeypatch)
    with transaction.atomic():
        for i in range(5):
            Tweet.objects.create(author="ann", text=f"one of five {i}")
        assert len(connection.run_on_commit) == 1  # one hook, not one per save
        assert called == []  # not before the commit
    assert called == [connection.alias]
    assert OutboxEntry.objects.count() == 5


@pytest.mark.django_db(transaction=True)
def test_a_rolled_back_savepoint_keeps_the_wake_of_the_rows_before_it(
        outbox_kept: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    called = wakes(monkeypatch)
    with transaction.atomic():
        with transaction.atomic():  # a savepoint: its hook is its own
            Tweet.objects.create(author="ann", text="rolled back")
            transaction.set_rollback(True)
        Tweet.objects.create(author="ann", text="kept")  # its hook is not the dropped one
        with transaction.atomic():  # the outer hook covers a row inside a savepoint
            Tweet.objects.create(author="ann", text="kept too")
        assert len(connection.run_on_commit) == 1
    assert called == [connection.alias]
    assert [e.object_pk for e in OutboxEntry.objects.order_by("id")] == [
        str(t.pk) for t in Tweet.objects.filter(text__startswith="kept").order_by("id")]
    called.clear()
    Tweet.objects.create(author="ann", text="autocommit")  # its own transaction: its own wake
    assert called and set(called) == {connection.alias}  # PostgreSQL's one statement: twice
