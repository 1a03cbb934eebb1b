"""Commit nudges over Redis pub/sub: the relay leader is woken by other processes' commits.

On databases without commit notifications (SQLite, anything but PostgreSQL: ``notify``), a
row committed by a process whose relay does not hold the lease used to wait for the
leader's next poll (``OUTBOX_POLL_MS``). Each process's relay thread is already woken by its
own commits; one that does not lead publishes one nudge per wake-up (however many commits it
gathered) on the database's nudge channel, and the leader, subscribed while it leads, wakes
at once. The save never waits on Redis: the nudge is sent by the relay thread, after the
commit. A lost nudge (Redis down, the subscription reconnecting) costs one poll interval:
the poll stays as the safety net (every OUTBOX_POLL_MS while the subscription is down or
relays are external, once a second while it is up: ``relay.LISTENING_POLL_S``).

On a single Redis: PUBLISH/SUBSCRIBE. On a Redis Cluster: sharded pub/sub (SPUBLISH and
SSUBSCRIBE, Redis 7): the nudge goes to the master that owns the channel's slot only,
instead of being broadcast over the cluster bus to every node.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis

from scalepub.connections import cluster_of
from scalepub.django.wakeups import WAIT_S, WakeThread

log = logging.getLogger(__name__)


def send(client: redis.Redis, channel: str) -> bool:
    """Publish one nudge on ``channel``; False (logged at DEBUG) if Redis failed."""
    cluster: Any = cluster_of(client)  # redis-py's cluster methods are untyped
    try:
        if cluster is not None:
            cluster.spublish(channel, b"")
        else:
            client.publish(channel, b"")
    except redis.RedisError as exc:  # the leader's poll moves the row: not worth a warning
        log.debug("scalepub relay: nudge on %s failed: %s", channel, exc)
        return False
    return True


class Subscriber(WakeThread):
    """A thread subscribed to ``channel``; each nudge sets ``wake``. ``close()`` ends it (the
    relay stopped, or lost the lease)."""

    def __init__(self, client: redis.Redis, channel: str, wake: threading.Event,
                 stop: threading.Event) -> None:
        super().__init__(wake, stop, "scalepub-nudges")
        self.client, self.channel = client, channel
        self.what = f"nudge subscription on {channel}"
        self.start()

    def _listen(self) -> None:
        cluster: Any = cluster_of(self.client)
        sharded = cluster is not None
        pubsub: Any = (cluster if sharded else self.client).pubsub(
            ignore_subscribe_messages=True)
        try:
            if sharded:
                pubsub.ssubscribe(self.channel)
            else:
                pubsub.subscribe(self.channel)
            self._confirm(pubsub, sharded)
            self.listening = True
            self.wake.set()
            while self.running():
                if self._next(pubsub, sharded) is not None:
                    self.wake.set()
        finally:
            pubsub.close()

    def _confirm(self, pubsub: Any, sharded: bool) -> None:
        """Wait for the server's subscribe reply: nudges sent after it are received."""
        pubsub.ignore_subscribe_messages = False
        reply = self._next(pubsub, sharded, timeout=5.0)
        pubsub.ignore_subscribe_messages = True
        if reply is None or reply.get("type") not in ("subscribe", "ssubscribe", b"subscribe",
                                                      b"ssubscribe"):
            raise redis.ConnectionError(f"no subscribe reply for {self.channel}: {reply!r}")

    def _next(self, pubsub: Any, sharded: bool, timeout: float = WAIT_S) -> Any:
        if sharded:
            return pubsub.get_sharded_message(timeout=timeout)
        return pubsub.get_message(timeout=timeout)
