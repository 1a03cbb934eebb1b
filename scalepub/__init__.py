"""scalepub: new Django rows to many live XMPP pubsub subscribers.

The Django entry points import Django lazily, so the shard processes, which import
``scalepub.settings`` and friends, never load Django.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["publish", "publish_many", "register", "unregister"]


def register(models: Any = None, *, node: Any = None) -> Any:
    """Publish created rows of a model, a list of models, or use as a class decorator.

    ``node`` is a fixed node name or a callable ``instance -> node`` (e.g. per author);
    by default ``/<app_label>/<ModelName>``.
    """
    from scalepub.django.registry import registry

    return registry.register(models, node=node)


def unregister(model: Any) -> None:
    """Stop publishing a model's created rows."""
    from scalepub.django.registry import registry

    registry.unregister(model)


def publish(instance: Any, node: str | None = None) -> None:
    """Publish one instance now (after commit if in a transaction)."""
    from scalepub.django.signals import publish as _publish

    _publish(instance, node=node)


def publish_many(instances: Any, node: str | None = None) -> None:
    """Publish many instances, e.g. after ``bulk_create``, in one round trip per shard."""
    from scalepub.django.signals import publish_many as _publish_many

    _publish_many(instances, node=node)
