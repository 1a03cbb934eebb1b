"""This process's scalepub runtime: its settings, the shared producer and the relay threads.

One object owns the outbox relay's life, per process:

- started for every outbox database when the process serves requests: a WSGI or ASGI
  handler is made (runserver, gunicorn and uWSGI workers, ASGI servers) or a request starts;
  and for one database when this process commits outbox rows (e.g. a management command
  that saves), so what it wrote moves before it exits;
- started again in a forked child (a server that loads the app before forking its workers);
- stopped, after a short drain, at exit and when the ``SCALEPUB`` setting changes.

One-shot management commands (``migrate``, ``shell``, ``check``...) make no handler and start
no relay unless they commit registered rows; nor do requests of Django's test client.
``OUTBOX_RELAY = "external"`` turns it all off.
"""

from __future__ import annotations

import atexit
import functools
import os
import threading
from collections.abc import Mapping
from typing import Any

from django.conf import settings as django_settings
from django.core.handlers.base import BaseHandler
from django.core.signals import request_started, setting_changed
from django.db import connections, router

from scalepub.django.relay import DRAIN_ON_STOP_S, Relay
from scalepub.producer import StreamProducer
from scalepub.settings import DJANGO_SETTING, Settings, SettingsError


def load_settings() -> Settings:
    """Settings from the ``SCALEPUB`` dict (defaults where it is silent); SettingsError if bad."""
    mapping = getattr(django_settings, DJANGO_SETTING, {})
    if not isinstance(mapping, Mapping):
        raise SettingsError(f"{DJANGO_SETTING}: must be a dict like "
                            f"{{'REDIS_URL': 'redis://...'}}, got {type(mapping).__name__}")
    return Settings.from_mapping(mapping)


def outbox_databases() -> list[str]:
    """Aliases of the databases the outbox table may live in (as the routers allow)."""
    from scalepub.django.models import OutboxEntry

    return [alias for alias in connections
            if router.allow_migrate_model(alias, OutboxEntry)]


class _RelayThread:
    """The relay thread of one database in this process."""

    def __init__(self, settings: Settings, using: str) -> None:
        self.pid = os.getpid()
        self.stop, self.wake = threading.Event(), threading.Event()
        self.round_lock = threading.Lock()
        self.relay = Relay(settings, using)
        self.thread = threading.Thread(
            target=self.relay.run, args=(self.stop, self.wake, self.round_lock),
            name=f"scalepub-relay-{using}", daemon=True)
        self.thread.start()

    @property
    def alive(self) -> bool:
        """Running in this process (not inherited through a fork, not ended)."""
        return self.pid == os.getpid() and self.thread.is_alive()

    def close(self, timeout: float = DRAIN_ON_STOP_S + 2) -> None:
        self.stop.set()
        self.thread.join(timeout)


_FORK_LOCK = threading.RLock()


