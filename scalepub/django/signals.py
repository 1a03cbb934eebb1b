"""Registering a model hooks it into its saves (``atomic.wrap_save``): a created row is
announced right after its INSERT, and each create is one unit with its entry."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar, overload

from django.db.models import Model

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
    unwrap_save(model)


def _hook(model: type[Model], node: NodeSpec) -> None:
    registry.add(model, node)
    wrap_save(model)  # wrapping twice is harmless: registering twice publishes a row once
