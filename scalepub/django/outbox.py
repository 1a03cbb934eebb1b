"""Writing entries to the outbox table: in the save's transaction, or as a spill after commit."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from functools import partial

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
        # One plain INSERT: the ORM's save() machinery doubled the cost of a registered save.
        cursor.executemany(_insert_sql(using), rows)
    metrics.OUTBOX_WRITTEN.labels(path=path).inc(len(rows))
    transaction.on_commit(partial(wake, using), using=using)


@functools.cache
def _insert_sql(using: str) -> str:
    from scalepub.django.models import OutboxEntry

    meta, quote = OutboxEntry._meta, connections[using].ops.quote_name
    columns = [meta.get_field(name).column
               for name in ("node", "ts_ns", "model", "object_pk", "fmt", "payload")]
    return (f"INSERT INTO {quote(meta.db_table)} ({', '.join(map(quote, columns))}) "
            f"VALUES ({', '.join(['%s'] * len(columns))})")


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
