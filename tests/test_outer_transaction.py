"""The registered save's own transaction (``atomic._Outer``) behaves as ``transaction.atomic()``
does at the outermost level: nested blocks, ``on_commit``, durable checks and the connection's
state after a commit or a rollback (issue 17: the lean wrapper must not change semantics)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db import DatabaseError, IntegrityError, connection, connections, transaction
from django.db.models.signals import post_save, pre_save
from twitter.models import Tweet

from scalepub.django import atomic, atomic_state
from scalepub.django.models import OutboxEntry
from scalepub.settings import Settings
from tests.test_atomic import REFUSED, refusing_outbox  # noqa: F401 (fixture)

pytestmark = [pytest.mark.stack, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def receiver() -> Iterator[Callable[..., None]]:
    """Connect a receiver for Tweet's post_save (after scalepub's) or ``signal`` for one test."""
    connected: list[tuple[Any, str]] = []

    def connect(fn: Callable[..., None], signal: Any = post_save) -> None:
        uid = f"test-outer-{id(fn)}"
        signal.connect(fn, sender=Tweet, weak=False, dispatch_uid=uid)
        connected.append((signal, uid))

    yield connect
    for signal, uid in connected:
        signal.disconnect(sender=Tweet, dispatch_uid=uid)


def _idle() -> None:
    """The connection is back in autocommit with no transaction state left."""
    assert connection.get_autocommit()
    assert not connection.in_atomic_block
    assert connection.atomic_blocks == [] and connection.savepoint_ids == []
    assert not connection.needs_rollback and connection.run_on_commit == []


def test_the_lean_block_is_the_one_used(outbox_django: Settings) -> None:
    """Outside DEBUG query logging a save runs in _Outer, not Django's Atomic."""
    seen: list[type] = []
    original = atomic._Outer.__enter__

    def enter(self: Any) -> None:
        seen.append(type(self))
        original(self)

    atomic._Outer.__enter__ = enter  # type: ignore[method-assign]
    try:
        Tweet.objects.create(author="ann", text="lean")
    finally:
        atomic._Outer.__enter__ = original  # type: ignore[method-assign]
    assert seen == [atomic._Outer]
    _idle()


def test_a_rolled_back_savepoint_inside_keeps_the_save(
    outbox_django: Settings, receiver: Callable[..., None]
) -> None:
    def nested(sender: Any, instance: Tweet, created: bool, **kwargs: Any) -> None:
        if instance.author != "ann":
            return
        assert connection.in_atomic_block and not connection.get_autocommit()
        with pytest.raises(ValueError), transaction.atomic():
            Tweet.objects.create(author="inner", text="rolled back")
            raise ValueError("inner")

    receiver(nested)
    Tweet.objects.create(author="ann", text="kept")
    _idle()
    assert list(Tweet.objects.values_list("author", flat=True)) == ["ann"]
    # the inner create's entry went with its savepoint; the relay may have moved ann's
    assert OutboxEntry.objects.filter(model="twitter.tweet").count() <= 1


def test_on_commit_inside_runs_after_the_commit(
    outbox_django: Settings, receiver: Callable[..., None]
) -> None:
    ran: list[tuple[bool, int]] = []

    def hook(sender: Any, instance: Tweet, created: bool, **kwargs: Any) -> None:
        transaction.on_commit(lambda: ran.append(
            (connection.in_atomic_block, Tweet.objects.filter(pk=instance.pk).count())))
        assert ran == []  # not yet

    receiver(hook)
    Tweet.objects.create(author="ann", text="hooked")
    assert ran == [(False, 1)]
    _idle()


def test_a_durable_block_inside_is_refused_as_under_atomic(
    outbox_django: Settings, receiver: Callable[..., None]
) -> None:
    def durable(sender: Any, instance: Tweet, created: bool, **kwargs: Any) -> None:
        with transaction.atomic(durable=True):
            pass

    receiver(durable)
    with pytest.raises(RuntimeError, match="durable"):
        Tweet.objects.create(author="ann", text="durable")
    _idle()
    assert not Tweet.objects.exists() and not OutboxEntry.objects.exists()


@pytest.mark.usefixtures("refusing_outbox")
def test_a_failed_save_leaves_the_connection_usable() -> None:
    for text in ("one", "two"):
        with pytest.raises(DatabaseError, match=REFUSED):
            Tweet.objects.create(author="ann", text=text)
        _idle()
    assert not Tweet.objects.exists()


@pytest.mark.usefixtures("refusing_outbox")
def test_on_commit_hooks_of_a_failed_save_are_dropped(receiver: Callable[..., None]) -> None:
    ran: list[int] = []

    def hook(sender: Any, instance: Tweet, **kwargs: Any) -> None:
        transaction.on_commit(lambda: ran.append(1))
        registered.append(1)

    registered: list[int] = []
    receiver(hook, pre_save)  # in the save's transaction, before the failing outbox write
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
        outbox_django: Settings, receiver: Callable[..., None]) -> None:
    """announce takes the block's connection from atomic_state (no lookup of its own): set
    while the save runs, for its database only, and cleared after a commit or a failure."""
    seen: list[Any] = []

    def during(sender: Any, instance: Tweet, **kwargs: Any) -> None:
        seen.append(atomic_state._current.connection)
        if instance.text == "fails":
            raise ValueError("a receiver that fails the save")

    receiver(during)
    Tweet.objects.create(author="ann", text="kept")
    with pytest.raises(ValueError):
        Tweet.objects.create(author="ann", text="fails")
    assert seen == [connection, connection]
    assert atomic_state._current.using is None and atomic_state._current.connection is None
    assert atomic_state.connection("default") is connections["default"]
