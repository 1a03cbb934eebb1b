"""One shard's work under its lease: stream → batches → pipelined publish IQs → XACK.

At-least-once and per-node order: an entry is acknowledged in Redis only after the server's
IQ result for its batch; a batch lost with the connection is re-published before anything
later of its node (one batch per node in flight, see batcher.py).

The worker wires the mechanics together and owns their life: reader.py (streams → batcher),
publisher.py (the window of publish IQs, carrying out policy.py's recovery decisions),
acks.py (XACKs and dead letters), heartbeat.py (the hash `scalepub status` reads).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence

from scalepub.connections import TRANSIENT_ERRORS, shard_client
from scalepub.settings import Settings
from scalepub.shard import metrics, streams
from scalepub.shard.acks import Acks
from scalepub.shard.batcher import Batcher, Caps
from scalepub.shard.heartbeat import Health, Heartbeat
from scalepub.shard.lease import LeaseTiming, ShardLease
from scalepub.shard.publisher import Publisher
from scalepub.shard.reader import ACK_RIDE_S, Reader
from scalepub.shard.retry import Retrier
from scalepub.shard.stats import Meters, Stats
from scalepub.sharding import Keys

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 3.0


class ShardWorker:
    """Publishes one shard's stream over one XMPP connection while it holds the shard's lease.

    ``owner`` is the lease owner (a process slot of a supervisor run, pool.py): nothing is
    read, sent or acknowledged without the lease (scalepub/shard/lease.py).
    """

    def __init__(self, settings: Settings, shard: int, owner: str,
                 on_ready: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        stream = self.keys.stream(shard)
        self._name = str(shard)
        self.stats = Stats()
        self.crashed: BaseException | None = None
        self.redis = shard_client(settings)
        self._on_ready = on_ready
        self._stop = asyncio.Event()
        self._space = asyncio.Event()
        self._draining = False
        self._background: set[asyncio.Task[None]] = set()
        self._meters = Meters(self._name)
        self.health = Health()
        self.lease = ShardLease(
            self.redis, self.keys, shard, owner,
            LeaseTiming(settings.lease_ttl_s, settings.lease_renew_s),
            on_renew_failure=metrics.LEASE_RENEW_FAILURES.labels(self._name).inc,
            on_acquired=metrics.OWNER_CHANGES.labels(self._name).inc)
        retrying = Retrier(self._name, self.redis, [stream], self._meters, self.health,
                           lambda: self._stop.is_set() and self._draining)
        self.batcher = Batcher(Caps(settings.batch_max_entries, settings.batch_max_bytes,
                                    settings.linger_ms / 1000))
        # Bytes of entries held in memory (read, not yet confirmed): bounds RSS, and how deep
        # the reader reads ahead, i.e. how big per-node batches grow under a backlog.
        max_buffer = settings.buffer_max_bytes
        self.acks = Acks(self._name, self.redis, self.keys, self.stats, self._meters,
                         self.health, retrying, self._spawn, self.lease, ride_s=ACK_RIDE_S)
        # The same XMPP resource for every owner of the shard: a new owner's login replaces
        # its predecessor's session (docs/reliability.md, fencing).
        resource = f"scalepub-{settings.key_prefix}-shard-{shard}"
        self.publisher = Publisher(
            settings, self._name, resource, self.batcher,
            self.acks, self.stats, self._meters, self.health, max_buffer=max_buffer,
            stop=self._stop, space=self._space, spawn=self._spawn, allowed=self.lease.valid)
        self.reader = Reader(self.redis, stream, shard, f"shard-{shard}", self.batcher,
                             self.acks, retrying, self.stats, self.lease, max_buffer=max_buffer,
                             stop=self._stop, space=self._space, on_taken=self.publisher.pump)
        self.heartbeat = Heartbeat(self.redis, self.keys, shard, self.stats, self.health,
                                   retrying)

    async def run(self) -> Stats:
        """Connect, publish until ``stop()``, then drain and return the counts."""
        # through Redis hiccups, like every later call
        await self.reader.retrying(
            functools.partial(streams.ensure_group, self.redis, self.reader.stream))
        if not await self.lease.acquire(self._stop):
            await self.redis.aclose()
            return self.stats
        await self.publisher.link.connect()
        log.info("shard %s: connected as %s, window %d", self._name, self.settings.xmpp_jid,
                 self.settings.window)
        if self._on_ready:
            self._on_ready()
        loops = [self.reader.loop(), self.publisher.linger_loop(), self.acks.loop(),
                 self.heartbeat.loop(), self.lease.keep(self._lease_lost)]
        tasks = [asyncio.create_task(c) for c in loops]
        for task in tasks:
            task.add_done_callback(self._loop_ended)
        await self._stop.wait()
        # Stop reading first (what was read stays pending in Redis): the reader sees the
        # flag within one blocking read; cancelling is the fallback.
        await self._bounded("reader", asyncio.shield(tasks[0]))
        tasks[0].cancel()
        await self._drain()
        await self._bounded("tasks", _cancel_all(tasks), tasks)
        await self._close()
        if self.crashed is not None:
            raise self.crashed
        return self.stats

    def stop(self) -> None:
        """Graceful stop: no new reads or publishes; confirmed entries are acked."""
        self._stop.set()
        self._space.set()  # wakes a reader waiting for buffer space

    def _lease_lost(self, reason: str) -> None:
        """Nothing more is sent or acked (the checks use the lease's own clock); stop."""
        log.warning("shard %s: lease lost (%s); stopping its work", self._name, reason)
        self.publisher.draining = True
        self.stop()

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        """A loop must only end by cancellation; a bug in one stops the shard (restarted)."""
        if task.cancelled() or self.crashed is not None:
            return
        if self._stop.is_set() and task.exception() is None:
            return  # the reader ends this way on stop
        if self._stop.is_set() and self._draining and isinstance(task.exception(),
                                                                 TRANSIENT_ERRORS):
            # The Retrier gives up on an outage once draining (retry.py): what is not done
            # stays pending for the next owner. Seen when Redis was still loading its AOF
            # after the lease ran out: not a bug, so no crash and no process restart.
            log.info("shard %s: a loop ended on a Redis outage while stopping: %s",
                     self._name, task.exception())
            return
        self.crashed = task.exception() or RuntimeError(f"{task.get_coro()} returned")
        self._meters.errors("internal").inc()
        log.error("shard %s: internal error, stopping", self._name, exc_info=self.crashed)
        self.stop()

    async def _drain(self) -> None:
        self._draining = True
        self.publisher.draining = True
        await self.publisher.wait_answered(DRAIN_TIMEOUT_S)
        if self.publisher.inflight:
            log.warning("shard %s: %d publish IQs unconfirmed at exit; their entries stay "
                        "pending and are re-published by the next run", self._name,
                        len(self.publisher.inflight))
        await self._bounded("final XACK", self.acks.flush())
        if self._background:
            await self._bounded("dead letters and reconnects",
                                asyncio.gather(*self._background, return_exceptions=True))

    async def _close(self) -> None:
        self._meters.flush()  # what the last FLUSH_S gathered
        if self.lease.valid():  # a new owner's heartbeat is not ours
            await self._bounded("heartbeat", self.heartbeat.remove())
        await self._bounded("lease release", self.lease.release())
        await self._bounded("reads' Redis connection close", self.lease.close())
        await self._bounded("XMPP close", self.publisher.link.close())
        await self._bounded("Redis close", self.redis.aclose())
        log.info("shard %s: stopped: %s", self._name, self.stats.summary())

    async def _bounded(self, what: str, step: Awaitable[object],
                       own: Sequence[asyncio.Task[None]] = ()) -> None:
        """A shutdown step that may not hold the exit up for more than a moment."""
        try:
            await asyncio.wait_for(step, CLOSE_TIMEOUT_S)
        except TimeoutError:
            stuck = [(t.get_coro(), t.get_stack(limit=3)) for t in own or asyncio.all_tasks()
                     if t is not asyncio.current_task() and not t.done()]
            log.warning("shard %s: %s took over %.0f s; exiting anyway (tasks: %s)",
                        self._name, what, CLOSE_TIMEOUT_S, stuck)
        except Exception as exc:  # shutting down: report and go on with the next step
            log.warning("shard %s: %s failed: %s", self._name, what, exc)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


async def _cancel_all(tasks: Sequence[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` until they are done: redis-py was seen to swallow a cancellation that
    arrived while a reply came in (the loop then ran on, holding a stop up for seconds)."""
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.1)

