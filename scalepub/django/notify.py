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

from scalepub.django.wakeups import WAIT_S, WakeThread

log = logging.getLogger(__name__)

CHANNEL = "scalepub_outbox"
# A setting of the session the trigger reads: 'off' (set for one transaction with
# set_config(..., true)) skips the notification. The one-statement create sets it when this
# process's own relay holds the lease (``runtime.leads``): that relay is woken in-process,
# and the LISTEN session is its own, so the notification would only wake the same relay
# again, through a thread that competes with the saves for the GIL (measured: a registered
# save 2.16x a plain one with it, 1.19x without, the relay thread in the process).
QUIET_SETTING = "scalepub.notify"

_FUNCTION_SQL = f"""
CREATE OR REPLACE FUNCTION scalepub_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('{CHANNEL}', '');
  RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS scalepub_outbox_notify ON scalepub_outbox;
"""
# The trigger (migrations 0002 and 0003, PostgreSQL only): FOR EACH STATEMENT, one pg_notify
# per INSERT statement, and PostgreSQL folds equal notifications of a transaction; its WHEN
# is evaluated as the statement ends, before the function would be called.
CREATE_SQL = f"""{_FUNCTION_SQL}
CREATE TRIGGER scalepub_outbox_notify AFTER INSERT ON scalepub_outbox FOR EACH STATEMENT
  WHEN (current_setting('{QUIET_SETTING}', true) IS DISTINCT FROM 'off')
  EXECUTE FUNCTION scalepub_outbox_notify();
"""
# Migration 0002's trigger, without the WHEN (what migrating 0003 back restores).
UNGATED_SQL = f"""{_FUNCTION_SQL}
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


class Listener(WakeThread):
    """A thread LISTENing on one PostgreSQL database; each notification sets ``wake``."""

    def __init__(self, using: str, wake: threading.Event, stop: threading.Event) -> None:
        super().__init__(wake, stop, f"scalepub-listen-{using}")
        self.using = using
        self.what = f"LISTEN on {using}"
        self.start()

    def _listen(self) -> None:
        wrapper = connections.create_connection(self.using)
        try:
            wrapper.connect()
            raw: Any = wrapper.connection  # psycopg 3: autocommit, as Django leaves it
            raw.execute(f"LISTEN {CHANNEL}")
            self.listening = True
            self.wake.set()
            while self.running():
                for _ in raw.notifies(timeout=WAIT_S):
                    self.wake.set()
        finally:
            _close(wrapper)


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
