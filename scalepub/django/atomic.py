"""A registered create and its entry are one unit, in every transaction mode.

Under autocommit, Django's ``save_base`` commits the INSERT before it sends ``post_save``, so
an outbox row written from ``post_save`` would be a second transaction: a failure, or a
process killed in between, would leave a row without its entry. ``wrap_save`` therefore
runs a registered model's create outside any transaction in ``transaction.atomic()``, the
INSERT and ``post_save`` (the outbox row) together (an update, one statement in its own
transaction under autocommit anyway, is wrapped too). Inside the caller's own ``atomic()`` (or
with autocommit off) the save is left as it is: the entry joins that transaction, no extra
savepoint. ``bulk_create`` does the same for ``bulk_create`` plus ``publish_many``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from django.db import connections, router, transaction
from django.db.models import Model

from scalepub.django import outbox
from scalepub.django.announce import publish_many

M = TypeVar("M", bound=Model)
_MARK = "scalepub_atomic_create"


def wrap_save(model: type[Model]) -> None:
    """Make ``model``'s saves outside a transaction atomic with their ``post_save``."""
    own = model.__dict__.get("save_base")
    if getattr(own, _MARK, False):
        return
    original: Callable[..., Any] = model.save_base

    @functools.wraps(original)
    def save_base(self: Model, *args: Any, **kwargs: Any) -> Any:
        # Not only while _state.adding: a create that failed in post_save leaves the instance
        # with a pk and adding=False, and saving it again is a create Django finds out late.
        if not kwargs.get("raw", args[0] if args else False):
            using = kwargs.get("using") or (args[3] if len(args) > 3 else None)
            using = using or router.db_for_write(type(self), instance=self)
            connection = connections[using]
            if connection.get_autocommit():  # not inside any transaction
                return _atomic(connection.vendor, using, lambda: original(self, *args, **kwargs))
        return original(self, *args, **kwargs)

    setattr(save_base, _MARK, True)
    save_base.scalepub_own = own  # type: ignore[attr-defined]
    model.save_base = save_base


def _atomic(vendor: str, using: str, save: Callable[[], Any]) -> Any:
    """``save()`` in a new transaction; on PostgreSQL its outbox rows ride with the COMMIT."""
    if vendor != "postgresql":  # nothing to hold elsewhere: skip outbox.Held's checks
        with transaction.atomic(using=using):
            return save()
    with transaction.atomic(using=using), outbox.Held(using) as held:
        result = save()
        held.commit()  # outbox rows and COMMIT in one round trip
    return result


def unwrap_save(model: type[Model]) -> None:
    """Undo ``wrap_save`` (after ``unregister``)."""
    own = model.__dict__.get("save_base")
    if not getattr(own, _MARK, False):
        return
    previous = own.scalepub_own  # type: ignore[union-attr]
    if previous is None:
        delattr(model, "save_base")
    else:
        model.save_base = previous


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
