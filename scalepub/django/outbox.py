"""The outbox table: entries written in the save's transaction, read and deleted by the relay.

This module only moves rows in and out of ``scalepub_outbox``; who wakes the relay after a
commit is the caller's business (``announce``), so the relay can import this module freely.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
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


class OutboxTableMissing(ImproperlyConfigured):
    """The ``scalepub_outbox`` table does not exist: the scalepub migration was not applied."""


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One waiting entry, as the relay reads it."""

    id: int
    node: str
    ts_ns: int
    model: str
    pk: str
    fmt: str
    payload: bytes

    def entry(self) -> PendingEntry:
        """The entry to append, carrying this row's id (the append script's retry record)."""
        return PendingEntry(self.node, self.ts_ns, self.model, self.pk, self.fmt, self.payload,
                            oid=self.id)


def write(entries: Sequence[PendingEntry], using: str, path: str = "transaction") -> None:
    """Insert ``entries`` in the caller's transaction (if any), in one statement per
    ``bulk_batch_size`` rows (the database's limit of query parameters).

    A database error propagates: in ``outbox`` delivery the entry is part of the save, and a
    save whose announcement cannot be recorded must fail loudly rather than lose it.
    """
    _require_table(using)
    connection = connections[using]
    rows = [(e.node, e.ts_ns, e.model, e.pk, e.fmt, e.payload) for e in entries]
    if len(rows) == 1 and _direct(connection):
        # SQLite's module keeps the statement prepared (keyed by its text): one row costs a
        # bind and a step, not Django's cursor, query rewriting and wrappers (~40% of it).
        connection.validate_no_broken_transaction()
        with connection.wrap_database_errors:
            connection.connection.execute(_insert_sql(using, 1, qmark=True), rows[0])
    else:
        size = min(max(connection.ops.bulk_batch_size(_FIELDS, rows), 1), _MAX_ROWS)
        with connection.cursor() as cursor:
            for start in range(0, len(rows), size):
                chunk = rows[start:start + size]
                cursor.execute(_insert_sql(using, len(chunk)), [v for r in chunk for v in r])
    _written(path).inc(len(rows))


def _direct(connection: Any) -> bool:
    """Whether one row may skip Django's cursor: SQLite, connected, nothing that wants to see
    the query (query logging under DEBUG, ``execute_wrapper`` instrumentation)."""
    return (connection.vendor == "sqlite" and connection.connection is not None
            and not connection.execute_wrappers and not connection.queries_logged)


@functools.cache
def _written(path: str) -> Any:
    return metrics.OUTBOX_WRITTEN.labels(path=path)


def oldest(using: str, limit: int) -> list[OutboxRow]:
    """Up to ``limit`` rows, oldest (lowest id) first."""
    table, columns = _table(using, ("id", *_FIELDS))
    with connections[using].cursor() as cursor:
        cursor.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {columns[0]} "
                       "LIMIT %s", [limit])
        return [_row(values) for values in cursor.fetchall()]


def count(using: str) -> int:
    """Rows waiting in the outbox."""
    table, _ = _table(using, ())
    with connections[using].cursor() as cursor:
        cursor.execute(f"SELECT COUNT(*) FROM {table}")
        return int(cursor.fetchone()[0])


def delete(using: str, ids: Sequence[int]) -> None:
    """Delete the rows ``ids`` (the relay's part once Redis holds them)."""
    table, [id_column] = _table(using, ("id",))
    with connections[using].cursor() as cursor:
        for start in range(0, len(ids), _DELETE_CHUNK):
            chunk = ids[start:start + _DELETE_CHUNK]
            cursor.execute(f"DELETE FROM {table} WHERE {id_column} IN "
                           f"({', '.join(['%s'] * len(chunk))})", chunk)


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


def _require_table(using: str) -> None:
    if using in _checked:
        return
    if not table_exists(using):
        raise OutboxTableMissing(
            f"scalepub: the outbox table does not exist in database {using!r}: run "
            f"`manage.py migrate` (or `manage.py migrate scalepub --database {using}`); "
            "the save was not committed")
    _checked.add(using)


def _row(values: Sequence[Any]) -> OutboxRow:
    oid, node, ts_ns, model, pk, fmt, payload = values
    return OutboxRow(int(oid), node, int(ts_ns), model, pk, fmt, bytes(payload))


@functools.lru_cache(maxsize=256)
def _insert_sql(using: str, rows: int, qmark: bool = False) -> str:
    """INSERT of ``rows`` rows in one statement (``qmark``: the DB-API's ``?`` placeholders)."""
    table, columns = _table(using, _FIELDS)
    one = f"({', '.join(['?' if qmark else '%s'] * len(columns))})"
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES {', '.join([one] * rows)}"


def _table(using: str, fields: Sequence[str]) -> tuple[str, list[str]]:
    """The quoted table name and the quoted columns of ``fields``."""
    from scalepub.django.models import OutboxEntry

    meta, quote = OutboxEntry._meta, connections[using].ops.quote_name
    return quote(meta.db_table), [quote(meta.get_field(name).column) for name in fields]
