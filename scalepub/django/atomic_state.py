"""Which database connection this thread's registered save (``atomic._Outer``) runs on.

Django's ``connections[alias]`` costs ~3-7 us per lookup (asgiref's Local checks for a
running event loop each time): ``announce`` looks the connection up once per save, and
inside scalepub's own block around a create it is already known. A module of its own so
``announce`` and ``atomic`` (which imports ``announce``) both reach it without a loop.
"""

from __future__ import annotations

import threading
from typing import Any

from django.db import connections


class _Current(threading.local):
    def __init__(self) -> None:
        self.using: str | None = None
        self.connection: Any = None


_current = _Current()


def enter(using: str, connection: Any) -> tuple[str | None, Any]:
    """``connection`` (of ``using``) runs this thread's save now; returns what was before."""
    before = _current.using, _current.connection
    _current.using, _current.connection = using, connection
    return before


def leave(before: tuple[str | None, Any]) -> None:
    """Restore what ``enter`` returned."""
    _current.using, _current.connection = before


def connection(using: str) -> Any:
    """Django's connection of ``using`` for this thread: the save's own, else looked up."""
    if _current.using == using:
        return _current.connection
    return connections[using]
