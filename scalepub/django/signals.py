"""Created rows → stream entries, after commit; the save itself never waits on XMPP."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from functools import partial
from typing import Any

from django.db import DEFAULT_DB_ALIAS, router, transaction
from django.db.models import Model

from scalepub import metrics
from scalepub.django import outbox
from scalepub.django.producer import get_producer, get_settings
from scalepub.django.registry import Registration, registry
from scalepub.django.serialize import serialize
from scalepub.nodes import validate_node
from scalepub.producer import Appended, PendingEntry

log = logging.getLogger(__name__)


def on_post_save(sender: type[Model], instance: Model, created: bool, raw: bool = False,
                 using: str = DEFAULT_DB_ALIAS, **kwargs: Any) -> None:
    """Announce created rows (ignore updates and fixtures): never before their commit."""
    if not created or raw:
        return
    reg = registry.get(sender)
    if reg is not None:
        _announce([(instance, reg)], using)


def publish(instance: Model, node: str | None = None) -> None:
    """Publish one instance explicitly (after commit when inside a transaction)."""
    publish_many([instance], node=node)


def publish_many(instances: Iterable[Model], node: str | None = None) -> None:
    """Publish instances explicitly, e.g. after ``bulk_create`` (which sends no signals).

    Rows of registered models go to their registered node, others to ``/<app>/<Model>``,
    unless ``node`` is given. One outbox insert (or one Redis round trip per shard touched).
    """
    items = [(obj, _registration(obj, node)) for obj in instances]
    if items:
        _announce(items, router.db_for_write(type(items[0][0])))


def _registration(instance: Model, node: str | None) -> Registration:
    model = type(instance)
    reg = registry.get(model) or Registration(model)
    return reg if node is None else Registration(model, node)


def _announce(items: list[tuple[Model, Registration]], using: str) -> None:
    """outbox: a row in the current transaction; direct: an append once it commits."""
    if get_settings().delivery == "outbox":
        entries = _entries(items, time.time_ns())
        if entries:  # a database error here fails the save: the entry must not be lost
            outbox.write(entries, using)
    else:
        transaction.on_commit(partial(_enqueue, items, using), using=using)


def _entries(items: list[tuple[Model, Registration]], ts_ns: int) -> list[PendingEntry]:
    fmt = get_settings().payload_format
    return [e for e in (_entry(obj, reg, fmt, ts_ns) for obj, reg in items) if e is not None]


def _enqueue(items: list[tuple[Model, Registration]], using: str) -> list[Appended] | None:
    """Serialize and append; failures are counted and kept in the outbox, never raised."""
    entries = _entries(items, time.time_ns())
    if not entries:
        return None
    try:
        return get_producer().enqueue(entries, spill=outbox.OutboxSpill(using))
    except Exception:  # the row is committed; a bug here must not surface as a failed save
        log.exception("scalepub: unexpected error enqueueing %d entries", len(entries))
        metrics.ENQUEUE_FAILURES.labels(reason="internal").inc(len(entries))
        return None


def _entry(instance: Model, reg: Registration, fmt: str, ts_ns: int) -> PendingEntry | None:
    label = instance._meta.label
    try:
        node = validate_node(reg.node_for(instance))
    except Exception as exc:
        log.error("scalepub: no valid node for %s pk=%s: %s", label, instance.pk, exc)
        metrics.ENQUEUE_FAILURES.labels(reason="node").inc()
        return None
    try:
        payload = serialize(instance, fmt)
    except Exception as exc:
        log.error("scalepub: cannot serialize %s pk=%s for node %s: %s",
                  label, instance.pk, node, exc)
        metrics.ENQUEUE_FAILURES.labels(reason="serialize").inc()
        return None
    return PendingEntry(node, ts_ns, instance._meta.label_lower, str(instance.pk), fmt, payload)
