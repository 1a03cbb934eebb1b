"""A registered create and its entry are one unit, in every transaction mode.

A created row is announced right after its own INSERT (Django's ``_do_insert``, wrapped at
``register()``): serialized, and in outbox delivery an outbox row written. Under autocommit,
Django commits that INSERT by itself, so the outbox row would be a second transaction: a
failure, or a process killed in between, would leave a row without its entry. The wrapper
therefore runs the INSERT and the entry in one transaction of their own when none is open,
and only them: the save's ``pre_save`` and ``post_save`` receivers run outside it, before and
after, as for any model under autocommit (a ``post_save`` receiver that fails leaves the row,
and its entry, committed). Inside the caller's own ``atomic()`` (or with autocommit off) the
entry joins that transaction, no extra savepoint. ``bulk_create`` does the same for
``bulk_create`` plus ``publish_many``.

A create that ``onestatement`` claims needs no transaction at all: ``_Outer`` then begins
nothing until the first statement, and if that is the create's own INSERT it runs as one
statement that also writes the entry (its own transaction under autocommit).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import django
from django.db import DatabaseError, Error, connections, router, transaction
from django.db.models import Model

from scalepub.django import atomic_state, onestatement, outbox
from scalepub.django.announce import announce, announced, publish_many
from scalepub.django.registry import Registration, registry

M = TypeVar("M", bound=Model)
_MARK = "scalepub_atomic_create"


def wrap_save(model: type[Model]) -> None:
    """Announce ``model``'s created rows, each in one unit with its INSERT (once: a model
    wrapped already is left as it is)."""
    own = model.__dict__.get("_do_insert")
    if getattr(own, _MARK, False):
        return
    original: Callable[..., Any] = model._do_insert
    concrete = model._meta.concrete_model

    @functools.wraps(original)
    def _do_insert(self: Model, manager: Any, using: str, fields: Any, returning_fields: Any,
                   raw: bool, *args: Any, **kwargs: Any) -> Any:
        call = (manager, using, fields, returning_fields, raw, *args)
        # The row of this very class, not a parent's (multi-table inheritance): a subclass
        # inherits this wrapper (or calls it from its own), and post_save's sender, which
        # the receiver this replaced listened to, was the instance's own class. A raw save
        # (a fixture) is not announced.
        reg = None if raw or type(self) is not model or manager.model is not concrete \
            else registry.get(model)
        if reg is None:
            return original(self, *call, **kwargs)
        connection = connections[using]
        # get_autocommit() without its async-safety check (~2 us: it raises and catches
        # inside) when connected: Django's cursor for the INSERT checks that anyway.
        if not (connection.autocommit if connection.connection is not None
                else connection.get_autocommit()):  # inside a transaction: join it
            return _insert(self, reg, original, call, kwargs)
        vendor = connection.vendor
        claim = onestatement.claim(self, reg, using, vendor)
        if claim is None and vendor == "sqlite" and _LEAN_DJANGO \
                and not connection.queries_logged:
            return _sqlite_unit(connection, using, self, reg, original, call, kwargs)
        return _atomic(connection, using, _insert, (self, reg, original, call, kwargs), {},
                       claim)

    setattr(_do_insert, _MARK, True)
    _do_insert.scalepub_own = own  # type: ignore[attr-defined]
    model._do_insert = _do_insert


def _insert(instance: Model, reg: Registration, model_insert: Callable[..., Any],
            call: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Django's ``_do_insert`` of ``instance`` (``call``: its arguments from the manager on),
    then its announcement; for the create ``onestatement`` claimed, one statement does both.
    Here rather than in a ``post_save`` receiver: Django's dispatch to one receiver was ~20 us
    of a ~250 us SQLite save (loadtest/bench_ingest.py)."""
    if onestatement.claimed(instance):
        results = onestatement.insert(instance, model_insert, call, kwargs)
    else:
        results = model_insert(instance, *call, **kwargs)
    _created(instance, reg, call[1], results, call[3])
    return results


