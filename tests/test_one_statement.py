"""A registered create under autocommit is ONE statement, row and entry (issue 17,
scalepub/django/onestatement.py): a data-modifying CTE on PostgreSQL, a TEMP trigger on SQLite.

Counted where the database sees it: SQLite's trace callback (every statement the library
runs, BEGIN and COMMIT included), on PostgreSQL libpq's trace of what psycopg sends (each
simple Query and each Sync of the extended protocol is one round trip). Run in both passes
of make test (SQLite, then PostgreSQL). Checked here: one statement; the entry byte for byte
what the transaction path writes (serialize() of the saved instance, Tweet and fieldzoo.Wide
under hypothesis, XML and JSON); a failing outbox insert or a failing row INSERT leaves
neither; the fallbacks (explicit pk, inside atomic(), a pk-based node rule, many-to-many,
multi-table inheritance, a db_default column) take the transaction path and stay correct; the
save's receivers, outside the create's unit on every path, change nothing.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db import DatabaseError, IntegrityError, connection, models, transaction
from django.db.models.signals import post_save, pre_save
from django.test.utils import isolate_apps
from fieldzoo.models import Point, Tag, Tagged, Wide
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twitter.models import Tweet

import scalepub
from scalepub.django import onestatement
from scalepub.django.models import OutboxEntry
from scalepub.django.registry import registry
from scalepub.django.serialize import NOT_XML_CHARS, serialize
from scalepub.settings import Settings
from tests.conftest import django_side
from tests.test_atomic import REFUSED, refusing_outbox  # noqa: F401 (fixture)

pytestmark = [pytest.mark.stack, pytest.mark.django_db(transaction=True)]
# SQLite's path is built and checked here but not used by default: onestatement.VENDORS.


@pytest.fixture(autouse=True)
def on_sqlite_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite's trigger path is off by default (measured slower than its transaction), on
    here: both passes check both paths of their database."""
    monkeypatch.setattr(onestatement, "VENDORS", frozenset({"sqlite", "postgresql"}))


@pytest.fixture(params=["xml", "json"])
def kept(settings_for: Settings, request: pytest.FixtureRequest) -> Iterator[Settings]:
    """``outbox`` delivery, no relay thread (rows stay for the checks), XML or JSON."""
    yield from django_side(settings_for.replace(delivery="outbox", outbox_relay="external",
                                                payload_format=request.param))


class Trips:
    """What reaches the database while the block runs: statements (SQLite; two identical
    statements in a row would count once, none of the saves here repeats one) or round trips
    (PostgreSQL: simple Query and Sync messages in libpq's trace)."""

    def __enter__(self) -> Trips:
        connection.ensure_connection()
        self.raw = connection.connection
        self.seen: list[str] = []
        if connection.vendor == "sqlite":
            self.raw.set_trace_callback(self._statement)
        else:
            self.file = tempfile.TemporaryFile()
            self.raw.pgconn.trace(self.file.fileno())
        return self

    def _statement(self, sql: str) -> None:
        # The callback runs again for a trigger's program and for RETURNING's, with the
        # text of the statement that runs them: the same statement, counted once.
        if not sql.startswith("--") and (not self.seen or self.seen[-1] != sql):
            self.seen.append(sql)

    def __exit__(self, *exc: object) -> None:
        if connection.vendor == "sqlite":
            self.raw.set_trace_callback(None)
            return
        self.raw.pgconn.untrace()
        self.file.seek(0)
        lines = self.file.read().decode(errors="replace").splitlines()
        self.file.close()
        self.lines = lines
        self.seen = [line for line in lines if _sent(line, ("Query", "Sync"))]

    @property
    def count(self) -> int:
        return len(self.seen)

    @property
    def prepares(self) -> int:
        """Statements prepared on the way (PostgreSQL: scalepub.django.prepared parses the
        create's statement once per connection and set of parameter types, a round trip
        before its first execution)."""
        return sum(1 for line in getattr(self, "lines", ())
                   if _sent(line, ("Parse",)) and '"scalepub_' in line)

    @property
    def began(self) -> bool:
        """Whether a transaction was begun: the transaction path (SQLite: BEGIN's own
        statement; PostgreSQL: BEGIN in the trace, pipelined with the first statement)."""
        return any("BEGIN" in line for line in (self.seen if connection.vendor == "sqlite"
                                                 else self.lines))


