"""Reading a shard's streams into the batcher: claimed entries first, then new ones.

Entries are decoded through scalepub.envelope and their ``<entry>`` XML completed here
(node, seq and stream id spliced in front of what the producer stored), once; an entry
that cannot be published goes to the dead-letter stream at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import redis.asyncio as aredis

from scalepub.envelope import EnvelopeError, decode_wire
from scalepub.nodes import InvalidNodeName, validate_node
from scalepub.shard import streams
from scalepub.shard.acks import Acks
from scalepub.shard.batcher import Batcher
from scalepub.shard.lease import ShardLease
from scalepub.shard.policy import Failure, History, decide
from scalepub.shard.retry import Retrier
from scalepub.shard.stats import Stats
from scalepub.sharding import ENTRY_FIELD
from scalepub.xmpp.batch import Entry, entry_from_tail

log = logging.getLogger(__name__)

# Entries per XREADGROUP. Not more: a reply this size is parsed at once (~1.5 kB an entry
# while it is in hand), which a 5,000-entry read made ~5 MB of each shard's peak RSS.
READ_COUNT = 2000
READ_BLOCK_MS = 100
# A quiet shard's wait (its last wait found nothing): an entry ends it at once, so it costs no
# latency; 10 wake-ups a second of each idle shard were most of an idle pool's CPU
# (bench_pool_cpu --idle). A graceful stop waits for it to end (the reader stops between reads).
QUIET_BLOCK_MS = 500
# Acks wait this long for the next read to carry them (acks.Ride): past one blocking wait.
ACK_RIDE_S = READ_BLOCK_MS / 1000 + 0.05
# Validated node names kept (raw bytes → name); forgotten all at once beyond this many.
NODE_CACHE_MAX = 100_000


def build_entry(sid: bytes, raw: bytes, nodes: dict[bytes, str]) -> Entry:
    """The entry of envelope ``raw``; raise EnvelopeError or InvalidNodeName if it has none.

    The hot path (~1 us an entry): a version 2 envelope holds the entry's XML but for node,
    seq and stream id, which are spliced in front; each node name is validated once
    (``nodes`` caches it).
    """
    node_bytes, seq, ts_ns, tail = decode_wire(raw)
    node = nodes.get(node_bytes)
    if node is None:
        node = validate_node(node_bytes.decode())  # decode_wire checked the UTF-8
        if len(nodes) >= NODE_CACHE_MAX:
            nodes.clear()
        nodes[node_bytes] = node
    part = entry_from_tail(node_bytes, seq, sid, tail)
    return Entry(sid, node, seq, ts_ns, part)  # raw not kept: read back for a dead letter


class Reader:
    """Feeds the batcher from the stream of the worker's shard, within the buffer bound."""

    def __init__(self, client: aredis.Redis, stream: str, shard: int, consumer: str,
                 batcher: Batcher, acks: Acks, retrying: Retrier, stats: Stats,
                 lease: ShardLease, *,
                 max_buffer: int, stop: asyncio.Event, space: asyncio.Event,
                 on_taken: Callable[[], None]) -> None:
        self.redis = client
        self.stream, self.shard = stream, shard
        self.consumer = consumer
        self.batcher = batcher
        self.acks = acks
        self.retrying = retrying
        self.stats = stats
        self.max_buffer = max_buffer  # bytes held in memory (read, not yet confirmed)
        self.stop = stop
        self.space = space  # set when the buffer has room again, and on stop
        self.on_taken = on_taken  # the publisher's pump
        self.byte_cap = batcher.caps.max_bytes
        self._nodes: dict[bytes, str] = {}
        self._last_taken = b"0-0"  # the newest id read from the stream
        self._reread = False
        # Checked before each read, and the read itself is fenced: without the shard's lease
        # nothing more is taken from the group; what was read stays pending for the next owner.
        self.lease = lease

    async def loop(self) -> None:
        """Claim what a predecessor left pending, then read new entries until stopped."""
        # Ends by the stop flag, not by cancellation: a cancelled blocking XREADGROUP was
        # seen to swallow the cancellation in redis-py and leave the loop retrying for ever.
        await self.retrying(self._claim)
        while not self.stop.is_set():
            await self._wait_for_space()
            if self.stop.is_set():
                return
            replies = await self.retrying(self._read_new)
            now = time.monotonic()
            for _, entries in replies or []:  # the one stream's
                self._take_all(entries, now)
            # A full read with room left: a backlog, read deeper before open batches go.
            self.batcher.reading_ahead = (
                any(len(e) >= READ_COUNT for _, e in replies or [])
                and self.batcher.held_bytes < self.max_buffer)
            self.on_taken()

    async def _read_new(self) -> list[tuple[bytes, streams.StreamEntries]]:
        if not self.lease.valid():
            await asyncio.sleep(0.05)
            return []
        if self._reread:  # the last read failed: its reply may be lost, its entries pending
            replies = await streams.read_own_pending(
                self.redis, {self.stream: self._last_taken}, self.consumer, READ_COUNT)
            if any(entries for _, entries in replies):
                return replies
            self._reread = False
        self._reread = True  # until the reply is in hand
        # The acks gathered so far ride on the read: one round trip for both.
        replies = await self.lease.read_new(self.redis, [self.stream], self.consumer,
                                            READ_COUNT, READ_BLOCK_MS,
                                            self.acks.ride(self.shard),
                                            quiet_block_ms=QUIET_BLOCK_MS)
        self._reread = False
        return replies

    async def _claim(self) -> None:
        """Entries a dead predecessor read but never got confirmed: they go first."""
        cursor = b"0-0"
        while not self.stop.is_set():
            await self._wait_for_space()
            cursor, entries, trimmed = await streams.claim_pending(
                self.redis, self.stream, self.consumer, cursor, READ_COUNT)
            self.stats.trimmed += trimmed
            self._take_all(entries, time.monotonic())
            self.on_taken()
            if cursor in (b"0-0", "0-0"):
                break
        if self.stats.trimmed:
            log.error("shard %s: %d pending entries had been trimmed by MAXLEN before they "
                      "were published (lost)", self.shard, self.stats.trimmed)

    async def _wait_for_space(self) -> None:
        while self.batcher.held_bytes >= self.max_buffer and not self.stop.is_set():
            self.space.clear()
            await self.space.wait()

    def _take_all(self, entries: streams.StreamEntries, now: float) -> None:
        for sid, fields in entries:
            self._take(self.shard, sid, fields, now)
        if entries:  # ascending: the newest id this worker has seen of the stream
            self._last_taken = entries[-1][0]

    def _take(self, shard: int, sid: bytes, fields: list[bytes] | None, now: float) -> None:
        """Decode one raw stream entry (``[b"e", envelope]``) into the batcher."""
        if fields is None:  # trimmed by MAXLEN after it was delivered: nothing to publish
            self.stats.trimmed += 1
            self.acks.add(shard, [sid])
            return
        raw = fields[1] if len(fields) == 2 and fields[0] == ENTRY_FIELD else b""
        try:
            entry = build_entry(sid, raw, self._nodes)
        except (EnvelopeError, InvalidNodeName) as exc:
            self._reject(shard, sid, raw, Failure.UNREADABLE_ENTRY, str(exc))
            return
        if not self.batcher.add(entry, shard, now):
            self._reject(shard, sid, raw, Failure.TOO_LARGE, f"{self.byte_cap} B")

    def _reject(self, shard: int, sid: bytes, raw: bytes, failure: Failure, detail: str) -> None:
        # One entry alone: the policy dead-letters it (tests/test_policy.py).
        decision = decide(failure, History(entries=1), detail)
        self.acks.dead_letter(shard, sid, raw, decision.reason)