class Runtime:
    """Settings, producer and relay threads of this process (thread-safe, fork-aware)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._settings: Settings | None = None
        self._producer: StreamProducer | None = None
        self._relays: dict[str, _RelayThread] = {}
        self._serving = False  # this process serves requests: a relay for every database
        self._all_started = False  # ... and they run (the per-request fast path)

    def settings(self) -> Settings:
        """The settings (built on first use; SettingsError names a bad value)."""
        current = self._settings
        if current is None:
            current = self._settings = load_settings()
        return current

    def producer(self) -> StreamProducer:
        """The shared StreamProducer of ``direct`` delivery and the history view."""
        self._check_fork()
        with self._lock:
            if self._producer is None:
                self._producer = StreamProducer(self.settings())
            return self._producer

    def serve(self) -> None:
        """This process serves requests: take part in every outbox database's relay lease."""
        if self._all_started and self._pid == os.getpid():
            return
        self._check_fork()
        self._serving = True
        if self.settings().outbox_relay != "thread":
            return
        for using in outbox_databases():
            self._ensure(using)
        self._all_started = True

    def wake(self, using: str, notified: bool = True) -> None:
        """After a commit that wrote outbox rows: make this process's relay look now
        (``notified=False``: the commit sent no notification, notify.QUIET_SETTING)."""
        if self.settings().outbox_relay != "thread":
            return
        self._check_fork()
        # Without the lock while it runs (dict.get is atomic): after _check_fork every relay
        # kept is this process's; _ensure's lock and second pid check were ~2 of this call's
        # ~3.5 us, once per commit.
        relay = self._relays.get(using)
        if relay is None or not relay.thread.is_alive():
            relay = self._ensure(using)
        # else its notification wakes it, once; an Event already set (commits of one
        # gather window) needs no second set(): that takes its lock and notifies
        if not (notified and relay.relay.notified) and not relay.wake.is_set():
            relay.wake.set()

    def leads(self, using: str) -> bool:
        """Whether this process's relay thread of ``using`` holds the lease now: its commits
        wake it in-process, and no other relay needs to hear of them (notify.QUIET_SETTING)."""
        current = self._relays.get(using)
        return current is not None and current.alive and current.relay.lease.held()

    def relaying(self) -> list[str]:
        """The databases whose relay thread runs in this process."""
        with self._lock:
            return [using for using, t in self._relays.items() if t.alive]

    def stop(self) -> None:
        """Stop this process's relay threads, letting each drain briefly (at exit, on reset)."""
        with self._lock:
            mine = [t for t in self._relays.values() if t.pid == os.getpid()]
            self._relays.clear()
            self._all_started = False
        for t in mine:  # all drain at once, then each is waited for
            t.stop.set()
            t.wake.set()
        for t in mine:
            t.close()

    def reset(self) -> None:
        """Stop the relays and forget settings and producer (the SCALEPUB setting changed).

        A serving process starts its relays again at its next request.
        """
        self.stop()
        with self._lock:
            if self._producer is not None:
                self._producer.close()
            self._settings, self._producer = None, None

    def _ensure(self, using: str) -> _RelayThread:
        with self._lock:
            current = self._relays.get(using)
            # none yet, or ended (e.g. a stop that timed out)
            if current is None or not current.alive:
                current = self._relays[using] = _RelayThread(self.settings(), using)
            return current

    def _check_fork(self) -> None:
        # A server whose fork skips os.register_at_fork's hooks (uWSGI without
        # py-call-osafterfork) is noticed here, at the first use in the child; the class lock
        # keeps two threads of that child from both starting afresh (re-entered by serve()).
        if self._pid != os.getpid():
            with _FORK_LOCK:
                if self._pid != os.getpid():
                    self._after_fork_in_child()

    def _before_fork(self) -> None:
        """Hold every relay between two rounds while the process forks."""
        self._lock.acquire()
        for t in self._relays.values():
            t.round_lock.acquire()

    def _after_fork_in_parent(self) -> None:
        for t in self._relays.values():
            t.round_lock.release()
        self._lock.release()

    def _after_fork_in_child(self) -> None:
        """The parent's threads are gone and its locks may be held: start afresh."""
        self._lock = threading.Lock()
        self._pid = os.getpid()
        # the parent's client and connections are left alone: closing them here would close
        # sockets the parent still uses; redis-py's pool makes new ones in a new process
        self._producer, self._relays, self._all_started = None, {}, False
        if self._serving:  # e.g. gunicorn --preload: the workers serve, not the master
            self.serve()


runtime = Runtime()


def install() -> None:
    """Hook the runtime into Django (``AppConfig.ready``; calling it again is harmless)."""
    request_started.connect(_on_request_started, dispatch_uid="scalepub.runtime.request")
    setting_changed.connect(_on_setting_changed, dispatch_uid="scalepub.runtime.settings")
    _hook_handlers()
    _install_process_hooks()


def _on_request_started(sender: object = None, **kwargs: Any) -> None:
    if not _is_test_client(sender):
        runtime.serve()


def _is_test_client(handler_class: object) -> bool:
    """Django's test client runs requests in the test process, which serves nothing: a
    relay per database there would compete for the lease with the site's real relays and
    touch databases the test runner may not allow (saves still wake one, on commit)."""
    from django.test.client import AsyncClientHandler, ClientHandler

    return isinstance(handler_class, type) and issubclass(
        handler_class, (ClientHandler, AsyncClientHandler))


def _on_setting_changed(setting: str, **kwargs: Any) -> None:
    if setting == DJANGO_SETTING:
        runtime.reset()


def _hook_handlers() -> None:
    """A WSGI or ASGI handler (made once per serving process, before its first request)
    starts the relays: Django has no signal for it, so ``load_middleware`` is wrapped."""
    original = BaseHandler.load_middleware
    if getattr(original, "scalepub_hook", False):
        return

    @functools.wraps(original)
    def load_middleware(self: BaseHandler, is_async: bool = False) -> None:
        original(self, is_async)
        if not _is_test_client(type(self)):
            runtime.serve()

    load_middleware.scalepub_hook = True  # type: ignore[attr-defined]
    BaseHandler.load_middleware = load_middleware


@functools.cache
def _install_process_hooks() -> None:
    """Once per interpreter: stop the relays at exit, restart them in forked children."""
    atexit.register(runtime.stop)
    os.register_at_fork(before=runtime._before_fork,
                        after_in_parent=runtime._after_fork_in_parent,
                        after_in_child=runtime._after_fork_in_child)