def _sent(line: str, kinds: tuple[str, ...]) -> bool:
    fields = line.split("\t")
    return "F" in fields[:2] and any(kind in fields for kind in kinds)


@pytest.fixture
def disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onestatement, "ENABLED", False)


def warm(obj: models.Model) -> None:
    """A first create: the process checks once for the outbox table, and on SQLite each
    connection makes its functions and the table's trigger at its first create."""
    obj.save()


def entry_of(obj: models.Model) -> OutboxEntry:
    row: OutboxEntry = OutboxEntry.objects.get(model=obj._meta.label_lower,
                                               object_pk=str(obj.pk))
    return row


def check_entry(obj: models.Model, fmt: str, node: str) -> None:
    """The outbox row is what the transaction path writes for ``obj``."""
    row = entry_of(obj)
    assert (row.node, row.fmt, row.object_pk) == (node, fmt, str(obj.pk))
    assert bytes(row.payload) == serialize(obj, fmt)


def test_a_registered_create_is_one_statement(kept: Settings) -> None:
    warm(Tweet(author="bob", text="first"))
    with Trips() as trips:
        tweet = Tweet.objects.create(author="ann", text="one <statement> & é")
    assert trips.count == 1, trips.seen
    check_entry(tweet, kept.payload_format, "/twitter/Tweet/ann")
    assert Tweet.objects.filter(pk=tweet.pk).exists()


@pytest.mark.usefixtures("disabled")
def test_without_it_the_transaction_path_takes_more(kept: Settings) -> None:
    """The control: the same create on the transaction path (SQLite: BEGIN, INSERT, INSERT,
    COMMIT; PostgreSQL: two round trips)."""
    warm(Tweet(author="bob", text="first"))
    with Trips() as trips:
        tweet = Tweet.objects.create(author="ann", text="old path")
    assert trips.count == (4 if connection.vendor == "sqlite" else 2), [s[:50] for s in trips.seen]
    check_entry(tweet, kept.payload_format, "/twitter/Tweet/ann")


SAFE_TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
                    max_size=30)
WIDE = st.fixed_dictionaries({
    "title": SAFE_TEXT, "body": SAFE_TEXT,
    "count": st.integers(-2**31, 2**31 - 1),
    "big": st.none() | st.integers(-2**63, 2**63 - 1),
    "ratio": st.none() | st.floats(allow_nan=False, allow_infinity=False),
    "amount": st.none() | st.decimals(min_value=-10**13, max_value=10**13, places=6),
    "flag": st.booleans(), "maybe": st.none() | st.booleans(),
    "day": st.none() | st.dates(),
    "at": st.none() | st.datetimes(timezones=st.just(dt.UTC)),
    "clock": st.none() | st.times(),
    "token": st.uuids(),
    "blob": st.none() | st.binary(max_size=20),
    "data": st.none() | st.dictionaries(SAFE_TEXT, st.integers() | SAFE_TEXT, max_size=3),
    "where": st.none() | st.builds(Point, st.integers(-99, 99), st.integers(-99, 99)),
})


