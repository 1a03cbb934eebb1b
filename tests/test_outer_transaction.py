"""The registered create's own transaction (``atomic._Outer``) behaves as ``transaction.atomic()``
does at the outermost level for the code that runs inside it (the INSERT, the node rule, the
entry): nested blocks, ``on_commit``, durable checks and the connection's state after a
commit or a rollback (issue 17: the lean wrapper must not change semantics). The save's
receivers run outside it, as for any model under autocommit."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db import DatabaseError, IntegrityError, connection, connections, transaction
from django.db.models.signals import post_save, pre_save
from twitter.models import Tweet

import scalepub
from scalepub.django import atomic, atomic_state, onestatement
from scalepub.django.announce import NodeError
from scalepub.django.models import OutboxEntry
from scalepub.django.registry import registry
from scalepub.settings import Settings
from tests.conftest import django_side
from tests.test_atomic import REFUSED, refusing_outbox  # noqa: F401 (fixture)

pytestmark = [pytest.mark.stack, pytest.mark.django_db(transaction=True)]

Rule = Callable[[Tweet], None]


@pytest.fixture
def node_rule(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Rule], None]]:
    """Run ``side(tweet)`` inside Tweet's node rule (the create's block) for one test. The
    transaction path on every database: a claimed create (onestatement) also calls the rule
    before its statement, with a sentinel pk and no transaction begun yet."""
    original = registry.get(Tweet)
    assert original is not None
    monkeypatch.setattr(onestatement, "ENABLED", False)

    def install(side: Rule) -> None:
        def rule(tweet: Tweet) -> str:
            side(tweet)
            return original.node_for(tweet)
        scalepub.register(Tweet, node=rule)

    yield install
    scalepub.register(Tweet, node=original.node)


@pytest.fixture
def receiver() -> Iterator[Callable[..., None]]:
    """Connect a receiver for Tweet's post_save or ``signal`` for one test."""
    connected: list[tuple[Any, str]] = []

    def connect(fn: Callable[..., None], signal: Any = post_save) -> None:
        uid = f"test-outer-{id(fn)}"
        signal.connect(fn, sender=Tweet, weak=False, dispatch_uid=uid)
        connected.append((signal, uid))

    yield connect
    for signal, uid in connected:
        signal.disconnect(sender=Tweet, dispatch_uid=uid)


@pytest.fixture
def kept(settings_for: Settings) -> Iterator[Settings]:
    """``outbox`` delivery with no relay thread: entries stay in the outbox for the checks."""
    yield from django_side(settings_for.replace(delivery="outbox", outbox_relay="external"))


def _idle() -> None:
    """The connection is back in autocommit with no transaction state left."""
    assert connection.get_autocommit()
    assert not connection.in_atomic_block
    assert connection.atomic_blocks == [] and connection.savepoint_ids == []
    assert not connection.needs_rollback and connection.run_on_commit == []


