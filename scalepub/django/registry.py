"""Which models are published, and to which node."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from django.db.models import Model
from django.db.models.signals import post_save

from scalepub.nodes import default_node

M = TypeVar("M", bound=type[Model])
NodeSpec = str | Callable[[Any], str] | None


@dataclass(frozen=True)
class Registration:
    """A registered model and its node rule."""

    model: type[Model]
    node: NodeSpec = None

    def node_for(self, instance: Model) -> str:
        """The node this instance is published to (not yet validated)."""
        if self.node is None:
            meta = self.model._meta
            return default_node(meta.app_label, meta.object_name or type(instance).__name__)
        if isinstance(self.node, str):
            return self.node
        return self.node(instance)


class Registry:
    """Registered models; ``register`` works as a call, on a list, and as a class decorator."""

    def __init__(self) -> None:
        self._models: dict[type[Model], Registration] = {}

    @overload
    def register(self, models: M, *, node: NodeSpec = None) -> M: ...
    @overload
    def register(self, models: Iterable[type[Model]], *, node: NodeSpec = None) -> None: ...
    @overload
    def register(self, models: None = None, *, node: NodeSpec = None) -> Callable[[M], M]: ...

    def register(self, models: Any = None, *, node: NodeSpec = None) -> Any:
        """Publish every created row of ``models`` (a model, a list, or use as decorator)."""
        if models is None:
            def decorator(model: M) -> M:
                self._add(model, node)
                return model
            return decorator
        if isinstance(models, type):
            self._add(models, node)
            return models
        for model in models:
            self._add(model, node)
        return None

    def unregister(self, model: type[Model]) -> None:
        """Stop publishing ``model``'s rows."""
        self._models.pop(model, None)
        post_save.disconnect(sender=model, dispatch_uid=_uid(model))

    def get(self, model: type[Model]) -> Registration | None:
        """The registration of ``model`` (None if not registered)."""
        return self._models.get(model)

    def __contains__(self, model: object) -> bool:
        return model in self._models

    def _add(self, model: type[Model], node: NodeSpec) -> None:
        if not (isinstance(model, type) and issubclass(model, Model)):
            raise TypeError(f"scalepub.register expects Django model classes, got {model!r}")
        if model._meta.abstract:
            raise TypeError(f"scalepub.register: {model.__name__} is abstract")
        if node is not None and not (isinstance(node, str) or callable(node)):
            raise TypeError(f"scalepub.register: node must be a str or a callable, got {node!r}")
        if isinstance(node, str):
            from scalepub.nodes import validate_node

            validate_node(node)
        from scalepub.django.signals import on_post_save

        self._models[model] = Registration(model, node)
        # dispatch_uid makes registering twice harmless: one receiver per model.
        post_save.connect(on_post_save, sender=model, dispatch_uid=_uid(model), weak=False)


def _uid(model: type[Model]) -> str:
    return f"scalepub:{model._meta.label}"


registry = Registry()
