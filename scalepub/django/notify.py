"""Commit notifications on PostgreSQL: the relay is woken by any process's commit, not a poll.

A statement trigger on ``scalepub_outbox`` (migration 0002) calls ``pg_notify`` for every
INSERT; PostgreSQL delivers the notification at commit (never for a rolled-back transaction,
once per transaction however many rows) to every session that LISTENs on the database. A
relay that holds the lease keeps one such session in a small thread that sets its wake-up
event, so rows committed by any process (other gunicorn workers, management commands, raw
SQL that inserts outbox rows) move at once instead of at the next poll. Other databases have
no notifications: relays that do not lead nudge the leader over Redis pub/sub (``nudge``),
and the leader still polls (``OUTBOX_POLL_MS``).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from django.db import connections
from django.db.backends.base.base import BaseDatabaseWrapper

log = logging.getLogger(__name__)

CHANNEL = "scalepub_outbox"
# How long one wait for notifications lasts: the bound on noticing ``stop``.
_WAIT_S = 0.5
_RECONNECT_MAX_S = 5.0

# The trigger, created by migration 0002 on PostgreSQL only (FOR EACH STATEMENT: one
# pg_notify per INSERT statement, and PostgreSQL folds equal notifications of a transaction).
CREATE_SQL = f"""
CREATE OR REPLACE FUNCTION scalepub_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('{CHANNEL}', '');
  RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS scalepub_outbox_notify ON scalepub_outbox;
CREATE TRIGGER scalepub_outbox_notify AFTER INSERT ON scalepub_outbox
  FOR EACH STATEMENT EXECUTE FUNCTION scalepub_outbox_notify();
"""
DROP_SQL = """
DROP TRIGGER IF EXISTS scalepub_outbox_notify ON scalepub_outbox;
DROP FUNCTION IF EXISTS scalepub_outbox_notify();
"""


def supported(using: str) -> bool:
    """Whether database ``using`` can notify commits (PostgreSQL)."""
    return bool(connections[using].vendor == "postgresql")


class Listener:
    """A thread LISTENing on one PostgreSQL database; each notification sets ``wake``.

    While its session is down (database restarting, network), ``listening`` is False and the
    relay falls back to polling; after each (re)connection ``wake`` is set once, for the
    commits it may have missed.
    """

    def __init__(self, using: str, wake: threading.Event, stop: threading.Event) -> None:
        self.using, self.wake, self.stop = using, wake, stop
        self.listening = False
        self.thread = threading.Thread(target=self._run, name=f"scalepub-listen-{using}",
                                       daemon=True)
        self.thread.start()

    def _run(self) -> None:
        delay = 0.0
        while not self.stop.wait(delay):
            wrapper = connections.create_connection(self.using)
            try:
                self._listen(wrapper)
                delay = 0.0
            except Exception as exc:  # a database error or a bug: retry, never end the thread
                # once per episode at WARNING (retries repeat until the database is back)
                level = logging.DEBUG if delay else logging.WARNING
                log.log(level, "scalepub relay: LISTEN on %s lost, polling until it is back: "
                        "%s", self.using, exc)
                delay = min(max(delay * 2, 0.1), _RECONNECT_MAX_S)
            finally:
                self.listening = False
                _close(wrapper)

    def _listen(self, wrapper: BaseDatabaseWrapper) -> None:
        wrapper.connect()
        raw: Any = wrapper.connection  # psycopg 3: autocommit, as Django leaves it
        raw.execute(f"LISTEN {CHANNEL}")
        self.listening = True
        self.wake.set()
        while not self.stop.is_set():
            for _ in raw.notifies(timeout=_WAIT_S):
                self.wake.set()

    def join(self, timeout: float = _WAIT_S * 4) -> None:
        """Wait for the thread after ``stop`` was set."""
        self.thread.join(timeout)


def available(using: str) -> bool:
    """Whether the relay of ``using`` can LISTEN: PostgreSQL, with psycopg 3 installed.
    Elsewhere relays that do not lead nudge the leader over Redis (``nudge``)."""
    if not supported(using):
        return False
    try:
        import psycopg
    except ImportError:
        return False
    del psycopg  # psycopg >= 3.2 (pyproject): notifies(timeout=...)
    return True


def listener(using: str, wake: threading.Event, stop: threading.Event) -> Listener | None:
    """A Listener for ``using``, or None when that database cannot notify (or the driver is
    not psycopg 3)."""
    if not available(using):
        if supported(using):
            log.info("scalepub relay: %s is PostgreSQL but psycopg 3 is not installed: "
                     "polling", using)
        return None
    return Listener(using, wake, stop)


def _close(wrapper: BaseDatabaseWrapper) -> None:
    try:
        wrapper.close()
    except Exception:  # already broken: nothing left to release
        log.debug("scalepub relay: closing the LISTEN session failed", exc_info=True)
