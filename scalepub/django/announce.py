"""Created rows → stream entries: an outbox row in the save's transaction (``outbox``
delivery) or an append once it commits (``direct``); the save never waits on XMPP."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

from django.db import DatabaseError, router, transaction
from django.db.models import Model

from scalepub import metrics
from scalepub.django import atomic_state, outbox
from scalepub.django.registry import Registration, registry
from scalepub.django.runtime import runtime
from scalepub.django.serialize import serialize
from scalepub.nodes import InvalidNodeName, validate_node
from scalepub.producer import Appended, LogSpill, PendingEntry, Refusal

log = logging.getLogger(__name__)

Item = tuple[Model, Registration]


class NodeError(ValueError):
    """A row to publish has no valid node: the save fails rather than drop its entry."""


def announce(items: Sequence[Item], using: str) -> None:
    """Serialize ``items`` now (raising NodeError for a bad node); deliver after commit."""
    settings = runtime.settings()
    if settings.delivery == "outbox":
        # Rows go straight to the table: no PendingEntry per row (a frozen dataclass costs
        # ~3 us to build), one connection lookup (Django's is ~3 us each) for write and wake.
        rows = _rows(items, settings.payload_format, time.time_ns())
        if rows:
            connection = atomic_state.connection(using)
            outbox.write_rows(connection, using, rows)  # a database error fails the save
            wake_on_commit(connection, using)
        return
    entries = _entries(items, settings.payload_format, time.time_ns())
    if entries:
        transaction.on_commit(partial(_append, entries, using), using=using)


def announced(using: str) -> None:
    """What ``announce`` does after an outbox write, for an entry written with its row's
    INSERT (scalepub.django.onestatement): count it, wake the relay on commit."""
    outbox.written_total().inc()
    wake_on_commit(atomic_state.connection(using), using)


def wake_on_commit(connection: Any, using: str) -> None:
    """Wake this process's relay once the transaction commits (at once in autocommit).

    One wake per transaction, not per row: if the transaction's last hook is already this
    wake, it fires whenever this row commits. It was registered under savepoints that are
    either still open (this row is inside them too), released (no longer roll back alone)
    or rolled back (Django dropped their hooks). Only the last hook is looked at: the saves
    of one ``atomic()`` find theirs there, in O(1).
    """
    wake = _waker(using)
    hooks = connection.run_on_commit
    if not (connection.in_atomic_block and hooks and hooks[-1][1] is wake):
        connection.on_commit(wake)


@functools.cache
def _waker(using: str) -> Callable[[], None]:
    """The commit hook of database ``using`` (one object per database, so a transaction's
    hook list shows whether it is there already)."""
    return partial(_wake, using)


def _wake(using: str) -> None:
    runtime.wake(using)


def publish(instance: Model, node: str | None = None) -> None:
    """Publish one instance explicitly (after commit when inside a transaction)."""
    publish_many([instance], node=node)


def publish_many(instances: Iterable[Model], node: str | None = None,
                 using: str | None = None) -> None:
    """Publish instances explicitly, e.g. after ``bulk_create`` (which sends no signals).

    Rows of registered models go to their registered node, others to ``/<app>/<Model>``,
    unless ``node`` is given; ``using`` defaults to the router's database for the first row's
    model. One outbox insert (or one Redis round trip per shard touched). Atomic with the
    rows only inside the same ``transaction.atomic()`` (or with ``scalepub.bulk_create``):
    outside one, the rows are committed before this is called.
    """
    items = [(obj, _registration(obj, node)) for obj in instances]
    if items:
        announce(items, using or router.db_for_write(type(items[0][0])))


def _registration(instance: Model, node: str | None) -> Registration:
    model = type(instance)
    reg = registry.get(model) or Registration(model)
    return reg if node is None else Registration(model, node)


def _entries(items: Sequence[Item], fmt: str, ts_ns: int) -> list[PendingEntry]:
    """``direct`` delivery's entries (``_rows`` for the outbox)."""
    return [PendingEntry(*row) for row in _rows(items, fmt, ts_ns)]