def _created(instance: Model, reg: Registration, using: str, results: Any,
             returning_fields: Any) -> None:
    """Announce ``instance``, inserted just now: the values the INSERT returned (its pk) set
    first, as ``_save_table`` does next."""
    if onestatement.take_written(instance):  # the entry went with the INSERT
        announced(using)
        return
    if results:
        for value, field in zip(results[0], returning_fields, strict=False):
            setattr(instance, field.attname, value)
    announce([(instance, reg)], using)


def _sqlite_unit(c: Any, using: str, instance: Model, reg: Registration,
                 model_insert: Callable[..., Any], call: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> Any:
    """The usual SQLite create: ``_atomic``'s ``_Outer`` and ``_insert`` in fewer steps.
    BEGIN and COMMIT go to the driver; Django's connection is in the states ``_Outer`` puts
    it in (code inside, a node rule or a serializer, may nest ``atomic()`` or call
    ``on_commit``). In-process, against ``_Outer`` around the same INSERT and entry: ~10-20
    us less per ``Tweet`` save (docs/benchmarks.md, ingest, seventh pass)."""
    c.close_if_health_check_failed()  # as set_autocommit does: never BEGIN on a dead one
    if c.connection is None:  # it was closed: reconnect, as set_autocommit would
        c.ensure_connection()
    _sqlite_begin(c)
    c.commit_on_exit, c.needs_rollback = True, False
    c.autocommit, c.in_atomic_block = False, True
    c.atomic_blocks.append(_SQLITE_BLOCK)
    before = atomic_state.enter(using, c)  # announce needs no lookup of its own
    try:
        results = model_insert(instance, *call, **kwargs)
        _created(instance, reg, using, results, call[3])
    except BaseException:
        atomic_state.leave(before)
        _end_block(c, False)
        raise
    atomic_state.leave(before)
    _end_block(c, True)
    return results


def _sqlite_begin(c: Any) -> None:
    """BEGIN (in the connection's ``transaction_mode``, Django >= 5.1) on the driver's
    connection of Django's SQLite ``c``, which stays in autocommit; its errors as Django's
    (the wrapper entered only on failure: per statement it was ~1 us)."""
    mode = getattr(c, "transaction_mode", None)
    try:
        c.connection.execute(f"BEGIN {mode}" if mode else "BEGIN")
    except Exception:
        with c.wrap_database_errors:
            raise


class _Block:
    """What ``_sqlite_unit`` puts in ``atomic_blocks`` (a nested durable ``atomic()`` reads
    ``_from_testcase`` of the last one, as it does of _Outer)."""

    _from_testcase = False


_SQLITE_BLOCK = _Block()


def _atomic(connection: Any, using: str, save: Callable[..., Any], args: tuple[Any, ...],
            kwargs: dict[str, Any], claim: onestatement.Claim | None = None) -> Any:
    """``save(*args, **kwargs)`` in a new transaction on Django's ``connection`` of ``using``,
    or (a ``claim``ed create) as one statement that is its own transaction; on PostgreSQL
    outbox rows held by the transaction ride with its COMMIT."""
    vendor = connection.vendor
    lean = _LEAN_DJANGO and vendor in _LEAN_VENDORS and not connection.queries_logged
    if lean and vendor != "postgresql":  # nothing to hold elsewhere: no outbox.Held
        with _Outer(connection, claim, using):
            return save(*args, **kwargs)
    block = _Outer(connection, claim) if lean else transaction.atomic(using=using)
    before = atomic_state.enter(using, connection)  # announce needs no lookup of its own
    try:
        if vendor != "postgresql":
            with block:
                return save(*args, **kwargs)
        with block, outbox.Held(using) as held:
            result = save(*args, **kwargs)
            held.commit()  # outbox rows and COMMIT in one round trip
        return result
    finally:
        atomic_state.leave(before)


# Backends whose way into a transaction _Outer knows (SQLite: an explicit BEGIN; PostgreSQL:
# BEGIN pipelined with the first statement, or psycopg's own with autocommit off).
_LEAN_VENDORS = ("sqlite", "postgresql")
# _Outer mirrors private state of Django's Atomic and BaseDatabaseWrapper (atomic_blocks,
# closed_in_transaction, run_commit_hooks_on_set_autocommit_on...): used only on the Django
# series the test suite ran against; any other runs Django's own atomic(), correct and ~20 us
# slower per save.
_LEAN_DJANGO = django.VERSION[:2] == (5, 2)


class _Outer:
    """``transaction.atomic()`` for the one case ``wrap_save`` needs: the outermost block of
    a connection in autocommit (the caller checked). Django's Atomic serves every nesting
    level and re-validates the connection at each step (thread sharing, health check,
    autocommit, each twice, a cursor for SQLite's BEGIN): that was ~25 us of a ~100 us
    SQLite save, most of the registered save's overhead. This enters and leaves the same way
    with one BEGIN sent to the driver and Django's own commit/rollback, and leaves the
    connection in the states Atomic does (in_atomic_block, atomic_blocks, autocommit,
    needs_rollback, commit hooks), so atomic() blocks, ``on_commit`` and durable checks
    inside the save behave as under Atomic. Under DEBUG query logging, Atomic itself runs
    (it logs the BEGIN).
    """

    _from_testcase = False  # read by a durable atomic() nested inside (Django's check)

    def __init__(self, connection: Any, claim: onestatement.Claim | None = None,
                 using: str | None = None) -> None:
        self.connection = connection
        self.using = using  # this thread's save runs on it (atomic_state), if given
        self.before: tuple[str | None, Any] = (None, None)
        # A create that may run as one statement (onestatement): then nothing is begun
        # until the first statement shows whether it is that create's INSERT.
        self.claim = claim
        self.claimed = claim is not None  # onestatement's state to clear at the end

    def __enter__(self) -> None:
        c = self.connection
        c.close_if_health_check_failed()  # as set_autocommit does: never BEGIN on a dead one
        if c.connection is None:  # it was closed: reconnect, as set_autocommit would
            c.ensure_connection()
        c.commit_on_exit, c.needs_rollback = True, False
        # (SQLite without a claim never comes here: atomic._sqlite_unit runs it.)
        if self.claim is not None:
            onestatement.begin(self.claim)
            c.execute_wrappers.append(self._first)
        elif outbox.pipelines(c):
            c.execute_wrappers.append(self._first)
        else:
            c._set_autocommit(False)
        c.autocommit = False
        c.in_atomic_block = True
        c.atomic_blocks.append(self)
        if self.using is not None:  # announce needs no lookup of its own
            self.before = atomic_state.enter(self.using, c)

    def _first(self, execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        """The block's first statement: the claimed create's INSERT with its entry as one
        statement (the transaction then begins at the next statement, if any), or BEGIN
        and the statement."""
        self._unhook()
        claim, self.claim = self.claim, None
        if claim is not None:
            result = onestatement.run(claim, execute, sql, params, many, context)
            if result is not onestatement.DECLINED:
                self.connection.execute_wrappers.append(self._first)
                return result
        return self._begin(execute, sql, params, many, context)

    def _begin(self, execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        """BEGIN, then the statement. PostgreSQL: in one pipeline, one round trip instead of
        two. psycopg, left in autocommit, sends no BEGIN of its own (it would sync after it);
        its commit and rollback follow the server's transaction status. Only the first
        statement: in a pipeline ``rowcount`` is unknown until a sync and Django reads it
        after an UPDATE; this pipeline syncs before ``execute`` returns. (A statement sent on
        the driver's connection directly, bypassing Django's cursors, before any other would
        run outside the transaction.)"""
        c = self.connection
        if c.vendor == "sqlite":
            _sqlite_begin(c)
            return execute(sql, params, many, context)
        if not outbox.pipelines(c):
            c._set_autocommit(False)
            return execute(sql, params, many, context)
        raw = c.connection
        with c.wrap_database_errors, raw.pipeline():
            raw.execute("BEGIN")
            return execute(sql, params, many, context)

    def _unhook(self) -> None:
        wrappers = self.connection.execute_wrappers
        if self._first in wrappers:
            wrappers.remove(self._first)

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        c = self.connection
        self._unhook()
        if self.claimed:
            onestatement.end()
        if self.using is not None:
            atomic_state.leave(self.before)
        _end_block(c, exc_type is None)


def _end_block(c: Any, ok: bool) -> None:
    """Leave the outermost block of Django's connection ``c`` as Atomic does: commit if
    ``ok`` and nothing marked it for rollback, else roll back; then autocommit again."""
    c.atomic_blocks.pop()
    c.in_atomic_block = False
    try:
        if c.closed_in_transaction:
            pass
        elif ok and not c.needs_rollback:
            _commit(c)
        else:
            c.needs_rollback = False
            _rollback(c)
    finally:
        if c.closed_in_transaction:
            c.connection = None
        else:
            _autocommit_on(c)


def _commit(c: Any) -> None:
    """``c.commit()`` without its checks (this thread's save just used ``c``) and its query
    log (the lean block never runs while queries are logged)."""
    try:
        with c.wrap_database_errors:
            raw = c.connection
            if c.vendor != "sqlite":
                raw.commit()
            elif raw.in_transaction:  # not after a create that was one statement
                # The driver is in autocommit (_Outer sent BEGIN itself): a COMMIT statement,
                # which its statement cache keeps prepared, not commit(), which prepares
                # one each time (~3 us).
                raw.execute("COMMIT")
        c.errors_occurred = False
        c.run_commit_hooks_on_set_autocommit_on = True
    except DatabaseError:
        _rollback(c)
        raise


def _rollback(c: Any) -> None:
    try:
        c.rollback()
    except Error:
        c.close()


def _autocommit_on(c: Any) -> None:
    """What ``set_autocommit(True)`` does once the transaction has ended."""
    if c.connection is None:  # closed by a failed rollback: Django's path reconnects
        c.set_autocommit(True)
        return
    if c.vendor != "sqlite":  # SQLite's driver never left autocommit (_Outer sent BEGIN)
        c._set_autocommit(True)
    c.autocommit = True
    if c.run_commit_hooks_on_set_autocommit_on:
        c.run_and_clear_commit_hooks()
        c.run_commit_hooks_on_set_autocommit_on = False


def unwrap_save(model: type[Model]) -> None:
    """Undo ``wrap_save`` (after ``unregister``)."""
    own = model.__dict__.get("_do_insert")
    if not getattr(own, _MARK, False):
        return
    previous = getattr(own, "scalepub_own", None)
    if previous is None:
        delattr(model, "_do_insert")
    else:
        model._do_insert = previous


def bulk_create(objs: Iterable[M], *, using: str | None = None, node: str | None = None,
                **kwargs: Any) -> list[M]:
    """``bulk_create`` the rows and publish them in one transaction (a savepoint-free part
    of the caller's, if any): the rows commit with their entries or not at all.

    ``kwargs`` go to ``QuerySet.bulk_create`` (``batch_size``, ``ignore_conflicts``...); the
    model is that of the first row. Returns the created rows.
    """
    rows = list(objs)
    if not rows:
        return []
    model = type(rows[0])
    db = using or router.db_for_write(model)
    with transaction.atomic(using=db, savepoint=False):
        created: list[M] = model._default_manager.using(db).bulk_create(rows, **kwargs)
        publish_many(created, node=node, using=db)
    return created