def test_the_lean_block_is_the_one_used(outbox_django: Settings,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside DEBUG query logging a create runs in scalepub's lean block (SQLite: its
    _sqlite_unit; PostgreSQL: _Outer), never in Django's Atomic."""
    seen: list[str] = []
    outer_enter, unit, atomic_enter = (atomic._Outer.__enter__, atomic._sqlite_unit,
                                       transaction.Atomic.__enter__)

    def recording(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            seen.append(name)
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(atomic._Outer, "__enter__", recording("_Outer", outer_enter))
    monkeypatch.setattr(atomic, "_sqlite_unit", recording("_sqlite_unit", unit))
    monkeypatch.setattr(transaction.Atomic, "__enter__", recording("Atomic", atomic_enter))
    Tweet.objects.create(author="ann", text="lean")
    assert seen == ["_sqlite_unit" if connection.vendor == "sqlite" else "_Outer"]
    _idle()


def test_a_rolled_back_savepoint_inside_keeps_the_save(
    outbox_django: Settings, node_rule: Callable[[Rule], None]
) -> None:
    def nested(tweet: Tweet) -> None:
        if tweet.author != "ann":
            return
        assert connection.in_atomic_block and not connection.get_autocommit()
        with pytest.raises(ValueError), transaction.atomic():
            Tweet.objects.create(author="inner", text="rolled back")
            raise ValueError("inner")

    node_rule(nested)
    Tweet.objects.create(author="ann", text="kept")
    _idle()
    assert list(Tweet.objects.values_list("author", flat=True)) == ["ann"]
    # the inner create's entry went with its savepoint; the relay may have moved ann's
    assert OutboxEntry.objects.filter(model="twitter.tweet").count() <= 1


def test_on_commit_inside_runs_after_the_commit(
    outbox_django: Settings, node_rule: Callable[[Rule], None]
) -> None:
    ran: list[tuple[bool, int]] = []

    def hook(tweet: Tweet) -> None:
        transaction.on_commit(lambda: ran.append(
            (connection.in_atomic_block, Tweet.objects.filter(pk=tweet.pk).count())))
        assert ran == []  # not yet

    node_rule(hook)
    Tweet.objects.create(author="ann", text="hooked")
    assert ran == [(False, 1)]
    _idle()


def test_a_durable_block_inside_is_refused_as_under_atomic(
    outbox_django: Settings, node_rule: Callable[[Rule], None]
) -> None:
    def durable(tweet: Tweet) -> None:
        with transaction.atomic(durable=True):
            pass

    node_rule(durable)
    with pytest.raises(NodeError, match="durable"):
        Tweet.objects.create(author="ann", text="durable")
    _idle()
    assert not Tweet.objects.exists() and not OutboxEntry.objects.exists()


def test_receivers_run_outside_the_creates_unit(
    kept: Settings, receiver: Callable[..., None]
) -> None:
    """pre_save before the create's transaction, post_save after its commit, as for an
    unregistered model under autocommit: a post_save receiver that fails leaves the row and
    its entry committed (Django leaves the row)."""
    seen: list[tuple[str, bool, int, int]] = []

    def during(sender: Any, instance: Tweet, **kwargs: Any) -> None:
        seen.append(("post" if kwargs["signal"] is post_save else "pre",
                     connection.in_atomic_block, Tweet.objects.count(),
                     OutboxEntry.objects.count()))
        if kwargs["signal"] is post_save and instance.text == "fails":
            raise ValueError("a receiver that fails after the save")

    receiver(during, pre_save)
    receiver(during)
    with pytest.raises(ValueError, match="after the save"):
        Tweet.objects.create(author="ann", text="fails")
    _idle()
    assert seen == [("pre", False, 0, 0), ("post", False, 1, 1)]
    [entry] = OutboxEntry.objects.all()
    assert entry.object_pk == str(Tweet.objects.get().pk)


@pytest.mark.usefixtures("refusing_outbox")
def test_a_failed_save_leaves_the_connection_usable() -> None:
    for text in ("one", "two"):
        with pytest.raises(DatabaseError, match=REFUSED):
            Tweet.objects.create(author="ann", text=text)
        _idle()
    assert not Tweet.objects.exists()


@pytest.mark.usefixtures("refusing_outbox")
def test_on_commit_hooks_of_a_failed_save_are_dropped(
        node_rule: Callable[[Rule], None]) -> None:
    ran: list[int] = []
    registered: list[int] = []

    def hook(tweet: Tweet) -> None:  # in the create's transaction, before the failing write
        transaction.on_commit(lambda: ran.append(1))
        registered.append(1)

    node_rule(hook)
    with pytest.raises(DatabaseError, match=REFUSED):
        Tweet.objects.create(author="ann", text="dropped")
    assert registered == [1] and ran == []
    _idle()


def test_a_failing_first_statement_rolls_back_and_the_next_save_works(
        outbox_django: Settings) -> None:
    """On PostgreSQL the model's INSERT rides in one pipeline with BEGIN: its error must
    surface as Django's, and the transaction it aborted must end."""
    first = Tweet.objects.create(author="ann", text="first")
    with pytest.raises(IntegrityError):
        Tweet.objects.create(pk=first.pk, author="bob", text="same pk")
    _idle()
    Tweet.objects.create(author="cid", text="next")
    assert sorted(Tweet.objects.values_list("author", flat=True)) == ["ann", "cid"]


def test_a_failed_health_check_before_the_save_reconnects(outbox_django: Settings) -> None:
    """CONN_HEALTH_CHECKS: a connection found unusable as the save begins is closed and a new
    one opened, as Django's set_autocommit does, and the save and its entry go through."""
    Tweet.objects.create(author="ann", text="connected")
    wrapper = connections["default"]
    enabled = wrapper.health_check_enabled
    wrapper.health_check_enabled, wrapper.health_check_done = True, False
    wrapper.is_usable = lambda: False
    try:
        Tweet.objects.create(author="bob", text="after the check")
    finally:
        del wrapper.is_usable
        wrapper.health_check_enabled = enabled
    _idle()
    assert sorted(Tweet.objects.values_list("author", flat=True)) == ["ann", "bob"]


def test_the_save_s_connection_is_known_inside_its_block_only(
        outbox_django: Settings, node_rule: Callable[[Rule], None]) -> None:
    """announce takes the block's connection from atomic_state (no lookup of its own): set
    while the create runs, for its database only, and cleared after a commit or a failure."""
    seen: list[Any] = []

    def during(tweet: Tweet) -> None:
        seen.append(atomic_state._current.connection)
        if tweet.text == "fails":
            raise ValueError("a rule that fails the save")

    node_rule(during)
    Tweet.objects.create(author="ann", text="kept")
    with pytest.raises(NodeError):
        Tweet.objects.create(author="ann", text="fails")
    assert seen == [connection, connection]
    assert atomic_state._current.using is None and atomic_state._current.connection is None
    assert atomic_state.connection("default") is connections["default"]
    assert list(Tweet.objects.values_list("text", flat=True)) == ["kept"]
