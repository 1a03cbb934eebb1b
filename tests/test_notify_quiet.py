"""PostgreSQL: a one-statement create made while this process's relay leads sends no commit
notification (notify.QUIET_SETTING, migration 0003); the relay is woken in-process instead.
Anywhere else, and on the transaction path, commits notify as before.

The notifications are read by a LISTEN session of another connection, as another process's
relay would read them; the relays' polls are set to 60 s, so an entry that reaches Redis was
moved by a wake-up.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis
from django.db import connection, transaction
from twitter.models import Tweet

from scalepub.django import notify, onestatement, relay
from scalepub.django.runtime import runtime
from scalepub.settings import Settings
from tests.conftest import django_side
from tests.e2e import wait_until
from tests.streams import wait_for_entries

pytestmark = [pytest.mark.stack, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def polling_never(outbox_django: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Idle relays that would look only every 60 s: only wake-ups move rows."""
    monkeypatch.setattr(relay, "LISTENING_POLL_S", 60.0)
    yield from django_side(outbox_django.replace(outbox_poll_ms=60_000))


@pytest.fixture
def listener() -> Iterator[psycopg.Connection[Any]]:
    """A LISTEN session on the test database, as another process's relay keeps."""
    d = connection.settings_dict
    conn = psycopg.connect(dbname=str(d["NAME"]), user=str(d["USER"]),
                           password=str(d["PASSWORD"]), host=str(d["HOST"]),
                           port=int(str(d["PORT"])), autocommit=True)
    conn.execute(f"LISTEN {notify.CHANNEL}")
    yield conn
    conn.close()


def heard(listener: psycopg.Connection[Any], timeout: float = 1.0) -> int:
    return len(list(listener.notifies(timeout=timeout)))


@pytest.fixture
def leading(polling_never: Settings, redis_client: redis.Redis) -> Settings:
    """This process's relay thread holds the lease (started by a first save)."""
    Tweet.objects.create(author="ann", text="starts this process's relay")
    assert len(wait_for_entries(redis_client, polling_never, 1)) == 1
    assert wait_until(lambda: runtime.leads(connection.alias), timeout=10)
    return polling_never


def test_a_create_while_this_process_leads_is_quiet_and_still_moves(
        leading: Settings, listener: psycopg.Connection[Any],
        redis_client: redis.Redis) -> None:
    heard(listener, timeout=0.3)  # whatever the first save announced
    tweets = [Tweet.objects.create(author="bo", text=f"quiet {i}") for i in range(3)]
    assert heard(listener) == 0
    entries = wait_for_entries(redis_client, leading, 4, timeout=15)
    assert [e.env.node for e in entries][1:] == ["/twitter/Tweet/bo"] * 3
    assert [int(e.env.pk) for e in entries][1:] == [t.pk for t in tweets]


def test_the_control_a_leaders_create_notifies_with_quiet_off(
        leading: Settings, listener: psycopg.Connection[Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onestatement, "QUIET", False)
    heard(listener, timeout=0.3)
    Tweet.objects.create(author="bo", text="heard")
    assert heard(listener, timeout=5) == 1


def test_quiet_lasts_one_statement(leading: Settings, listener: psycopg.Connection[Any],
                                   redis_client: redis.Redis) -> None:
    """The same session's next transaction notifies again (a transaction-path create)."""
    heard(listener, timeout=0.3)
    Tweet.objects.create(author="bo", text="quiet")
    with transaction.atomic():  # inside a transaction: the transaction path
        Tweet.objects.create(author="bo", text="in a transaction")
    assert heard(listener, timeout=5) == 1
    assert len(wait_for_entries(redis_client, leading, 3, timeout=15)) == 3


@pytest.fixture
def no_relay_here(outbox_django: Settings) -> Iterator[Settings]:
    """No relay thread in this process (``OUTBOX_RELAY = "external"``)."""
    yield from django_side(outbox_django.replace(outbox_relay="external"))


def test_a_create_where_no_relay_of_this_process_leads_notifies(
        no_relay_here: Settings, listener: psycopg.Connection[Any]) -> None:
    Tweet.objects.create(author="bo", text="first")  # the outbox table looked up
    heard(listener, timeout=0.3)
    assert not runtime.leads(connection.alias)
    Tweet.objects.create(author="bo", text="someone else's relay must hear it")
    assert heard(listener, timeout=5) == 1
