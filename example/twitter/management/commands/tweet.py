"""``manage.py tweet``: create tweets at a steady rate, the demo's and load tests' producer."""

import random
import signal
import sys
import time

from django.core.management.base import BaseCommand

import scalepub
from twitter.models import Tweet

WORDS = [
    "scale", "publish", "live", "stream", "shard", "batch", "node", "entry", "feed",
    "django", "xmpp", "redis", "fast",
]


class Command(BaseCommand):
    help = "Create tweets by N authors at a target rate (0 = as fast as possible)."

    def add_arguments(self, parser):
        parser.add_argument("--count", type=int, default=0, help="stop after this many (0: never)")
        parser.add_argument("--authors", type=int, default=10, help="distinct authors (nodes)")
        parser.add_argument("--rate", type=float, default=5.0, help="tweets per second (0: max)")
        parser.add_argument("--bulk", type=int, default=0,
                            help="use scalepub.bulk_create (rows and entries in one transaction) "
                                 "in chunks of this size")
        parser.add_argument("--prefix", default="user", help="author name prefix")

    def handle(self, *args, count, authors, rate, bulk, prefix, **options):
        # SIGTERM (kill, timeout, a supervisor) ends like Ctrl-C: exit handlers run, so the
        # outbox relay thread moves what this process saved and releases its lease.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        names = [f"{prefix}{i}" for i in range(authors)]
        started = time.monotonic()
        made = 0
        while not count or made < count:
            made += self._make(names, bulk, count, made)
            if rate:
                ahead = made / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
        elapsed = time.monotonic() - started
        self.stdout.write(f"created {made} tweets in {elapsed:.2f} s ({made / elapsed:.0f}/s)")

    def _make(self, names, bulk, count, made):
        size = min(bulk, count - made) if bulk and count else (bulk or 1)
        tweets = [
            Tweet(author=names[(made + i) % len(names)], text=" ".join(random.choices(WORDS, k=8)))
            for i in range(size)
        ]
        if bulk:
            scalepub.bulk_create(tweets)
        else:
            tweets[0].save()
        return size
