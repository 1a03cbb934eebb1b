"""The transactional outbox: entries written in the same transaction as the rows they announce."""

from __future__ import annotations

from django.db import models

from scalepub.nodes import MAX_NODE_BYTES


class OutboxEntry(models.Model):
    """A serialized created row waiting for the relay to append it to its shard stream.

    Written in the save's own transaction, so the entry exists exactly when the row does;
    deleted by the relay once Redis holds it. The id orders entries (per node, too).
    """

    id = models.BigAutoField(primary_key=True)
    node = models.CharField(max_length=MAX_NODE_BYTES)
    ts_ns = models.BigIntegerField(help_text="save time, ns since the epoch (latency origin)")
    model = models.CharField(max_length=200)
    object_pk = models.TextField()
    fmt = models.CharField(max_length=8)
    payload = models.BinaryField()

    class Meta:
        db_table = "scalepub_outbox"
        verbose_name = "outbox entry"
        verbose_name_plural = "outbox entries"

    def __str__(self) -> str:
        return f"{self.model} pk={self.object_pk} → {self.node}"
