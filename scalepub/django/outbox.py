"""Writing entries to the outbox table: in the save's transaction, or as a spill after commit."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial

from django.db import DatabaseError, transaction

from scalepub import metrics
from scalepub.producer import LogSpill, PendingEntry

log = logging.getLogger(__name__)


def write(entries: Sequence[PendingEntry], using: str, path: str = "transaction") -> None:
    """Insert ``entries`` (in the caller's transaction, if any) and wake the relay on commit.

    A database error propagates: in ``outbox`` delivery the entry is part of the save, and a
    save whose announcement cannot be recorded must fail loudly rather than lose it.
    """
    from scalepub.django.models import OutboxEntry
    from scalepub.django.relay import wake

    rows = [OutboxEntry(node=e.node, ts_ns=e.ts_ns, model=e.model, object_pk=e.pk, fmt=e.fmt,
                        payload=e.payload) for e in entries]
    if len(rows) == 1:
        rows[0].save(using=using, force_insert=True)
    else:
        OutboxEntry.objects.using(using).bulk_create(rows)
    metrics.OUTBOX_WRITTEN.labels(path=path).inc(len(rows))
    transaction.on_commit(partial(wake, using), using=using)


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
