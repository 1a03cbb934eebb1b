"""Which models are published, and to which node: bookkeeping only.

Hooking a model into its saves is ``signals``' part; this module imports nothing of the
Django side, so both ``signals`` and ``announce`` can look registrations up here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.db.models import Model

from scalepub.nodes import default_node, validate_node

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
    """Registered models and their node rules."""

    def __init__(self) -> None:
        self._models: dict[type[Model], Registration] = {}

    def add(self, model: type[Model], node: NodeSpec = None) -> Registration:
        """Record ``model`` (again: the new node rule wins); TypeError/InvalidNodeName if bad."""
        if not (isinstance(model, type) and issubclass(model, Model)):
            raise TypeError(f"scalepub.register expects Django model classes, got {model!r}")
        if model._meta.abstract:
            raise TypeError(f"scalepub.register: {model.__name__} is abstract")
        if node is not None and not (isinstance(node, str) or callable(node)):
            raise TypeError(f"scalepub.register: node must be a str or a callable, got {node!r}")
        if isinstance(node, str):
            validate_node(node)
        reg = self._models[model] = Registration(model, node)
        return reg

    def remove(self, model: type[Model]) -> None:
        """Forget ``model`` (no error if it was not registered)."""
        self._models.pop(model, None)

    def get(self, model: type[Model]) -> Registration | None:
        """The registration of ``model`` (None if not registered)."""
        return self._models.get(model)

    def __contains__(self, model: object) -> bool:
        return model in self._models


registry = Registry()
