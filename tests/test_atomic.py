"""A registered create and its outbox entry are one unit, also under autocommit (issue 12.1).

A trigger makes every insert into ``scalepub_outbox`` fail (on SQLite and, in make test's
PostgreSQL pass, on PostgreSQL): each covered create path must then raise and leave no row behind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.db import DatabaseError, connection, transaction
from django.test.utils import CaptureQueriesContext
from twitter.models import Tweet

import scalepub
from scalepub.django import atomic
from scalepub.django.models import OutboxEntry
from scalepub.settings import Settings

pytestmark = [pytest.mark.stack, pytest.mark.django_db(transaction=True)]

REFUSED = "outbox refused by the test trigger"


@pytest.fixture
def refusing_outbox(outbox_django: Settings) -> Iterator[Settings]:
    """Every INSERT into scalepub_outbox aborts (a database error in the entry's write)."""
    create, drop = REFUSING_TRIGGER[connection.vendor]
    with connection.cursor() as cursor:
        cursor.execute(create)
    try:
        yield outbox_django
    finally:
        with connection.cursor() as cursor:
            cursor.execute(drop)


# vendor -> (create, drop): a trigger that aborts every INSERT into scalepub_outbox
REFUSING_TRIGGER = {
    "sqlite": ("CREATE TRIGGER scalepub_test_refuse BEFORE INSERT ON scalepub_outbox "
               f"BEGIN SELECT RAISE(ABORT, '{REFUSED}'); END",
               "DROP TRIGGER IF EXISTS scalepub_test_refuse"),
    "postgresql": ("CREATE FUNCTION scalepub_test_refuse() RETURNS trigger LANGUAGE plpgsql AS "
                   f"$$ BEGIN RAISE EXCEPTION '{REFUSED}'; END $$; "
                   "CREATE TRIGGER scalepub_test_refuse BEFORE INSERT ON scalepub_outbox "
                   "FOR EACH ROW EXECUTE FUNCTION scalepub_test_refuse()",
                   "DROP FUNCTION IF EXISTS scalepub_test_refuse() CASCADE"),
}


def _in_atomic(make: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        with transaction.atomic():
            return make()
    return run


async def _acreate() -> Tweet:
    return await Tweet.objects.acreate(author="ann", text="acreate")


COVERED: dict[str, Callable[[], Any]] = {
    "save": lambda: Tweet(author="ann", text="save").save(),
    "create": lambda: Tweet.objects.create(author="ann", text="create"),
    "acreate": async_to_sync(_acreate),
    "get_or_create": lambda: Tweet.objects.get_or_create(author="ann", text="get_or_create"),
    "update_or_create": lambda: Tweet.objects.update_or_create(
        author="ann", defaults={"text": "update_or_create"}),
    "scalepub.bulk_create": lambda: scalepub.bulk_create(
        [Tweet(author="ann", text="bulk 1"), Tweet(author="bob", text="bulk 2")]),
    "publish_many in atomic": _in_atomic(lambda: scalepub.publish_many(
        Tweet.objects.bulk_create([Tweet(author="ann", text="b1"), Tweet(author="c", text="b2")]))),
    "create in atomic": _in_atomic(lambda: Tweet.objects.create(author="ann", text="in atomic")),
}


@pytest.mark.parametrize("path", list(COVERED))
def test_a_failed_entry_write_fails_the_create_and_leaves_no_row(
    refusing_outbox: Settings, path: str
) -> None:
    with pytest.raises(DatabaseError, match=REFUSED):
        COVERED[path]()
    assert not Tweet.objects.exists()
    assert not OutboxEntry.objects.exists()


def test_saving_again_after_a_failed_create_is_atomic_too(refusing_outbox: Settings) -> None:
    tweet = Tweet(author="ann", text="retried")
    with pytest.raises(DatabaseError, match=REFUSED):
        tweet.save()
    # One statement (onestatement) fails whole and Django never gets a pk back; on the
    # transaction path Django leaves this (the INSERT ran, post_save failed):
    tweet.pk, tweet._state.adding = 10**9, False
    with pytest.raises(DatabaseError, match=REFUSED):
        tweet.save()  # an UPDATE of nothing, then an INSERT: a create after all
    assert not Tweet.objects.exists()


def test_without_the_wrapper_autocommit_leaves_a_row_without_entry(
    refusing_outbox: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bug the wrapper fixes, shown: Django commits the INSERT by itself, before the
    entry is written (the insert hook kept, only its transaction taken away)."""
    def no_transaction(connection: Any, using: str, insert: Callable[..., Any],
                       args: tuple[Any, ...], kwargs: dict[str, Any], claim: Any = None) -> Any:
        return insert(*args, **kwargs)

    def no_unit(connection: Any, using: str, *args: Any) -> Any:
        return atomic._insert(*args)

    monkeypatch.setattr(atomic, "_atomic", no_transaction)
    monkeypatch.setattr(atomic, "_sqlite_unit", no_unit)
    with pytest.raises(DatabaseError, match=REFUSED):
        Tweet.objects.create(author="ann", text="orphan")
    assert Tweet.objects.count() == 1 and not OutboxEntry.objects.exists()


def test_inside_the_callers_atomic_no_extra_savepoint(outbox_django: Settings) -> None:
    with CaptureQueriesContext(connection) as queries, transaction.atomic():
        Tweet.objects.create(author="ann", text="one")
        Tweet(author="bob", text="two").save()
    sql = [q["sql"] for q in queries.captured_queries]
    assert not [s for s in sql if "SAVEPOINT" in s.upper()], sql
    assert sum("scalepub_outbox" in s for s in sql) == 2, sql
    assert OutboxEntry.objects.count() == 2 or Tweet.objects.count() == 2  # relay may be quick


def test_updates_publish_nothing(outbox_django: Settings) -> None:
    tweet = Tweet.objects.create(author="ann", text="first")
    tweet.text = "edited"
    with CaptureQueriesContext(connection) as queries:
        tweet.save()
    assert [q["sql"] for q in queries.captured_queries if "scalepub_outbox" in q["sql"]] == []
    assert Tweet.objects.get(pk=tweet.pk).text == "edited"
