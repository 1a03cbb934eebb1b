"""What a shard process counts: totals for its exit line and heartbeat, and its meters."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

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


class Meters:
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
        self._ignored = {kind: metrics.IGNORED_STANZAS.labels(name, kind.value)
                         for kind in Ignored}

    def ignored(self, kind: Ignored) -> None:
        """One stanza sent to the shard's session dropped (scalepub.xmpp.link)."""
        self._ignored[kind].inc()

    def errors(self, kind: str) -> Counter:
        """The error counter of ``kind``."""
        return metrics.ERRORS.labels(self.name, kind)

    def dead_letter(self, shard: int) -> None:
        """One entry of ``shard`` dead-lettered."""
        metrics.DEAD_LETTERS.labels(str(shard)).inc()

    def sent(self, batch: Batch) -> None:
        """A batch goes out: the hops up to now of its oldest entry (per batch, not entry)."""
        oldest = batch.entries[0]
        now = time.monotonic()
        read_s = time.time() - (now - batch.read_at)  # wall time of the read
        appended_s = int(oldest.stream_id.split(b"-", 1)[0]) / 1e3  # Redis's clock, 1 ms
        hop = metrics.HOP_LATENCY.labels
        shard = str(batch.shard)
        hop(shard, "commit_to_append").observe(max(appended_s - oldest.ts_ns / 1e9, 0.0))
        hop(shard, "append_to_read").observe(max(read_s - appended_s, 0.0))
        hop(shard, "read_to_send").observe(now - batch.read_at)

    def confirmed(self, batch: Batch, now_ns: int) -> None:
        """A batch the server confirmed (per batch, never per entry: a few us an IQ)."""
        shard = str(batch.shard)
        metrics.PUBLISHED.labels(shard).inc(len(batch.entries))
        metrics.IQS.labels(shard).inc()
        rtt = time.monotonic() - batch.sent_at
        self.rtt.observe(rtt)
        metrics.HOP_LATENCY.labels(shard, "send_to_result").observe(rtt)
        metrics.BATCH_ENTRIES.labels(shard).observe(len(batch.entries))
        metrics.BATCH_BYTES.labels(shard).observe(batch.size)
        metrics.E2E_LATENCY.labels(shard).observe((now_ns - batch.entries[0].ts_ns) / 1e9)
        metrics.LAST_PUBLISH.labels(shard).set(now_ns / 1e9)
