"""The outbox table: entries written in the save's transaction (or spilled after commit), read
and deleted by the relay."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from functools import partial
from typing import Any

from django.db import DatabaseError, connections, transaction

from scalepub import metrics
from scalepub.producer import LogSpill, PendingEntry

log = logging.getLogger(__name__)


def write(entries: Sequence[PendingEntry], using: str, path: str = "transaction") -> None:
    """Insert ``entries`` (in the caller's transaction, if any) and wake the relay on commit.

    A database error propagates: in ``outbox`` delivery the entry is part of the save, and a
    save whose announcement cannot be recorded must fail loudly rather than lose it.
    """
    from scalepub.django.relay import wake

    rows = [(e.node, e.ts_ns, e.model, e.pk, e.fmt, e.payload) for e in entries]
    with connections[using].cursor() as cursor:
        cursor.executemany(_insert_sql(using), rows)
    metrics.OUTBOX_WRITTEN.labels(path=path).inc(len(rows))
    transaction.on_commit(partial(wake, using), using=using)


def oldest(using: str, limit: int) -> list[tuple[Any, ...]]:
    """Up to ``limit`` rows, oldest first: (id, node, ts_ns, model, object_pk, fmt, payload)."""
    table, columns = _table(using, ("id", *_FIELDS))
    with connections[using].cursor() as cursor:
        cursor.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {columns[0]} "
                       "LIMIT %s", [limit])
        return list(cursor.fetchall())


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


# Plain SQL rather than the ORM: at one relay round per commit, the ORM's query building and
# delete collector were most of the relay's CPU, and save() doubled the cost of a saved row.
_FIELDS = ("node", "ts_ns", "model", "object_pk", "fmt", "payload")
_DELETE_CHUNK = 500  # below every backend's limit of query parameters


@functools.cache
def _insert_sql(using: str) -> str:
    table, columns = _table(using, _FIELDS)
    return (f"INSERT INTO {table} ({', '.join(columns)}) "
            f"VALUES ({', '.join(['%s'] * len(columns))})")


def _table(using: str, fields: Sequence[str]) -> tuple[str, list[str]]:
    """The quoted table name and the quoted columns of ``fields``."""
    from scalepub.django.models import OutboxEntry

    meta, quote = OutboxEntry._meta, connections[using].ops.quote_name
    return quote(meta.db_table), [quote(meta.get_field(name).column) for name in fields]


class OutboxSpill:
    """``direct`` delivery's spill: entries Redis refused are kept in the outbox for the relay.

    This runs after the commit, in its own transaction: a process that dies between the two
    loses the entry (the ``outbox`` delivery has no such window). If the database refuses
    too, the entries are logged and counted like ``LogSpill`` does.
    """

    def __init__(self, using: str) -> None:
        self.using = using
        self._fallback = LogSpill()

    def spill(self, entries: Sequence[PendingEntry], error: Exception) -> None:
        """Keep ``entries`` in the outbox; never raises."""
        log.warning("scalepub: %d entries kept in the outbox, Redis refused them: %s",
                    len(entries), error)
        try:
            with transaction.atomic(using=self.using):
                write(entries, self.using, path="spill")
        except DatabaseError as exc:
            self._fallback.spill(entries, exc)
