"""scalepub: new Django rows to many live XMPP pubsub subscribers.

The Django entry points import Django lazily, so the shard processes, which import
``scalepub.settings`` and friends, never load Django.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["bulk_create", "publish", "publish_many", "register", "unregister"]


def register(models: Any = None, *, node: Any = None) -> Any:
    """Publish created rows of a model, a list of models, or use as a class decorator.

    ``node`` is a fixed node name or a callable ``instance -> node`` (e.g. per author);
    by default ``/<app_label>/<ModelName>``. A node rule that raises or gives an invalid
    name fails the save (``scalepub.django.announce.NodeError``).
    """
    from scalepub.django.signals import register as _register

    return _register(models, node=node)


def unregister(model: Any) -> None:
    """Stop publishing a model's created rows."""
    from scalepub.django.signals import unregister as _unregister

    _unregister(model)


def publish(instance: Any, node: str | None = None) -> None:
    """Publish one instance now (after commit if in a transaction)."""
    from scalepub.django.announce import publish as _publish

    _publish(instance, node=node)


def publish_many(instances: Any, node: str | None = None, using: str | None = None) -> None:
    """Publish many instances, e.g. after ``bulk_create``, in one round trip per shard.

    Atomic with the rows only inside the same ``transaction.atomic()``; ``bulk_create``
    below does both in one transaction.
    """
    from scalepub.django.announce import publish_many as _publish_many

    _publish_many(instances, node=node, using=using)


def bulk_create(objs: Any, *, using: str | None = None, node: str | None = None,
                **kwargs: Any) -> Any:
    """``Model.objects.bulk_create(objs, **kwargs)`` and publish the rows, in one transaction."""
    from scalepub.django.atomic import bulk_create as _bulk_create

    return _bulk_create(objs, using=using, node=node, **kwargs)
