"""PostgreSQL: the one-statement create is a prepared statement named by its content
(scalepub/django/prepared.py), and a session that does not hold it as recorded still saves.

What the server receives is read from libpq's trace of the Django connection (tests/
test_one_statement.Trips): a prepared statement shows as a Parse carrying its name, its
executions as a Bind naming it; Django's own client-side binding sends a simple Query.
The misses are made the way a transaction-mode pooler or a hand-sent DEALLOCATE would make
them: the server session loses the statement (or holds it already) behind the record.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connection
from twitter.models import Tweet

from scalepub.django import onestatement, prepared
from scalepub.django.models import OutboxEntry
from scalepub.settings import Settings
from tests.conftest import django_side
from tests.test_one_statement import Trips, check_entry, warm

pytestmark = [pytest.mark.stack, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]
NODE = "/twitter/Tweet/ann"


@pytest.fixture
def kept(settings_for: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """``outbox`` delivery, no relay thread (rows stay for the checks); misses counted
    afresh."""
    monkeypatch.setattr(prepared, "_misses", {})
    yield from django_side(settings_for.replace(delivery="outbox", outbox_relay="external"))


def _named(trips: Trips, kind: str) -> list[str]:
    """Trace lines of ``kind`` (Parse, Bind) that name one of scalepub's statements."""
    return [line for line in trips.lines if f"\t{kind}\t" in line and '"scalepub_' in line]


def _statements() -> list[str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT name FROM pg_prepared_statements WHERE name LIKE 'scalepub_%%'")
        return [name for (name,) in cursor.fetchall()]


def test_the_create_is_parsed_once_then_only_bound(kept: Settings) -> None:
    warm(Tweet(author="bob", text="first"))
    connection.close()  # a new session: nothing prepared yet
    with Trips() as first:
        Tweet.objects.create(author="bob", text="the session's first")
    assert len(_named(first, "Parse")) == 1 and first.count == 2, first.lines
    with Trips() as trips:
        tweets = [Tweet.objects.create(author="ann", text=f"n{i} <&> é") for i in range(3)]
    assert _named(trips, "Parse") == [], trips.lines
    assert len(_named(trips, "Bind")) == 3 and trips.count == 3, trips.seen
    assert len(_statements()) == 1
    for tweet in tweets:
        check_entry(tweet, kept.payload_format, NODE)


def test_switched_off_the_create_goes_as_django_sends_it(
    kept: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control: Django's client-side binding, one simple Query with the values in it."""
    monkeypatch.setattr(prepared, "ENABLED", False)
    connection.close()
    warm(Tweet(author="bob", text="first"))
    with Trips() as trips:
        tweet = Tweet.objects.create(author="ann", text="client side")
    assert _named(trips, "Bind") == [] and trips.count == 1, trips.lines
    assert any("\tQuery\t" in line and "client side" in line for line in trips.lines)
    assert _statements() == []
    check_entry(tweet, kept.payload_format, NODE)


def test_a_session_that_lost_the_statement_prepares_it_again(kept: Settings) -> None:
    """DEALLOCATE ALL (psycopg sends it after a rollback when prepare_threshold is set)."""
    warm(Tweet(author="bob", text="first"))
    connection.connection.execute("DEALLOCATE ALL")  # behind the record's back
    with Trips() as trips:
        tweet = Tweet.objects.create(author="ann", text="after DEALLOCATE")
    assert len(_named(trips, "Parse")) == 1 and len(_named(trips, "Bind")) == 2, trips.lines
    check_entry(tweet, kept.payload_format, NODE)
    assert OutboxEntry.objects.count() == 2 and Tweet.objects.count() == 2
    assert prepared._misses == {}
    with Trips() as trips:  # prepared again: only bound
        again = Tweet.objects.create(author="ann", text="bound")
    assert _named(trips, "Parse") == [] and len(_named(trips, "Bind")) == 1, trips.lines
    check_entry(again, kept.payload_format, NODE)


def test_a_session_that_loses_it_again_at_once_sends_it_unprepared(
    kept: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As behind a transaction-mode pooler: the Parse and the Bind reach different server
    sessions, so the statement is missing even right after it was prepared."""
    warm(Tweet(author="bob", text="first"))
    original, pooled = prepared._Cursor._send_query_prepared, [True]

    def dropped(self: Any, name: bytes, *args: Any, **kwargs: Any) -> None:
        if pooled[0]:
            self.connection.pgconn.exec_(b"DEALLOCATE ALL")  # another session's state
        original(self, name, *args, **kwargs)

    monkeypatch.setattr(prepared._Cursor, "_send_query_prepared", dropped)
    tweet = Tweet.objects.create(author="ann", text="after two misses")
    check_entry(tweet, kept.payload_format, NODE)
    assert prepared._misses == {"default": 1}
    pooled[0] = False
    with Trips() as trips:  # this session prepares no more; it still is one statement
        again = Tweet.objects.create(author="ann", text="unprepared")
    assert _named(trips, "Parse") == [] and _named(trips, "Bind") == [], trips.lines
    assert trips.count == 1, trips.seen
    check_entry(again, kept.payload_format, NODE)


def test_a_session_that_holds_it_already_still_saves(kept: Settings) -> None:
    """As when a pooler hands over a server session where another client prepared it."""
    warm(Tweet(author="bob", text="first"))
    setattr(connection, prepared._SESSION, None)  # the record forgets; the server has it
    tweet = Tweet.objects.create(author="ann", text="name taken")
    check_entry(tweet, kept.payload_format, NODE)
    assert prepared._misses == {"default": 1}
    assert Tweet.objects.count() == 2 and OutboxEntry.objects.count() == 2


def test_a_failed_create_is_no_miss(kept: Settings) -> None:
    """A statement that was prepared and then failed (a constraint) stays prepared."""
    warm(Tweet(author="bob", text="first"))
    connection.close()
    with pytest.raises(Exception, match="null value"):
        Tweet.objects.create(author=None, text="author is NOT NULL")
    with Trips() as trips:
        tweet = Tweet.objects.create(author="ann", text="the next one")
    assert _named(trips, "Parse") == [] and len(_named(trips, "Bind")) == 1, trips.lines
    assert prepared._misses == {}
    check_entry(tweet, kept.payload_format, NODE)


def test_after_max_misses_the_process_stops_preparing_and_says_so(
    kept: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(prepared, "MAX_MISSES", 2)
    warm(Tweet(author="bob", text="first"))
    with caplog.at_level(logging.DEBUG, logger="scalepub.django.prepared"):
        for i in range(2):  # as new client connections handed a session that has it
            setattr(connection, prepared._SESSION, None)
            check_entry(Tweet.objects.create(author="ann", text=f"miss {i}"),
                        kept.payload_format, NODE)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "connection pooler" in warnings[0].getMessage()
    connection.close()  # even a new session: the process sends Django's statement now
    warm(Tweet(author="bob", text="second"))
    with Trips() as trips:
        tweet = Tweet.objects.create(author="ann", text="as Django sends it")
    assert _named(trips, "Bind") == [] and trips.count == 1, trips.lines
    assert _statements() == []
    check_entry(tweet, kept.payload_format, NODE)
    assert onestatement.ENABLED  # still one statement, only unprepared
