"""The outbox table: entries written in the save's transaction, read and deleted by the relay.

This module only moves rows in and out of ``scalepub_outbox``; who wakes the relay after a
commit is the caller's business (``announce``), so the relay can import this module freely.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.db import connections

from scalepub import metrics
from scalepub.producer import PendingEntry

# Plain SQL rather than the ORM: at one relay round per commit, the ORM's query building and
# delete collector were most of the relay's CPU, and save() doubled the cost of a saved row.
_FIELDS = ("node", "ts_ns", "model", "object_pk", "fmt", "payload")
_DELETE_CHUNK = 500  # below every backend's limit of query parameters
# Rows per INSERT where the backend names no limit (PostgreSQL's protocol allows 65,535
# parameters per statement: 6 per row).
_MAX_ROWS = 1000
_HELD = "scalepub_held_outbox_rows"  # attribute of Django's connection while Held holds rows


class OutboxTableMissing(ImproperlyConfigured):
    """The ``scalepub_outbox`` table does not exist: the scalepub migration was not applied."""


# One outbox row in write order: node, ts_ns, model, object_pk, fmt, payload (_FIELDS).
Row = tuple[str, int, str, str, str, bytes]


def write(entries: Sequence[PendingEntry], using: str, path: str = "transaction") -> None:
    """Insert ``entries`` in the caller's transaction (if any), in one statement per
    ``bulk_batch_size`` rows (the database's limit of query parameters).

    A database error propagates: in ``outbox`` delivery the entry is part of the save, and a
    save whose announcement cannot be recorded must fail loudly rather than lose it.
    """
    rows = [(e.node, e.ts_ns, e.model, e.pk, e.fmt, e.payload) for e in entries]
    write_rows(connections[using], using, rows, path)


def write_rows(connection: Any, using: str, rows: list[Row],
               path: str = "transaction") -> None:
    """``write`` for rows already in column order, on Django's ``connection`` of ``using``."""
    if using not in _checked:
        require_table(using)
    held = connection.__dict__.get(_HELD)  # getattr's miss would raise and catch inside
    if held is not None:
        if not any(connection.savepoint_ids):  # no savepoint can roll them back alone
            held.extend(rows)
            _written(path).inc(len(rows))
            return
        _insert(connection, using, held)  # keep the id order: the held rows came first
        held.clear()
    _insert(connection, using, rows)
    _written(path).inc(len(rows))


def _insert(connection: Any, using: str, rows: list[Row]) -> None:
    if len(rows) == 1 and _direct(connection):
        # SQLite's module keeps the statement prepared (keyed by its text): one row costs a
        # bind and a step, not Django's cursor, query rewriting and wrappers (most of it).
        connection.validate_no_broken_transaction()
        try:  # the SQL looked up positionally: a keyword lengthens every lru_cache key
            connection.connection.execute(_insert_sql(using, 1, True), rows[0])
        except Exception:
            # Django's exception types, as its cursor raises them; the wrapper is built only
            # on failure (per row it was ~1 us of this path)
            with connection.wrap_database_errors:
                raise
    elif rows:
        size = min(max(connection.ops.bulk_batch_size(_FIELDS, rows), 1), _MAX_ROWS)
        with connection.cursor() as cursor:
            for start in range(0, len(rows), size):
                chunk = rows[start:start + size]
                cursor.execute(_insert_sql(using, len(chunk)), [v for r in chunk for v in r])


class Held:
    """Outbox rows of scalepub's own transaction around a save, held for ``commit``.

    On PostgreSQL with psycopg 3 the rows and the COMMIT go out in one pipeline: the outbox
    costs no round trip of its own. Only rows written outside any savepoint are held (a
    savepoint's rollback could not take them back); a later write inside one first writes
    the held rows, so ids keep the order of the writes. Elsewhere nothing is held.
    """

    def __init__(self, using: str) -> None:
        self.using = using
        self.connection = connections[using]
        self.active = pipelines(self.connection)

    def __enter__(self) -> Held:
        if self.active:
            setattr(self.connection, _HELD, [])
        return self

    def __exit__(self, *exc: object) -> None:
        if self.active:
            setattr(self.connection, _HELD, None)

    def commit(self) -> None:
        """Write the held rows and COMMIT in one round trip; Django's own commit then finds
        nothing left to do. Raises Django's DatabaseError (the caller's atomic rolls back)."""
        connection = self.connection
        rows = getattr(connection, _HELD, None)
        if not self.active or not rows or connection.needs_rollback:
            # Django's atomic commits (or rolls back) as usual; with nothing held (the entry
            # went with the INSERT, onestatement) there may be no transaction at all, and
            # psycopg's commit of an idle connection sends nothing.
            return
        setattr(connection, _HELD, None)
        raw = connection.connection
        with connection.wrap_database_errors, raw.pipeline():
            _insert(connection, self.using, rows)
            # A COMMIT statement, not raw.commit(): that syncs the pipeline at once, and the
            # pipeline's exit then syncs again, a second round trip. psycopg reads the
            # transaction status from the server, so Django's commit() finds it idle.
            raw.execute("COMMIT")


def pipelines(connection: Any) -> bool:
    """Whether Django's ``connection`` is psycopg 3 with pipeline mode (PostgreSQL)."""
    raw = connection.connection
    return (connection.vendor == "postgresql" and raw is not None
            and hasattr(raw, "pipeline") and _pipeline_supported(raw))


def _pipeline_supported(raw: Any) -> bool:
    """Whether psycopg's libpq can pipeline (libpq >= 14)."""
    pipeline = getattr(type(raw), "pipeline", None)
    support = getattr(sys.modules.get("psycopg"), "Pipeline", None)
    return pipeline is not None and support is not None and bool(support.is_supported())


def _direct(connection: Any) -> bool:
    """Whether one row may skip Django's cursor: SQLite, connected, nothing that wants to see
    the query (query logging under DEBUG, ``execute_wrapper`` instrumentation)."""
    return (connection.vendor == "sqlite" and connection.connection is not None
            and not connection.execute_wrappers and not connection.queries_logged)


def written_total() -> Any:
    """The counter of entries written in the save's transaction (or statement)."""
    return _written("transaction")


@functools.cache
def _written(path: str) -> Any:
    return metrics.OUTBOX_WRITTEN.labels(path=path)


def oldest_entries(using: str, limit: int) -> list[PendingEntry]:
    """Up to ``limit`` rows, oldest (lowest id) first, as the entries the relay appends (each
    carrying its row id as ``oid``)."""
    return [PendingEntry(node, int(ts_ns), model, pk, fmt, bytes(payload), int(oid))
            for oid, node, ts_ns, model, pk, fmt, payload
            in _query(using, _select_sql, [limit], fetch=True)]


def count(using: str) -> int:
    """Rows waiting in the outbox."""
    [(rows,)] = _query(using, _count_sql, [], fetch=True)
    return int(rows)


def delete(using: str, ids: Sequence[int]) -> None:
    """Delete the rows ``ids`` (the relay's part once Redis holds them)."""
    for start in range(0, len(ids), _DELETE_CHUNK):
        chunk = list(ids[start:start + _DELETE_CHUNK])
        _query(using, functools.partial(_delete_sql, rows=len(chunk)), chunk, fetch=False)


def _query(using: str, sql: Callable[..., str], params: list[Any],
           fetch: bool) -> list[tuple[Any, ...]]:
    """Run the relay's statement ``sql(using, qmark)`` in autocommit.

    A relay round is one SELECT and one DELETE per sparse commit: on the DB-API connection
    (the statement text cached, SQLite's module keeping it prepared) they skip Django's
    cursor, its query rewriting and wrappers, which were a third of the round's own CPU
    (loadtest/bench_paced_save.py). Django's cursor where something wants to see the query.
    """
    connection = connections[using]
    raw = connection.connection
    if raw is not None and _plain(connection):
        connection.validate_no_broken_transaction()
        with connection.wrap_database_errors:
            cursor = raw.execute(sql(using, connection.vendor == "sqlite"), params)
            try:
                return list(cursor.fetchall()) if fetch else []
            finally:
                cursor.close()
    with connection.cursor() as cursor:
        cursor.execute(sql(using, False), params)
        return list(cursor.fetchall()) if fetch else []


def _plain(connection: Any) -> bool:
    """Whether statements may go to the DB-API connection itself: SQLite or psycopg 3 (both
    have ``Connection.execute``), nothing that wants to see the query (query logging under
    DEBUG, ``execute_wrapper`` instrumentation)."""
    return (connection.vendor in ("sqlite", "postgresql")
            and hasattr(connection.connection, "execute")
            and not connection.execute_wrappers and not connection.queries_logged)


@functools.lru_cache(maxsize=64)
def _select_sql(using: str, qmark: bool) -> str:
    table, columns = _table(using, ("id", *_FIELDS))
    return (f"SELECT {', '.join(columns)} FROM {table} ORDER BY {columns[0]} "
            f"LIMIT {'?' if qmark else '%s'}")


@functools.lru_cache(maxsize=64)
def _count_sql(using: str, qmark: bool) -> str:
    table, _ = _table(using, ())
    return f"SELECT COUNT(*) FROM {table}"


@functools.lru_cache(maxsize=256)
def _delete_sql(using: str, qmark: bool, rows: int) -> str:
    table, [id_column] = _table(using, ("id",))
    return (f"DELETE FROM {table} WHERE {id_column} IN "
            f"({', '.join(['?' if qmark else '%s'] * rows)})")


def table_exists(using: str) -> bool:
    """Whether ``scalepub_outbox`` exists in database ``using`` (asks the database)."""
    from scalepub.django.models import OutboxEntry

    return OutboxEntry._meta.db_table in connections[using].introspection.table_names()


def forget_tables(**kwargs: Any) -> None:
    """``post_migrate`` receiver: look for the table again (a migration may have dropped it)."""
    _checked.clear()


# Databases whose outbox table this process has seen: one introspection query per database
# and process, so a missing migration is named at the first save instead of a bare "no such
# table" (which on PostgreSQL would also abort the transaction before we could ask).
_checked: set[str] = set()


def require_table(using: str) -> None:
    """Raise OutboxTableMissing (naming the fix) if the outbox table is missing (cached)."""
    if using in _checked:
        return
    if not table_exists(using):
        raise OutboxTableMissing(
            f"scalepub: the outbox table does not exist in database {using!r}: run "
            f"`manage.py migrate` (or `manage.py migrate scalepub --database {using}`); "
            "the save was not committed")
    _checked.add(using)


@functools.lru_cache(maxsize=256)
def _insert_sql(using: str, rows: int, qmark: bool = False) -> str:
    """INSERT of ``rows`` rows in one statement (``qmark``: the DB-API's ``?`` placeholders)."""
    table, columns = _table(using, _FIELDS)
    one = f"({', '.join(['?' if qmark else '%s'] * len(columns))})"
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES {', '.join([one] * rows)}"


@functools.lru_cache(maxsize=64)
def target(using: str) -> tuple[str, tuple[str, ...]]:
    """The quoted outbox table and its quoted columns in write order (node, ts_ns, model,
    object_pk, fmt, payload): for statements that insert rows of their own (cached: built
    per save it was ~10 % of onestatement's own time)."""
    table, columns = _table(using, _FIELDS)
    return table, tuple(columns)


def _table(using: str, fields: Sequence[str]) -> tuple[str, list[str]]:
    """The quoted table name and the quoted columns of ``fields``."""
    from scalepub.django.models import OutboxEntry

    meta, quote = OutboxEntry._meta, connections[using].ops.quote_name
    return quote(meta.db_table), [quote(meta.get_field(name).column) for name in fields]
