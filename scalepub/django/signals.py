"""Registering a model hooks it into its saves: a ``post_save`` receiver announces created
rows, and ``atomic.wrap_save`` makes each create one unit with its entry."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar, overload

from django.db import DEFAULT_DB_ALIAS
from django.db.models import Model
from django.db.models.signals import post_save

from scalepub.django import onestatement
from scalepub.django.announce import announce, announced
from scalepub.django.atomic import unwrap_save, wrap_save
from scalepub.django.registry import NodeSpec, registry

M = TypeVar("M", bound=type[Model])


@overload
def register(models: M, *, node: NodeSpec = None) -> M: ...
@overload
def register(models: Iterable[type[Model]], *, node: NodeSpec = None) -> None: ...
@overload
def register(models: None = None, *, node: NodeSpec = None) -> Callable[[M], M]: ...


def register(models: Any = None, *, node: NodeSpec = None) -> Any:
    """Publish every created row of ``models`` (a model, a list, or use as decorator)."""
    if models is None:
        def decorator(model: M) -> M:
            _hook(model, node)
            return model
        return decorator
    if isinstance(models, type):
        _hook(models, node)
        return models
    for model in models:
        _hook(model, node)
    return None


def unregister(model: type[Model]) -> None:
    """Stop publishing ``model``'s rows."""
    registry.remove(model)
    post_save.disconnect(sender=model, dispatch_uid=_uid(model))
    unwrap_save(model)


def on_post_save(sender: type[Model], instance: Model, created: bool, raw: bool = False,
                 using: str = DEFAULT_DB_ALIAS, **kwargs: Any) -> None:
    """Announce created rows (ignore updates and fixtures), in the save's transaction."""
    if not created or raw:
        return
    if onestatement.take_written(instance):  # the entry went with the INSERT
        announced(using)
        return
    reg = registry.get(sender)
    if reg is not None:
        announce([(instance, reg)], using)


def _hook(model: type[Model], node: NodeSpec) -> None:
    registry.add(model, node)
    # dispatch_uid makes registering twice harmless: one receiver per model.
    post_save.connect(on_post_save, sender=model, dispatch_uid=_uid(model), weak=False)
    wrap_save(model)


def _uid(model: type[Model]) -> str:
    return f"scalepub:{model._meta.label}"
