"""The publishing window: batches out as publish IQs, the server's answers applied.

What to do when a batch fails is the recovery policy's decision (policy.py); this module
carries it out: re-send, retry later, split, or dead-letter, keeping one batch per node in
flight so per-node order holds (batcher.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from scalepub.settings import Settings
from scalepub.shard import streams
from scalepub.shard.acks import Acks, Spawn
from scalepub.shard.batcher import Batcher
from scalepub.shard.creator import NodeCreator
from scalepub.shard.heartbeat import Health
from scalepub.shard.policy import (
    RECONNECT_FIRST_S,
    RECONNECT_MAX_S,
    Action,
    Decision,
    Failure,
    History,
    backoff,
    classify,
    decide,
)
from scalepub.shard.stats import Meters, Stats
from scalepub.xmpp.batch import Batch, Entry, publish_iq, well_formed
from scalepub.xmpp.link import Reply, XmppAuthError, XmppLink, XmppUnreachable

log = logging.getLogger(__name__)

# While the lease is not valid, the window is looked at again this often.
REPUMP_S = 0.1


def history(batch: Batch) -> History:
    """What the policy needs to know of ``batch``."""
    return History(len(batch.entries), batch.resends, batch.retries)


class Publisher:
    """One XMPP link with a window of publish IQs in flight."""

    def __init__(self, settings: Settings, name: str, resource: str, batcher: Batcher,
                 acks: Acks, stats: Stats, meters: Meters, health: Health, *,
                 max_buffer: int, stop: asyncio.Event, space: asyncio.Event,
                 spawn: Spawn, allowed: Callable[[], bool]) -> None:
        self.settings = settings
        self.name = name
        self.batcher = batcher
        self.acks = acks
        self.stats = stats
        self.meters = meters
        self.health = health
        self.max_buffer = max_buffer
        self.stop = stop
        self.space = space  # set when confirmations made room in the buffer
        self.spawn = spawn
        self.inflight: dict[str, Batch] = {}
        self.draining = False  # stopping: nothing more is sent
        self._repump: asyncio.TimerHandle | None = None
        # Checked right before each send and reconnect: the shard's lease (worker.py).
        self.allowed = allowed
        self.link = XmppLink(settings, resource, self._awaits, self._on_reply,
                             self._on_down, meters.ignored)
        self.creator = NodeCreator(acks.redis, acks.keys.node_creation, self.link,
                                   settings.pubsub_service, settings.node_access_model,
                                   self._created, allowed, name)

    def _awaits(self, iq_id: str) -> bool:
        """Whether ``iq_id`` is one of ours in flight: a publish, or a node creation."""
        return iq_id in self.inflight or iq_id in self.creator.inflight

    async def linger_loop(self) -> None:
        """With a linger set, publish open batches whose linger ran out meanwhile.

        Without one (the default) nothing is timed: open batches go when the reader hands
        entries over with nothing in flight, or when a reply frees the window (``pump``).
        """
        linger = self.settings.linger_ms / 1000
        if linger <= 0:
            await asyncio.get_running_loop().create_future()  # until cancelled
        while True:
            self.pump()
            due = self.batcher.next_due()
            wait = linger if due is None else due - time.monotonic()
            await asyncio.sleep(min(max(wait, 0.001), linger))

    def pump(self, replied: bool = False) -> None:
        """Fill the window with ready batches.

        Open (not full) batches go only if nothing is in flight or a reply just came
        (``replied``): while the server works, entries accumulate into bigger batches and
        are sent together when a reply frees the window, like TCP_CORK, paced by replies.
        While the reader reads ahead into a backlog they wait for it to fill the buffer (or
        catch up): each node's batch then holds what memory allows, not what one read brought.
        """
        open_ok = not self.batcher.reading_ahead and (replied or not self.inflight)
        while (self.link.up and not self.draining
               and len(self.inflight) < self.settings.window):
            if not self.allowed():
                self._pump_later()
                return
            batch = self.batcher.next_batch(time.monotonic(), open_ok)
            if batch is None:
                return
            if batch.resends and not self._screen(batch):
                continue
            if self.creator.wants(batch):  # a burst of new nodes: created first
                self.creator.park(batch)
                continue
            iq_id = self.link.new_id()  # unguessable; the link also checks who answers
            self.inflight[iq_id] = batch
            batch.sent_at = time.monotonic()
            self.meters.sent(batch)
            self.link.send(publish_iq(iq_id, self.settings.pubsub_service, batch,
                                      self.link.publish_options))
            self.meters.in_flight(len(self.inflight))

    def _pump_later(self) -> None:
        """Pump again shortly: the lease may be valid again after a late renewal, and with
        the reader waiting for buffer space and nothing in flight, nothing else would (a
        shard was seen holding 12,000 entries, publishing none, on a box at load 30)."""
        if not self._repump:
            self._repump = asyncio.get_running_loop().call_later(REPUMP_S, self._pump_again)

    def _pump_again(self) -> None:
        self._repump = None
        self.pump()

    async def wait_answered(self, timeout: float) -> None:
        """Until every IQ in flight is answered, the link is down, or ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        while self.inflight and self.link.up and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    def _screen(self, batch: Batch) -> bool:
        """A batch that was in flight when the link dropped may be what broke it.

        Returns True if it can be sent as is; otherwise it was split, trimmed or
        dead-lettered and handed back to the batcher.
        """
        bad = [(e, why) for e in batch.entries if (why := well_formed(e))]
        if bad:
            for entry, why in bad:
                reason = decide(Failure.NOT_WELL_FORMED, History(entries=1), why).reason
                self._dead_letter(batch.shard, entry, reason)
            self.batcher.forget([e for e, _ in bad])
            bad_ids = {id(e) for e, _ in bad}
            self._rebuild(batch, [e for e in batch.entries if id(e) not in bad_ids])
            return False
        decision = decide(Failure.CONNECTION_LOST, history(batch))
        if decision.action is Action.SEND:
            return True
        self._apply(batch, decision)
        return False

    def _rebuild(self, batch: Batch, good: list[Entry]) -> None:
        if not good:
            self.batcher.release(batch.node)
            return
        fresh = Batch(batch.node, batch.shard, read_at=batch.read_at)
        for entry in good:
            fresh.add(entry)
        self.batcher.retry(fresh)

    def _on_reply(self, reply: Reply) -> None:
        batch = self.inflight.pop(reply.iq_id, None)
        if batch is None:
            self.creator.on_reply(reply)
            self.pump(replied=True)
            return
        self.meters.in_flight(len(self.inflight))
        if reply.ok:
            self._confirmed(batch)
        else:
            self._refused(batch, reply)
        self.pump(replied=True)

    def _confirmed(self, batch: Batch) -> None:
        self.acks.add(batch.shard, (e.stream_id for e in batch.entries))
        self.batcher.done(batch)
        self.health.passed(batch.node)
        self.creator.exists(batch.node)
        self.stats.published += len(batch.entries)
        self.stats.iqs += 1
        now_ns = time.time_ns()
        self.meters.confirmed(batch, now_ns)
        self.stats.last_publish = now_ns / 1e9
        if self.batcher.held_bytes < self.max_buffer:
            self.space.set()

    def _refused(self, batch: Batch, reply: Reply) -> None:
        self.meters.errors("xmpp_refused").inc()
        decision = decide(classify(reply.error_type, reply.condition), history(batch),
                          reply.reason)
        if decision.action is Action.CREATE_NODE:
            # Most likely its auto-creation aborted (creator.py): create it, then publish.
            batch.retries += 1
            self.stats.retries += 1
            self.meters.retries.inc()
            self.creator.refused_missing(batch)
            return
        if decision.action is Action.RETRY:
            self.health.refused(batch.node, reply.error_type, reply.condition)
            log.warning("shard %s: publish to %s refused (%s), retrying in %.1f s",
                        self.name, batch.node, reply.reason, decision.delay_s)
        elif decision.action is Action.SPLIT:
            log.warning("shard %s: batch %s of %s refused (%s); splitting it to find the "
                        "entry at fault", self.name, batch.item_id, batch.node, reply.reason)
        self._apply(batch, decision)

    def _apply(self, batch: Batch, decision: Decision) -> None:
        """Carry out a RETRY, SPLIT or DEAD_LETTER decision for ``batch``."""
        if decision.action is Action.RETRY:
            self.stats.retries += 1
            self.meters.retries.inc()
            batch.retries += 1
            asyncio.get_running_loop().call_later(decision.delay_s, self._requeue, batch)
        elif decision.action is Action.SPLIT:
            self.stats.splits += 1
            first, second = batch.split()
            first.resends = second.resends = decision.resends
            self.batcher.retry(first, second)
        elif decision.action is Action.DEAD_LETTER:
            [entry] = batch.entries
            self._dead_letter(batch.shard, entry, decision.reason)
            self.batcher.done(batch)
            self.health.passed(batch.node)

    def _dead_letter(self, shard: int, entry: Entry, reason: str) -> None:
        """Dead-letter ``entry`` with its envelope, read back from the stream: the shard does
        not keep envelopes in memory (a third of an entry's size, for this rare path)."""
        if entry.raw:
            self.acks.dead_letter(shard, entry.stream_id, entry.raw, reason)
            return

        async def read_back() -> None:
            raw = await streams.envelope_of(self.acks.redis, self.acks.keys.stream(shard),
                                            entry.stream_id)
            self.acks.dead_letter(shard, entry.stream_id, raw, reason)
        self.spawn(self.acks.retrying(read_back))

    def _created(self, batch: Batch) -> None:
        """``batch``'s node exists now (or its creation gave up): publish it next."""
        self.batcher.retry(batch)
        self.pump()

    def _requeue(self, batch: Batch) -> None:
        self.batcher.retry(batch)
        self.pump()

    def _on_down(self) -> None:
        lost = list(self.inflight.values())
        self.inflight.clear()
        for batch in lost:
            batch.resends += 1  # the policy looks at it when the batch is sent again
        self.batcher.retry(*lost, *self.creator.link_down())  # parked: never sent
        self.health.xmpp_down = True
        self.stats.reconnects += 1
        self.meters.reconnects.inc()
        self.meters.errors("connection_lost").inc()
        self.meters.in_flight(0)
        log.warning("shard %s: XMPP connection lost with %d IQs in flight; reconnecting",
                    self.name, len(lost))
        if not self.stop.is_set():
            self.spawn(self._reconnect())

    async def _reconnect(self) -> None:
        delay = RECONNECT_FIRST_S
        while not self.stop.is_set() and self.allowed():  # never replace a newer owner's login
            try:
                await self.link.connect()
                self.health.xmpp_down = False
                log.info("shard %s: reconnected", self.name)
                self.pump()
                return
            except (XmppUnreachable, XmppAuthError) as exc:
                log.warning("shard %s: reconnect failed (%s); next try in %.1f s",
                            self.name, exc, delay)
            await asyncio.sleep(delay)
            delay = backoff(delay, RECONNECT_MAX_S)
