"""What a shard process counts: totals for its exit line and heartbeat, and its meters."""

from __future__ import annotations

import asyncio
import bisect
import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter

from scalepub.shard import metrics
from scalepub.xmpp.batch import Batch
from scalepub.xmpp.link import Ignored


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
    last_publish: float = 0.0  # time.time() of the last confirmation, 0 before any

    def summary(self) -> str:
        """One log line."""
        rate = self.published / max(time.monotonic() - self.started, 1e-9)
        return (f"published={self.published} iqs={self.iqs} dead_lettered={self.dead_lettered} "
                f"retries={self.retries} splits={self.splits} reconnects={self.reconnects} "
                f"trimmed={self.trimmed} rate={rate:.0f}/s")


# How long a shard's per-IQ meter updates wait to be written together. Each write to a
# multiprocess metric takes a lock, asks os.getpid() and packs a value into its mmap file:
# ~11 metric updates (~20 such writes) an IQ were a tenth of a shard's CPU at one entry per
# IQ (docs/benchmarks.md). Gathered, a flush writes each changed value once: what a scrape
# shows is at most this much late, far below any scrape interval.
FLUSH_S = 0.5


class _Tally:
    """The observations of one histogram child since the last flush: per-bucket counts and
    their sum, written with one increment per changed bucket."""

    __slots__ = ("bounds", "child", "counts", "total", "values", "writable")

    def __init__(self, child: Any) -> None:
        self.child = child
        bounds = tuple(getattr(child, "_upper_bounds", ()))
        self.bounds = bounds or (float("inf"),)
        self.counts = [0] * len(self.bounds)
        self.total = 0.0
        # prometheus_client's Histogram child keeps one non-cumulative value per bucket and
        # one for the sum (every release since 0.1); were that to change, each value is kept
        # and observed at the flush instead: correct, only slower.
        buckets = getattr(child, "_buckets", None)
        self.writable = bool(bounds) and hasattr(child, "_sum") and buckets is not None \
            and len(buckets) == len(bounds)
        self.values: list[float] = []

    def add(self, value: float) -> None:
        """One observation (``child.observe(value)`` at the next write)."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        if not self.writable:
            self.values.append(value)

    def write(self) -> None:
        """Add what was observed to the child and start again."""
        if not any(self.counts):
            return
        if self.writable:
            self.child._sum.inc(self.total)
            for bucket, n in zip(self.child._buckets, self.counts, strict=True):
                if n:
                    bucket.inc(n)
        else:
            for value in self.values:
                self.child.observe(value)
            self.values = []
        self.counts = [0] * len(self.bounds)
        self.total = 0.0


class _ShardMeters:
    """The per-batch children of one stream shard, and what they gathered since a flush."""

    def __init__(self, shard: str) -> None:
        self.published = metrics.PUBLISHED.labels(shard)
        self.iqs = metrics.IQS.labels(shard)
        self.last_publish = metrics.LAST_PUBLISH.labels(shard)
        self.tallies = {
            (metric, labels): _Tally(metric.labels(shard, *labels))
            for metric, labels in (
                (metrics.E2E_LATENCY, ()), (metrics.BATCH_ENTRIES, ()),
                (metrics.BATCH_BYTES, ()),
                *((metrics.HOP_LATENCY, (hop,)) for hop in metrics.HOPS))}
        self.entries = 0
        self.batches = 0
        self.last_ns = 0

    def flush(self) -> None:
        """Write what was gathered."""
        if self.batches:
            self.published.inc(self.entries)
            self.iqs.inc(self.batches)
            self.entries = self.batches = 0
        if self.last_ns:
            self.last_publish.set(self.last_ns / 1e9)
            self.last_ns = 0
        for tally in self.tallies.values():
            tally.write()


class Meters:
    """The Prometheus children of one shard process.

    Per-batch figures carry the stream shard of the batch (they line up with the lag and
    pending gauges); connection figures carry the process's shards, comma-joined (the same
    single number with the default one process per shard). Per-IQ figures are gathered and
    written at most ``FLUSH_S`` later (``flush``; the worker flushes once more at its end).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._rtt = _Tally(metrics.RTT.labels(name))
        self._inflight = metrics.INFLIGHT.labels(name)
        self._inflight_now: int | None = None
        self.reconnects = metrics.RECONNECTS.labels(name)
        self.retries = metrics.RETRIES.labels(name)
        self._ignored = {kind: metrics.IGNORED_STANZAS.labels(name, kind.value)
                         for kind in Ignored}
        self._shards: dict[int, _ShardMeters] = {}
        self._flush_at: asyncio.TimerHandle | None = None

    def ignored(self, kind: Ignored) -> None:
        """One stanza sent to the shard's session dropped (scalepub.xmpp.link)."""
        self._ignored[kind].inc()

    def errors(self, kind: str) -> Counter:
        """The error counter of ``kind``."""
        return metrics.ERRORS.labels(self.name, kind)

    def dead_letter(self, shard: int) -> None:
        """One entry of ``shard`` dead-lettered."""
        metrics.DEAD_LETTERS.labels(str(shard)).inc()

    def in_flight(self, count: int) -> None:
        """The publish IQs in flight now (written with the next flush)."""
        self._inflight_now = count
        self._due()

    def sent(self, batch: Batch) -> None:
        """A batch goes out: the hops up to now of its oldest entry (per batch, not entry)."""
        oldest = batch.entries[0]
        now = time.monotonic()
        read_s = time.time() - (now - batch.read_at)  # wall time of the read
        appended_s = int(oldest.stream_id.split(b"-", 1)[0]) / 1e3  # Redis's clock, 1 ms
        tallies = self._shard(batch.shard).tallies
        tallies[_HOP, ("commit_to_append",)].add(max(appended_s - oldest.ts_ns / 1e9, 0.0))
        tallies[_HOP, ("append_to_read",)].add(max(read_s - appended_s, 0.0))
        tallies[_HOP, ("read_to_send",)].add(now - batch.read_at)
        self._due()

    def confirmed(self, batch: Batch, now_ns: int) -> None:
        """A batch the server confirmed (per batch, never per entry: a few us an IQ)."""
        shard = self._shard(batch.shard)
        shard.entries += len(batch.entries)
        shard.batches += 1
        shard.last_ns = now_ns
        rtt = time.monotonic() - batch.sent_at
        self._rtt.add(rtt)
        tallies = shard.tallies
        tallies[_HOP, ("send_to_result",)].add(rtt)
        tallies[metrics.BATCH_ENTRIES, ()].add(len(batch.entries))
        tallies[metrics.BATCH_BYTES, ()].add(batch.size)
        tallies[metrics.E2E_LATENCY, ()].add((now_ns - batch.entries[0].ts_ns) / 1e9)
        self._due()

    def flush(self) -> None:
        """Write every gathered update now."""
        if self._flush_at is not None:
            self._flush_at.cancel()
            self._flush_at = None
        self._rtt.write()
        if self._inflight_now is not None:
            self._inflight.set(self._inflight_now)
            self._inflight_now = None
        for shard in self._shards.values():
            shard.flush()

    def _shard(self, shard: int) -> _ShardMeters:
        meters = self._shards.get(shard)
        if meters is None:
            meters = self._shards[shard] = _ShardMeters(str(shard))
        return meters

    def _due(self) -> None:
        """Have the gathered updates written within FLUSH_S (at once outside an event loop)."""
        if self._flush_at is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._flush_at = loop.call_later(FLUSH_S, self._flush_due)

    def _flush_due(self) -> None:
        self._flush_at = None
        self.flush()


_HOP = metrics.HOP_LATENCY
