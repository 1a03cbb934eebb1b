"""``manage.py scalepub_relay``: move outbox rows to Redis, as a service or once."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DEFAULT_DB_ALIAS

from scalepub.django import outbox
from scalepub.django.relay import Relay
from scalepub.django.runtime import runtime


class Command(BaseCommand):
    """Run the outbox relay of one database."""

    help = ("Move committed outbox rows to the Redis shard streams, oldest first. Runs until "
            "SIGTERM/Ctrl-C; with --once, drains what is there and exits (1 if rows remain).")

    def add_arguments(self, parser: CommandParser) -> None:
        """--database, --once."""
        parser.add_argument("--database", default=DEFAULT_DB_ALIAS, help="database alias")
        parser.add_argument("--once", action="store_true",
                            help="drain the outbox now and exit (e.g. after an outage)")

    def handle(self, *args: Any, database: str, once: bool, **options: Any) -> None:
        """Relay until stopped (or once)."""
        relay = Relay(runtime.settings(), database)
        if once:
            self._once(relay, database)
            return
        stop = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.stdout.write(f"scalepub relay: database {database!r}, lease {relay.lease.key}")
        relay.run(stop)
        left = outbox.count(database)
        self.stdout.write(f"scalepub relay: stopped, {left} rows left in the outbox")

    def _once(self, relay: Relay, database: str) -> None:
        if not relay.lease.hold():
            raise CommandError(f"another relay holds the lease {relay.lease.key}; "
                               "it is moving the rows already")
        moved = relay.drain()
        left = outbox.count(database)
        self.stdout.write(f"scalepub relay: moved {moved} entries, {left} left in the outbox")
        if left:
            raise CommandError(f"{left} entries are still in the outbox (see the log above)")
