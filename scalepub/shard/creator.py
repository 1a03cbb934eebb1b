"""New pubsub nodes during a burst: created explicitly, by one connection of the pool at a time.

A publish to a missing node makes ejabberd create it (auto-create), and when nodes exist that
costs nothing, so the shard publishes optimistically. But ejabberd 23.01 aborts node
creations that run at the same time on different connections (Mnesia transactions on its
pubsub tables; also across the nodes of an ejabberd cluster). Measured on this box, 1,000 new
nodes: auto-created by publishes over 8 connections, 60-70 % of the publishes were refused
item-not-found; created explicitly over 2 or 8 connections, 20-70 % refused
internal-server-error; over one connection none, ~1,200-1,700 nodes/s (docs/benchmarks.md).

So after a publish was refused item-not-found the shard turns careful for ``CAREFUL_S``:
batches of nodes it has not seen published are parked, and their nodes created with explicit
create IQs while the shard holds a Redis lock (``Keys.node_creation``) that one connection
of every pool sharing the Redis holds at a time, for up to ``SLICE_S``; then the batches go.
A node that already exists answers ``conflict``: as good as created. Without Redis the shard
creates anyway (a conflict then costs a retry, as before): publishing never waits on the lock.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable

import redis.asyncio as aredis
from redis.exceptions import RedisError

from scalepub.xmpp.batch import Batch, node_attr
from scalepub.xmpp.link import Reply, XmppLink
from scalepub.xmpp.nodeconfig import create_iq

log = logging.getLogger(__name__)

CAREFUL_S = 10.0  # after a refused auto-create, unknown nodes are created first for this long
SLICE_S = 0.5  # the lock is held for at most this long, then others get their turn
LOCK_TTL_MS = 5000  # a holder that dies frees the lock after this
LOCK_POLL_S = 0.01
WINDOW = 32  # create IQs in flight
MAX_TRIES = 3  # create refusals (other than conflict) before the batch is published anyway
KNOWN_MAX = 50_000  # nodes remembered as existing (a few MB); forgotten all at once beyond
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class NodeCreator:
    """Parks batches of new nodes, creates the nodes under the pool-wide lock, hands back."""

    def __init__(self, client: aredis.Redis, lock_key: str, link: XmppLink, service: str,
                 access_model: str, ready: Callable[[Batch], None],
                 allowed: Callable[[], bool], name: str) -> None:
        self.redis = client
        self.lock_key = lock_key
        self.link = link
        self.service = service
        self.access_model = access_model
        self.ready = ready  # a parked batch whose node now exists (or gave up): publish it
        self.allowed = allowed
        self.name = name
        self.known: set[str] = set()  # nodes seen to exist
        self.careful_until = 0.0
        self.waiting: dict[str, Batch] = {}  # node -> its parked batch, oldest first
        self.inflight: dict[str, Batch] = {}  # create IQ id -> batch
        self.tries: dict[str, int] = {}
        self.created = 0
        self.existed = 0
        self._task: asyncio.Task[None] | None = None
        self._replied = asyncio.Event()

    def exists(self, node: str) -> None:
        """A publish to ``node`` went through."""
        if len(self.known) >= KNOWN_MAX:
            self.known.clear()
        self.known.add(node)

    def refused_missing(self, batch: Batch) -> None:
        """A publish was refused item-not-found (a concurrent auto-create aborted): create its
        node first, and be careful with unknown nodes for a while."""
        self.careful_until = time.monotonic() + CAREFUL_S
        self.known.discard(batch.node)
        self.park(batch)

    def wants(self, batch: Batch) -> bool:
        """Whether ``batch`` must wait for its node to be created (careful, node unknown)."""
        return batch.node not in self.known and time.monotonic() < self.careful_until

    def park(self, batch: Batch) -> None:
        """Hold ``batch`` until its node was created."""
        self.waiting[batch.node] = batch
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    def on_reply(self, reply: Reply) -> None:
        """The answer to one of our create IQs."""
        batch = self.inflight.pop(reply.iq_id)
        self._replied.set()
        node = batch.node
        if reply.ok or reply.condition == "conflict":  # conflict: it exists already
            self.created += reply.ok
            self.existed += not reply.ok
            self.tries.pop(node, None)
            self.exists(node)
            self.ready(batch)
            return
        tries = self.tries[node] = self.tries.get(node, 0) + 1
        if tries >= MAX_TRIES:  # not ours to solve: the publish's refusal goes to the policy
            log.warning("shard %s: creating node %s refused %d times (%s); publishing anyway",
                        self.name, node, tries, reply.reason)
            self.tries.pop(node, None)
            self.ready(batch)
        else:
            self.waiting[node] = batch

    def link_down(self) -> list[Batch]:
        """The session dropped: every parked batch goes back (sent again after reconnect)."""
        lost = [*self.inflight.values(), *self.waiting.values()]
        self.inflight.clear()
        self.waiting.clear()
        self._replied.set()  # wakes the creation task, which then ends
        return lost

    async def _run(self) -> None:
        started, created, existed = time.monotonic(), self.created, self.existed
        while (self.waiting or self.inflight) and self.link.up:  # down: link_down() took them
            if not self.allowed():  # the lease is being renewed late, or is lost: hold on
                await asyncio.sleep(LOCK_POLL_S * 10)
                continue
            token = await self._lock()
            try:
                await self._slice()
            finally:
                await self._unlock(token)
            await asyncio.sleep(0)  # others may take the lock now
        log.info("shard %s: created %d nodes (%d existed already) in %.2f s", self.name,
                 self.created - created, self.existed - existed, time.monotonic() - started)

    async def _slice(self) -> None:
        """Create IQs, ``WINDOW`` in flight, for up to SLICE_S (then wait for the replies)."""
        deadline = time.monotonic() + SLICE_S
        while (self.waiting or self.inflight) and self.link.up and self.allowed():
            while (self.waiting and len(self.inflight) < WINDOW
                   and time.monotonic() < deadline):
                node = next(iter(self.waiting))
                batch = self.waiting.pop(node)
                iq_id = self.link.new_id()
                self.inflight[iq_id] = batch
                self.link.send(create_iq(iq_id, self.service, node_attr(node.encode()),
                                         self.access_model))
            if not self.inflight:
                return
            self._replied.clear()
            await self._replied.wait()
            if time.monotonic() >= deadline and not self.inflight:
                return

    async def _lock(self) -> str | None:
        """Wait for the pool-wide creation lock; None (go without it) if Redis fails."""
        token = secrets.token_hex(8)
        while True:
            try:
                if await self.redis.set(self.lock_key, token, nx=True, px=LOCK_TTL_MS):
                    return token
            except RedisError as exc:
                log.warning("shard %s: node creation lock unavailable (%s); creating without",
                            self.name, exc)
                return None
            if not self.link.up or not self.allowed():
                return None
            await asyncio.sleep(LOCK_POLL_S)

    async def _unlock(self, token: str | None) -> None:
        if token is None:
            return
        try:
            await self.redis.eval(_RELEASE_LUA, 1, self.lock_key, token)
        except RedisError as exc:  # it expires by itself
            log.warning("shard %s: releasing the node creation lock failed: %s", self.name, exc)
