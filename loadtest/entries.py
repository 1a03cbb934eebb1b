"""What a load-test subscriber keeps per entry: latency histograms and per-node seq tracking.

Fan-out targets are ~200,000 entry-deliveries/s on two cores, so per entry this costs one regex
match (C), a few integer operations and one list increment; no XML tree per entry.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

# The shard writes the attributes in this order (scalepub/xmpp/batch.py ``_ENTRY``). The
# server forwards the batch's CDATA either as CDATA or as escaped text, so the pattern runs
# over the raw BOSH body and accepts both; node names never hold ``&``, ``"`` or ``<``. It
# starts with a literal so that the regex engine can skip ahead by substring search.
_Q = rb'(?:"|&quot;)'
_RAW_ENTRY = re.compile(
    rb"entry node=" + _Q + rb'([^"&<]*)' + _Q + rb" seq=" + _Q + rb"(\d+)" + _Q
    + rb" id=" + _Q + rb'[^"&<]*' + _Q + rb" ts=" + _Q + rb"(\d+)"
)
_ENTRY_MARK = b"entry node="
BATCH_TAG = "{urn:scalepub:1}batch"

# Latency histogram: 0.1 ms buckets up to 30 min (sparse: a dict); later ones share the last.
BUCKET_MS = 0.1
BUCKET_NS = 100_000
BUCKETS = 18_000_000

Found = list[tuple[bytes, bytes, bytes]]  # (node, seq, ts_ns) as they appear in the text


def scan_body(raw: bytes) -> Found | None:
    """Entries of a raw BOSH body, or None when the fast scan cannot vouch for its count.

    None means: some text looks like an entry but does not match (a row whose own text holds
    ``entry node=``, or another attribute order); parse the body as XML instead
    (``entries_of_batch``).
    """
    found: Found = _RAW_ENTRY.findall(raw)
    return found if len(found) == raw.count(_ENTRY_MARK) else None


def entries_of_batch(batch: ET.Element) -> Found:
    """Entries of a parsed ``<batch>`` element (its text is an XML fragment)."""
    if batch.tag != BATCH_TAG:
        return []
    fragment = ET.fromstring(f"<entries>{batch.text or ''}</entries>")
    return [(e.get("node", "").encode(), e.get("seq", "0").encode(), e.get("ts", "0").encode())
            for e in fragment.iter("entry")]


@dataclass
class NodeTrack:
    """Seqs of one node seen by one subscriber: next expected, holes, duplicates."""

    next: int = 0  # one past the highest seq seen
    missing: set[int] = field(default_factory=set)
    received: int = 0
    duplicates: int = 0
    out_of_order: int = 0

    def see(self, seq: int) -> bool:
        """Record one arrival; False for a duplicate."""
        self.received += 1
        if seq == self.next:
            self.next += 1
            return True
        if self.next == 0:  # the first arrival: everything before it is missing
            self.next = seq + 1
            self.missing.update(range(1, seq))
            return True
        if seq > self.next:
            self.missing.update(range(self.next, seq))
            self.next = seq + 1
            self.out_of_order += 1
            return True
        if seq in self.missing:  # a late fill of a hole: out of order, not a duplicate
            self.missing.discard(seq)
            return True
        self.duplicates += 1
        return False

    def lost(self, truth: int) -> int:
        """Entries of this node not received, given ``truth`` entries were produced."""
        return len(self.missing) + max(0, truth - max(self.next - 1, 0))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (holes as a count plus the first few)."""
        return {"next": self.next, "received": self.received, "duplicates": self.duplicates,
                "out_of_order": self.out_of_order, "missing": len(self.missing),
                "missing_sample": sorted(self.missing)[:20]}


@dataclass
class Histogram:
    """Counts of latencies in ``BUCKET_MS`` buckets; cheap to add to and to merge."""

    counts: dict[int, int] = field(default_factory=dict)
    total: int = 0

    def add(self, latency_ns: int) -> None:
        """Count one latency (ns; negative clock skew counts as 0)."""
        bucket = min(max(latency_ns, 0) // BUCKET_NS, BUCKETS)
        self.counts[bucket] = self.counts.get(bucket, 0) + 1
        self.total += 1

    def merge(self, other: Histogram) -> None:
        """Add another histogram's counts."""
        for bucket, n in other.counts.items():
            self.counts[bucket] = self.counts.get(bucket, 0) + n
        self.total += other.total

    def percentile(self, p: float) -> float:
        """Upper edge (ms) of the bucket holding the p-th percentile; NaN when empty."""
        if not self.total:
            return float("nan")
        rank = max(1, round(self.total * p / 100.0))
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= rank:
                return (bucket + 1) * BUCKET_MS
        raise AssertionError("unreachable")

    def to_json(self) -> dict[str, int]:
        """Bucket → count, keys as strings (JSON)."""
        return {str(k): v for k, v in self.counts.items()}

    @classmethod
    def from_json(cls, data: dict[str, int]) -> Histogram:
        """Inverse of ``to_json``."""
        counts = {int(k): int(v) for k, v in data.items()}
        return cls(counts, sum(counts.values()))


@dataclass
class Tracker:
    """Everything one subscriber process saw: per (user, node) tracks, per-second histograms."""

    tracks: dict[tuple[int, bytes], NodeTrack] = field(default_factory=dict)
    per_second: dict[int, Histogram] = field(default_factory=dict)
    entries: int = 0
    duplicates: int = 0

    def track(self, user: int, node: str) -> NodeTrack:
        """The track of ``node`` for subscriber ``user`` (created when subscribing)."""
        return self.tracks.setdefault((user, node.encode()), NodeTrack())

    def feed(self, user: int, found: Found, now_ns: int) -> Iterator[tuple[bytes, float]]:
        """Record entries received together; yields ``(node, latency_ms)`` of each new one."""
        second = now_ns // 1_000_000_000
        hist = self.per_second.get(second)
        if hist is None:
            hist = self.per_second[second] = Histogram()
        tracks = self.tracks
        node_of_track, track = b"", NodeTrack()
        for node, seq, ts in found:
            if node != node_of_track:  # entries come in runs of one node: one lookup per run
                key = (user, node)
                track = tracks.get(key) or tracks.setdefault(key, NodeTrack())
                node_of_track = node
            if not track.see(int(seq)):
                self.duplicates += 1
                continue
            latency_ns = now_ns - int(ts)
            hist.add(latency_ns)
            yield node, latency_ns / 1e6
        self.entries += len(found)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dump: tracks per user and node, histograms per second."""
        return {
            "entries": self.entries,
            "duplicates": self.duplicates,
            "tracks": [{"user": u, "node": n.decode(), **t.as_dict()}
                       for (u, n), t in self.tracks.items()],
            "per_second": {str(s): h.to_json() for s, h in sorted(self.per_second.items())},
        }