def _rows(items: Sequence[Item], fmt: str, ts_ns: int) -> list[outbox.Row]:
    """Outbox rows (node, ts_ns, model, pk, fmt, payload) of ``items``; a row whose payload
    cannot be made is logged, counted and left out."""
    nodes = [node_of(obj, reg) for obj, reg in items]  # every node checked before any write
    rows = []
    for (obj, _), node in zip(items, nodes, strict=True):
        payload = _payload(obj, node, fmt)
        if payload is not None:
            rows.append((node, ts_ns, obj._meta.label_lower, str(obj.pk), fmt, payload))
    return rows


def node_of(instance: Model, reg: Registration) -> str:
    """The validated node of ``instance``; NodeError names the model, pk and node."""
    try:
        name = reg.node_for(instance)
    except Exception as exc:
        metrics.ENQUEUE_FAILURES.labels(reason="node").inc()
        raise NodeError(f"scalepub: cannot publish {_where(instance)}: its node rule "
                        f"{_rule(reg)} raised {type(exc).__name__}: {exc}") from exc
    if type(name) is str and name in _valid_nodes:
        return name
    try:
        validate_node(name)
    except InvalidNodeName as exc:
        metrics.ENQUEUE_FAILURES.labels(reason="node").inc()
        raise NodeError(f"scalepub: cannot publish {_where(instance)} to node {name!r} "
                        f"(from {_rule(reg)}): {exc}") from exc
    if len(_valid_nodes) >= _VALID_NODES_KEPT:
        _valid_nodes.clear()
    _valid_nodes.add(name)
    return name


# Node names validate_node accepted (a name is valid or not for good): a per-author rule
# gives the same few names again and again; bounded, for a rule with one node per row.
_valid_nodes: set[str] = set()
_VALID_NODES_KEPT = 4096


def _where(instance: Model) -> str:
    # Only on failure: the label and repr cost ~3 us a row.
    return f"{instance._meta.label} pk={instance.pk!r}"


def _rule(reg: Registration) -> str:
    if reg.node is None or isinstance(reg.node, str):
        return "the default node" if reg.node is None else "the fixed node"
    return getattr(reg.node, "__qualname__", repr(reg.node))


def _payload(instance: Model, node: str, fmt: str) -> bytes | None:
    try:
        return serialize(instance, fmt)
    except Exception as exc:  # e.g. EntryTooLarge: documented as logged and counted
        log.error("scalepub: cannot serialize %s pk=%s for node %s: %s",
                  instance._meta.label, instance.pk, node, exc)
        metrics.ENQUEUE_FAILURES.labels(reason="serialize").inc()
        return None


def _append(entries: list[PendingEntry], using: str) -> list[Appended] | None:
    """``direct``: append on commit; failures are counted and kept in the outbox, never raised."""
    try:
        return runtime.producer().enqueue(entries, spill=OutboxSpill(using))
    except Exception:  # the row is committed; a bug here must not surface as a failed save
        log.exception("scalepub: unexpected error enqueueing %d entries", len(entries))
        metrics.ENQUEUE_FAILURES.labels(reason="internal").inc(len(entries))
        return None


class OutboxSpill:
    """``direct`` delivery's spill: entries Redis refused are kept in the outbox for the relay.

    This runs after the commit, in its own transaction: a process that dies between the two
    loses the entry (the ``outbox`` delivery has no such window). If the database refuses
    too, the entries are logged and counted like ``LogSpill`` does.
    """

    def __init__(self, using: str) -> None:
        self.using = using
        self._fallback = LogSpill()

    def spill(self, entries: Sequence[PendingEntry], reason: Refusal, message: str) -> None:
        """Keep ``entries`` in the outbox; never raises."""
        log.warning("scalepub: %d entries kept in the outbox, Redis refused them (%s): %s",
                    len(entries), reason.value, message)
        try:
            with transaction.atomic(using=self.using):
                outbox.write(entries, self.using, path="spill")
        except (DatabaseError, outbox.OutboxTableMissing) as exc:
            self._fallback.spill(entries, reason, f"{message}; the outbox refused too: {exc}")
            return
        runtime.wake(self.using)