@settings(max_examples=15, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(values=WIDE, tagged=st.booleans())
def test_the_entry_is_byte_identical_for_every_field_kind(
    kept: Settings, values: dict[str, Any], tagged: bool
) -> None:
    warm(Wide(title="first"))
    if tagged:
        values = {**values, "tag": Tag.objects.create(name="t")}
    with Trips() as trips:
        wide = Wide.objects.create(**values)
    # XML replaces characters it cannot carry (logged and counted): such rows take the
    # transaction path, which logs them with the real pk.
    altered = kept.payload_format == "xml" and any(
        NOT_XML_CHARS.search(values[name]) for name in ("title", "body"))
    # A new combination of parameter types (a None, an int's size) is prepared first.
    assert trips.began if altered else trips.count == 1 + trips.prepares, trips.seen
    check_entry(wide, kept.payload_format, "/fieldzoo/Wide")


@pytest.mark.usefixtures("refusing_outbox")
def test_a_failed_outbox_insert_fails_the_one_statement() -> None:
    tweet = Tweet(author="ann", text="refused")
    with pytest.raises(DatabaseError, match=REFUSED):
        warm(Tweet(author="bob", text="first"))  # makes the trigger, refused too
    with Trips() as trips, pytest.raises(DatabaseError, match=REFUSED):
        tweet.save()
    assert trips.count == 1, trips.seen  # it was the one statement that failed, whole
    assert not Tweet.objects.exists() and not OutboxEntry.objects.exists()
    assert tweet.pk is None and tweet._state.adding


def test_a_failed_row_insert_leaves_no_entry(kept: Settings) -> None:
    warm(Tweet(author="bob", text="first"))
    Tweet.objects.all().delete()
    OutboxEntry.objects.all().delete()
    with Trips() as trips, pytest.raises(IntegrityError):
        Tweet.objects.create(author=None, text="author is NOT NULL")
    assert trips.count == 1, trips.seen
    assert not Tweet.objects.exists() and not OutboxEntry.objects.exists()
    tweet = Tweet.objects.create(author="ann", text="the next one works")
    check_entry(tweet, kept.payload_format, "/twitter/Tweet/ann")
    assert OutboxEntry.objects.count() == 1


@pytest.fixture
def node_rule() -> Iterator[Callable[[Any], None]]:
    """Register Tweet with another node rule for one test."""
    original = registry.get(Tweet)
    assert original is not None
    yield lambda rule: scalepub.register(Tweet, node=rule)
    scalepub.register(Tweet, node=original.node)


def _transaction_path(make: Callable[[], models.Model], fmt: str, node: str) -> None:
    warm(Tweet(author="bob", text="first"))
    with Trips() as trips:
        obj = make()
    assert trips.began, trips.seen
    check_entry(obj, fmt, node)


def test_an_explicit_pk_takes_the_transaction_path(kept: Settings) -> None:
    _transaction_path(lambda: Tweet.objects.create(pk=4242, author="ann", text="pk"),
                      kept.payload_format, "/twitter/Tweet/ann")


def test_inside_atomic_it_joins_the_callers_transaction(kept: Settings) -> None:
    warm(Tweet(author="bob", text="first"))
    with Trips() as trips, transaction.atomic():
        tweet = Tweet.objects.create(author="ann", text="joined")
    assert trips.began, trips.seen
    check_entry(tweet, kept.payload_format, "/twitter/Tweet/ann")


@contextlib.contextmanager
def connected(signal: Any, receiver: Callable[..., None]) -> Iterator[None]:
    """``receiver`` connected to Tweet's ``signal`` while the block runs."""
    signal.connect(receiver, sender=Tweet, weak=False, dispatch_uid="test-one-receiver")
    try:
        yield
    finally:
        signal.disconnect(sender=Tweet, dispatch_uid="test-one-receiver")


def test_a_post_save_receiver_runs_after_the_one_statement(kept: Settings) -> None:
    """post_save runs after the create's unit committed, on every path: a receiver of the
    model does not keep the create from being one statement."""
    seen: list[tuple[bool, bool]] = []

    def after(sender: Any, instance: Tweet, **kwargs: Any) -> None:
        seen.append((connection.in_atomic_block, OutboxEntry.objects.filter(
            object_pk=str(instance.pk)).exists()))

    warm(Tweet(author="bob", text="first"))
    with connected(post_save, after), Trips() as trips:
        tweet = Tweet.objects.create(author="ann", text="receiver")
    assert not trips.began and seen == [(False, True)], trips.seen
    check_entry(tweet, kept.payload_format, "/twitter/Tweet/ann")


@pytest.mark.parametrize("rule", [lambda t: f"/by-pk/{t.pk}", lambda t: f"/parity/{t.pk % 2}"])
def test_a_node_rule_that_reads_the_pk_keeps_the_transaction(
    kept: Settings, node_rule: Callable[[Any], None], rule: Callable[[Any], str]
) -> None:
    node_rule(rule)
    warm(Tweet(author="bob", text="first"))
    with Trips() as trips:
        tweet = Tweet.objects.create(author="ann", text="pk node")
    assert trips.began, trips.seen
    check_entry(tweet, kept.payload_format, rule(tweet))


def test_a_create_in_a_pre_save_receiver_is_a_unit_of_its_own(kept: Settings) -> None:
    """A pre_save receiver that creates another row of the same table first: pre_save runs
    before the create's unit, so that row is a create of its own, one statement each, each
    with its own entry."""
    side: list[Tweet] = []

    def first(sender: Any, instance: Tweet, **kwargs: Any) -> None:
        if instance.text == "outer":
            side.append(Tweet.objects.create(author="side", text="made in pre_save"))

    warm(Tweet(author="bob", text="first"))
    with connected(pre_save, first), Trips() as trips:
        outer = Tweet.objects.create(author="ann", text="outer")
    assert not trips.began and trips.count == 2, trips.seen
    check_entry(side[0], kept.payload_format, "/twitter/Tweet/side")
    check_entry(outer, kept.payload_format, "/twitter/Tweet/ann")


def test_many_to_many_keeps_the_transaction(kept: Settings) -> None:
    _transaction_path(lambda: Tagged.objects.create(title="m2m"), kept.payload_format,
                      "/fieldzoo/Tagged")


@pytest.fixture
def isolated_models() -> Iterator[dict[str, type[models.Model]]]:
    """A multi-table inheritance child and a model with a db_default column, registered,
    with their tables (models of an isolated app registry: the project's stays as it is)."""
    with isolate_apps("twitter"):
        class Base(models.Model):
            name = models.CharField(max_length=20)

            class Meta:
                app_label = "twitter"

        class Child(Base):
            extra = models.CharField(max_length=20)

            class Meta:
                app_label = "twitter"

        class Stamped(models.Model):
            name = models.CharField(max_length=20)
            label = models.CharField(max_length=20, db_default="from the database")

            class Meta:
                app_label = "twitter"

        made = [Base, Child, Stamped]
        with connection.schema_editor() as editor:
            for model in made:
                editor.create_model(model)
        scalepub.register([Child, Stamped])
        try:
            yield {"Child": Child, "Stamped": Stamped}
        finally:
            for model in (Child, Stamped):
                scalepub.unregister(model)
            with connection.schema_editor() as editor:
                for model in reversed(made):
                    editor.delete_model(model)


def test_inheritance_and_db_default_keep_the_transaction(
    kept: Settings, isolated_models: dict[str, type[models.Model]]
) -> None:
    child, stamped = isolated_models["Child"], isolated_models["Stamped"]
    _transaction_path(lambda: child.objects.create(name="c", extra="x"), kept.payload_format,
                      "/twitter/Child")
    with Trips() as trips:
        row = stamped.objects.create(name="s")
    assert trips.began, trips.seen
    assert row.label == "from the database"  # Django read it back: the entry has it
    check_entry(row, kept.payload_format, "/twitter/Stamped")


def test_many_creates_keep_their_order(kept: Settings) -> None:
    made = [Tweet.objects.create(author=f"a{i % 3}", text=f"n{i}") for i in range(30)]
    entries = list(OutboxEntry.objects.order_by("id").values_list("object_pk", flat=True))
    assert entries == [str(t.pk) for t in made]


def test_no_state_is_left_behind(kept: Settings) -> None:
    Tweet.objects.create(author="ann", text="a")
    assert connection.get_autocommit() and not connection.in_atomic_block
    assert connection.execute_wrappers == [] and connection.run_on_commit == []
    assert onestatement._state.claim is None and onestatement._state.written is None
    assert onestatement._state.pending is None


