"""One shard process's work: stream → batches → pipelined publish IQs → XACK.

At-least-once and per-node order: an entry is acknowledged in Redis only after the server's
IQ result for its batch; a batch lost with the connection is re-published before anything
later of its node (one batch per node in flight, see batcher.py).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import socket
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgpack
import redis
from prometheus_client import Counter

from scalepub.connections import shard_client
from scalepub.envelope import VERSION as ENVELOPE_VERSION
from scalepub.envelope import EnvelopeError, decode
from scalepub.nodes import InvalidNodeName, validate_node
from scalepub.settings import Settings
from scalepub.shard import metrics, streams
from scalepub.shard.batcher import Batcher, Caps
from scalepub.sharding import ENTRY_FIELD, Keys
from scalepub.xmpp.batch import Batch, Entry, entry_part, publish_iq, well_formed
from scalepub.xmpp.link import Reply, XmppAuthError, XmppLink, XmppUnreachable

log = logging.getLogger(__name__)
T = TypeVar("T")

READ_COUNT = 5000
READ_BLOCK_MS = 100
DRAIN_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 3.0
HEARTBEAT_INTERVAL_S = 2.0  # the key lives 5 intervals: `scalepub status` calls it dead after
# A batch in flight at this many connection losses is split; a single entry is dead-lettered.
SPLIT_AFTER_RESENDS = 2
DEAD_AFTER_RESENDS = 5
_REDIS_RETRY_FIRST_S = 0.1
_REDIS_RETRY_MAX_S = 2.0
_RETRY_WARN_EVERY_S = 10.0
# An XMPP reconnect costs a TLS handshake and a SASL login: back off further than for Redis.
_RECONNECT_MAX_S = 5.0
TRANSIENT_CONDITIONS = frozenset({
    "internal-server-error", "resource-constraint", "remote-server-timeout",
    "service-unavailable", "recipient-unavailable",
    # ejabberd answers item-not-found when two connections auto-create nodes at once and
    # its mnesia transaction aborts; the retry finds the node.
    "item-not-found",
})
# After this many transient refusals a batch is treated as refused for its content.
MAX_TRANSIENT_RETRIES = 8


@dataclass
class Stats:
    """What a shard did; printed on exit and read by tests and metrics."""

    published: int = 0
    iqs: int = 0
    dead_lettered: int = 0
    retries: int = 0
    splits: int = 0
    reconnects: int = 0
    trimmed: int = 0  # pending ids whose entries MAXLEN had already removed
    started: float = field(default_factory=time.monotonic)

    def summary(self) -> str:
        """One log line."""
        rate = self.published / max(time.monotonic() - self.started, 1e-9)
        return (f"published={self.published} iqs={self.iqs} dead_lettered={self.dead_lettered} "
                f"retries={self.retries} splits={self.splits} reconnects={self.reconnects} "
                f"trimmed={self.trimmed} rate={rate:.0f}/s")


class ShardWorker:
    """Publishes the streams of ``shards`` over one XMPP connection until stopped."""

    def __init__(self, settings: Settings, shards: Sequence[int], consumer: str,
                 on_ready: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.shard_of = {self.keys.stream(s): s for s in shards}
        self.consumer = consumer
        self.batcher = Batcher(Caps(settings.batch_max_entries, settings.batch_max_bytes,
                                    settings.linger_ms / 1000))
        # Entries held in memory (read, not yet confirmed): bounds RSS (~1 kB an entry).
        self.max_buffer = settings.window * settings.batch_max_entries * 2
        self.inflight: dict[str, Batch] = {}
        self.stats = Stats()
        self.redis = shard_client(settings)
        resource = f"scalepub-{socket.gethostname()}-{consumer}"
        self.link = XmppLink(settings, resource, self.inflight.__contains__, self._on_reply,
                             self._on_down)
        self._ids = (f"sp{os.getpid()}-{n}" for n in itertools.count())
        self._acks: dict[int, list[bytes]] = defaultdict(list)
        self._ack_wakeup = asyncio.Event()
        self._space = asyncio.Event()
        self._stop = asyncio.Event()
        self._draining = False
        self._background: set[asyncio.Task[None]] = set()
        self._valid_nodes: set[str] = set()
        self._last_taken: dict[str, bytes] = {}  # stream → newest id read from it
        self._reread = False
        self._on_ready = on_ready
        self.crashed: BaseException | None = None
        self._m = _Meters(self._name)
        self._last_publish = 0.0

    # -- lifecycle -----------------------------------------------------------------------

    async def run(self) -> Stats:
        """Connect, publish until ``stop()``, then drain and return the counts."""
        for key in self.shard_of:
            await streams.ensure_group(self.redis, key)
        await self.link.connect()
        log.info("shard %s: connected as %s, window %d", self._name, self.settings.xmpp_jid,
                 self.settings.window)
        if self._on_ready:
            self._on_ready()
        tasks = [asyncio.create_task(c) for c in
                 (self._read_loop(), self._linger_loop(), self._ack_loop(),
                  self._heartbeat_loop())]
        for task in tasks:
            task.add_done_callback(self._loop_ended)
        await self._stop.wait()
        # Stop reading first (what was read stays pending in Redis): the reader sees the
        # flag within one blocking read; cancelling is the fallback.
        await self._bounded("reader", asyncio.shield(tasks[0]))
        tasks[0].cancel()
        await self._drain()
        for task in tasks[1:]:
            task.cancel()
        await self._bounded("tasks", asyncio.gather(*tasks, return_exceptions=True))
        await self._bounded("heartbeat", self.redis.delete(
            *(self.keys.heartbeat(s) for s in self.shard_of.values())))
        await self._bounded("XMPP close", self.link.close())
        await self._bounded("Redis close", self.redis.aclose())
        log.info("shard %s: stopped: %s", self._name, self.stats.summary())
        if self.crashed is not None:
            raise self.crashed
        return self.stats

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        """A loop must only end by cancellation; a bug in one stops the shard (restarted)."""
        if task.cancelled() or self.crashed is not None:
            return
        if self._stop.is_set() and task.exception() is None:
            return  # the reader ends this way on stop
        self.crashed = task.exception() or RuntimeError(f"{task.get_coro()} returned")
        self._m.errors("internal").inc()
        log.error("shard %s: internal error, stopping", self._name, exc_info=self.crashed)
        self.stop()

    async def _bounded(self, what: str, step: Awaitable[object]) -> None:
        """A shutdown step that may not hold the exit up for more than a moment."""
        try:
            await asyncio.wait_for(step, CLOSE_TIMEOUT_S)
        except TimeoutError:
            stuck = [t.get_stack(limit=3) for t in asyncio.all_tasks()
                     if t is not asyncio.current_task()]
            log.warning("shard %s: %s took over %.0f s; exiting anyway (tasks: %s)",
                        self._name, what, CLOSE_TIMEOUT_S, stuck)
        except Exception as exc:  # shutting down: report and go on with the next step
            log.warning("shard %s: %s failed: %s", self._name, what, exc)

    def stop(self) -> None:
        """Graceful stop: no new reads or publishes; confirmed entries are acked."""
        self._stop.set()
        self._space.set()  # wakes a reader waiting for buffer space

    async def _drain(self) -> None:
        self._draining = True
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while self.inflight and self.link.up and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self.inflight:
            log.warning("shard %s: %d publish IQs unconfirmed at exit; their entries stay "
                        "pending and are re-published by the next run", self._name,
                        len(self.inflight))
        await self._bounded("final XACK", self._flush_acks())
        if self._background:
            await self._bounded("dead letters and reconnects",
                                asyncio.gather(*self._background, return_exceptions=True))

    @property
    def _name(self) -> str:
        return ",".join(str(s) for s in self.shard_of.values())

    # -- reading -------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        # Ends by the stop flag, not by cancellation: a cancelled blocking XREADGROUP was
        # seen to swallow the cancellation in redis-py and leave the loop retrying for ever.
        for key, shard in self.shard_of.items():
            await self._retrying(functools.partial(self._claim, key, shard))
        while not self._stop.is_set():
            await self._wait_for_space()
            if self._stop.is_set():
                return
            replies = await self._retrying(self._read_new)
            now = time.monotonic()
            for stream, entries in replies or []:
                self._take_all(stream.decode(), entries, now)
            self._pump()

    async def _read_new(self) -> list[tuple[bytes, streams.StreamEntries]]:
        if self._reread:  # the last read failed: its reply may be lost, its entries pending
            replies = await streams.read_own_pending(
                self.redis, {k: self._last_taken.get(k, b"0-0") for k in self.shard_of},
                self.consumer, READ_COUNT)
            if any(entries for _, entries in replies):
                return replies
            self._reread = False
        self._reread = True  # until the reply is in hand
        replies = await streams.read_new(self.redis, list(self.shard_of), self.consumer,
                                         READ_COUNT, READ_BLOCK_MS)
        self._reread = False
        return replies

    def _take_all(self, key: str, entries: streams.StreamEntries, now: float) -> None:
        shard = self.shard_of[key]
        for sid, fields in entries:
            self._take(shard, sid, fields, now)
        if entries:  # ascending: the newest id this worker has seen of the stream
            self._last_taken[key] = entries[-1][0]

    async def _claim(self, key: str, shard: int) -> None:
        """Entries a dead predecessor read but never got confirmed: they go first."""
        cursor = b"0-0"
        while not self._stop.is_set():
            await self._wait_for_space()
            cursor, entries, trimmed = await streams.claim_pending(
                self.redis, key, self.consumer, cursor, READ_COUNT)
            self.stats.trimmed += trimmed
            self._take_all(key, entries, time.monotonic())
            self._pump()
            if cursor in (b"0-0", "0-0"):
                break
        if self.stats.trimmed:
            log.error("shard %s: %d pending entries had been trimmed by MAXLEN before they "
                      "were published (lost)", shard, self.stats.trimmed)

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        delay = _REDIS_RETRY_FIRST_S
        warned = -_RETRY_WARN_EVERY_S
        while True:
            try:
                return await call()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if self._stop.is_set() and self._draining:
                    raise  # stopping: what is not done stays pending, nothing is lost
                self._m.errors("redis").inc()
                # several loops retry, each every ≤ 2 s: a WARNING at most every 10 s each
                now = time.monotonic()
                quiet = now - warned < _RETRY_WARN_EVERY_S
                warned = warned if quiet else now
                log.log(logging.DEBUG if quiet else logging.WARNING,
                        "shard %s: Redis unavailable (%s), retrying in %.1f s",
                        self._name, exc, delay)
            except redis.ResponseError as exc:
                if not str(exc).startswith(("NOGROUP", "UNBLOCKED")):
                    raise
                # The stream or its group was deleted (or Redis restarted without its data).
                log.warning("shard %s: %s; re-creating the consumer group", self._name, exc)
                for key in self.shard_of:
                    await streams.ensure_group(self.redis, key)
            await asyncio.sleep(delay)
            # capped low: recovery after an outage waits for the next try, and a try is cheap
            delay = min(delay * 2, _REDIS_RETRY_MAX_S)

    async def _wait_for_space(self) -> None:
        while self.batcher.buffered >= self.max_buffer and not self._stop.is_set():
            self._space.clear()
            await self._space.wait()

    def _take(self, shard: int, sid: bytes, fields: list[bytes] | None, now: float) -> None:
        """Decode one raw stream entry (``[b"e", envelope]``) into the batcher."""
        if fields is None:  # trimmed by MAXLEN after it was delivered: nothing to publish
            self.stats.trimmed += 1
            self._acks[shard].append(sid)
            return
        raw = fields[1] if len(fields) == 2 and fields[0] == ENTRY_FIELD else b""
        try:
            entry = self._entry(sid, raw)
        except (EnvelopeError, InvalidNodeName) as exc:
            self._dead_letter(shard, sid, raw, f"unreadable entry: {exc}")
            return
        if not self.batcher.add(entry, shard, now):
            self._dead_letter(shard, sid, raw, "entry larger than batch_max_bytes "
                              f"({self.settings.batch_max_bytes} B)")

    def _entry(self, sid: bytes, raw: bytes) -> Entry:
        # The hot path (a few us an entry): msgpack with bytes keys and values straight into
        # the entry's XML; anything unexpected goes through envelope.decode() for a precise
        # error. Field names: scalepub.envelope.
        try:
            d = msgpack.unpackb(raw, raw=True)
            node, payload = d[b"node"].decode(), d[b"payload"]
            part = entry_part(node=d[b"node"], seq=d[b"seq"], stream_id=sid, ts_ns=d[b"ts"],
                              model=d[b"model"], pk=d[b"pk"], fmt=d[b"fmt"], payload=payload)
            ok = d[b"v"] == ENVELOPE_VERSION
        except Exception:
            ok = False
        if not ok:
            decode(raw)  # raises EnvelopeError saying what is wrong
            raise EnvelopeError("malformed envelope")
        if node not in self._valid_nodes:
            self._valid_nodes.add(validate_node(node))
        try:
            payload.decode("utf-8")  # invalid UTF-8 would break the XMPP stream
        except UnicodeDecodeError as exc:
            raise EnvelopeError(f"payload is not UTF-8: {exc}") from None
        return Entry(sid, node, d[b"seq"], d[b"ts"], part, raw)

    async def _linger_loop(self) -> None:
        """Publish open batches whose linger ran out while nothing else woke the pump."""
        linger = self.settings.linger_ms / 1000
        while True:
            self._pump()
            due = self.batcher.next_due()
            wait = linger if due is None else due - time.monotonic()
            await asyncio.sleep(min(max(wait, 0.001), max(linger, 0.001)))

    # -- publishing ----------------------------------------------------------------------

    def _pump(self) -> None:
        """Fill the window with ready batches."""
        while (self.link.up and not self._draining
               and len(self.inflight) < self.settings.window):
            batch = self.batcher.next_batch(time.monotonic())
            if batch is None:
                return
            if batch.resends and not self._screen(batch):
                continue
            iq_id = next(self._ids)
            self.inflight[iq_id] = batch
            batch.sent_at = time.monotonic()
            self.link.send(publish_iq(iq_id, self.settings.pubsub_service, batch,
                                     self.link.publish_options))
            self._m.inflight.set(len(self.inflight))

    def _screen(self, batch: Batch) -> bool:
        """A batch that was in flight when the link dropped may be what broke it.

        Returns True if it can be sent as is; otherwise it was split, trimmed or
        dead-lettered and handed back to the batcher.
        """
        bad = [(e, why) for e in batch.entries if (why := well_formed(e))]
        for entry, why in bad:
            self._dead_letter(batch.shard, entry.stream_id, entry.raw, why)
        if bad:
            bad_ids = {id(e) for e, _ in bad}
            self.batcher.forget(len(bad))
            return self._rebuild(batch, [e for e in batch.entries if id(e) not in bad_ids])
        if len(batch.entries) == 1 and batch.resends >= DEAD_AFTER_RESENDS:
            [entry] = batch.entries
            self._dead_letter(batch.shard, entry.stream_id, entry.raw,
                              f"connection lost {batch.resends} times while publishing it")
            self.batcher.forget(1)
            self.batcher.release(batch.node)
            return False
        if len(batch.entries) > 1 and batch.resends >= SPLIT_AFTER_RESENDS:
            self.stats.splits += 1
            first, second = batch.split()
            first.resends = second.resends = batch.resends - 1
            self.batcher.retry(first, second)
            return False
        return True

    def _rebuild(self, batch: Batch, good: list[Entry]) -> bool:
        if not good:
            self.batcher.release(batch.node)
            return False
        fresh = Batch(batch.node, batch.shard)
        for entry in good:
            fresh.add(entry)
        self.batcher.retry(fresh)
        return False

    def _on_reply(self, reply: Reply) -> None:
        batch = self.inflight.pop(reply.iq_id)
        self._m.inflight.set(len(self.inflight))
        if reply.ok:
            self._confirmed(batch)
        else:
            self._refused(batch, reply)
        self._pump()

    def _confirmed(self, batch: Batch) -> None:
        self._acks[batch.shard].extend(e.stream_id for e in batch.entries)
        self._ack_wakeup.set()
        self.batcher.done(batch)
        self.stats.published += len(batch.entries)
        self.stats.iqs += 1
        now_ns = time.time_ns()
        self._m.confirmed(batch, now_ns)
        self._last_publish = now_ns / 1e9
        if self.batcher.buffered < self.max_buffer:
            self._space.set()

    def _refused(self, batch: Batch, reply: Reply) -> None:
        transient = reply.error_type == "wait" or reply.condition in TRANSIENT_CONDITIONS
        self._m.errors("xmpp_refused").inc()
        if (transient and batch.retries < MAX_TRANSIENT_RETRIES) or reply.error_type == "auth":
            self.stats.retries += 1
            self._m.retries.inc()
            batch.retries += 1
            delay = min(0.05 * 2 ** batch.retries, 5.0) if transient else 5.0
            log.warning("shard %s: publish to %s refused (%s), retrying in %.1f s",
                        self._name, batch.node, reply.reason, delay)
            asyncio.get_running_loop().call_later(delay, self._requeue, batch)
        elif len(batch.entries) > 1:
            self.stats.splits += 1
            log.warning("shard %s: batch %s of %s refused (%s); splitting it to find the "
                        "entry at fault", self._name, batch.item_id, batch.node, reply.reason)
            self.batcher.retry(*batch.split())
        else:
            [entry] = batch.entries
            self._dead_letter(batch.shard, entry.stream_id, entry.raw,
                              f"refused by the XMPP server: {reply.reason}")
            self.batcher.done(batch)

    def _requeue(self, batch: Batch) -> None:
        self.batcher.retry(batch)
        self._pump()

    def _on_down(self) -> None:
        lost = list(self.inflight.values())
        self.inflight.clear()
        for batch in lost:
            batch.resends += 1
        self.batcher.retry(*lost)
        self.stats.reconnects += 1
        self._m.reconnects.inc()
        self._m.errors("connection_lost").inc()
        self._m.inflight.set(0)
        log.warning("shard %s: XMPP connection lost with %d IQs in flight; reconnecting",
                    self._name, len(lost))
        if not self._stop.is_set():
            self._spawn(self._reconnect())

    async def _reconnect(self) -> None:
        delay = 0.2
        while not self._stop.is_set():
            try:
                await self.link.connect()
                log.info("shard %s: reconnected", self._name)
                self._pump()
                return
            except (XmppUnreachable, XmppAuthError) as exc:
                log.warning("shard %s: reconnect failed (%s); next try in %.1f s",
                            self._name, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RECONNECT_MAX_S)

    # -- health ----------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        """Keep ``{prefix}:{N}:alive`` fresh: what `scalepub status` reads."""
        last_count, last_time = self.stats.published, time.monotonic()
        while True:
            now = time.monotonic()
            rate = (self.stats.published - last_count) / max(now - last_time, 1e-9)
            last_count, last_time = self.stats.published, now
            await self._retrying(functools.partial(self._beat, rate))
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    async def _beat(self, rate: float) -> None:
        fields: dict[Any, Any] = {
            "pid": os.getpid(), "host": socket.gethostname(), "updated": time.time(),
            "published": self.stats.published, "rate": round(rate, 1),
            "last_publish": self._last_publish, "dead_lettered": self.stats.dead_lettered,
        }
        async with self.redis.pipeline(transaction=False) as pipe:
            for shard in self.shard_of.values():
                key = self.keys.heartbeat(shard)
                pipe.hset(key, mapping=fields)
                pipe.expire(key, int(HEARTBEAT_INTERVAL_S * 5))
            await pipe.execute()

    # -- acks and dead letters -----------------------------------------------------------

    async def _ack_loop(self) -> None:
        while True:
            await self._ack_wakeup.wait()
            self._ack_wakeup.clear()
            await self._flush_acks()

    async def _flush_acks(self) -> None:
        acks, self._acks = self._acks, defaultdict(list)
        if not acks:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for shard, ids in acks.items():
                    streams.queue_acks(pipe, self.keys.stream(shard), ids)
                await pipe.execute()
        except redis.RedisError as exc:
            # Unacked entries are re-published after a restart: duplicates, never losses.
            log.warning("shard %s: XACK failed (%s); will retry", self._name, exc)
            for shard, ids in acks.items():
                self._acks[shard][:0] = ids
            await asyncio.sleep(0.5)
            self._ack_wakeup.set()

    def _dead_letter(self, shard: int, sid: bytes, raw: bytes, reason: str) -> None:
        self.stats.dead_lettered += 1
        self._m.dead_letter(shard)
        log.error("shard %d: entry %s dead-lettered: %s", shard, sid.decode(), reason)
        self._spawn(self._retrying(lambda: streams.dead_letter(
            self.redis, self.keys, shard, stream_id=sid, envelope=raw, reason=reason)))

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


class _Meters:
    """The Prometheus children of one shard process.

    Per-batch figures carry the stream shard of the batch (they line up with the lag and
    pending gauges); connection figures carry the process's shards, comma-joined (the same
    single number with the default one process per shard).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.rtt = metrics.RTT.labels(name)
        self.inflight = metrics.INFLIGHT.labels(name)
        self.reconnects = metrics.RECONNECTS.labels(name)
        self.retries = metrics.RETRIES.labels(name)

    def errors(self, kind: str) -> Counter:
        """The error counter of ``kind``."""
        return metrics.ERRORS.labels(self.name, kind)

    def dead_letter(self, shard: int) -> None:
        """One entry of ``shard`` dead-lettered."""
        metrics.DEAD_LETTERS.labels(str(shard)).inc()

    def confirmed(self, batch: Batch, now_ns: int) -> None:
        """A batch the server confirmed (per batch, never per entry: a few us an IQ)."""
        shard = str(batch.shard)
        metrics.PUBLISHED.labels(shard).inc(len(batch.entries))
        metrics.IQS.labels(shard).inc()
        self.rtt.observe(time.monotonic() - batch.sent_at)
        metrics.BATCH_ENTRIES.labels(shard).observe(len(batch.entries))
        metrics.BATCH_BYTES.labels(shard).observe(batch.size)
        metrics.E2E_LATENCY.labels(shard).observe((now_ns - batch.entries[0].ts_ns) / 1e9)
        metrics.LAST_PUBLISH.labels(shard).set(now_ns / 1e9)
