"""Recent entries of one node, read back from its shard stream (for subscribers' catch-up).

The shard stream is the history: it keeps the newest ``STREAM_MAXLEN`` entries of the shard,
published or not. ejabberd keeps none (ops/ejabberd). A subscriber that saw a seq gap, or
reconnected, asks for the entries after the last seq it has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import redis

from scalepub.envelope import Envelope, EnvelopeError, decode
from scalepub.sharding import ENTRY_FIELD, Keys, shard_for

SCAN_CHUNK = 2000
MAX_SCAN = 200_000  # entries of the shard looked at, at most, per request


@dataclass
class History:
    """The answer: entries after ``after`` in seq order, and whether some are gone."""

    node: str
    entries: list[Envelope] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)  # stream ids of ``entries``
    lost: bool = False  # some entries after ``after`` are no longer kept
    last_seq: int = 0  # the node's newest seq

    def as_json(self) -> dict[str, object]:
        """The JSON body of the history endpoint (docs/protocol.md)."""
        return {
            "node": self.node, "lost": self.lost, "last_seq": self.last_seq,
            "entries": [
                {"node": e.node, "seq": e.seq, "id": stream_id, "ts": str(e.ts_ns),
                 "model": e.model, "pk": e.pk, "fmt": e.fmt,
                 "payload": e.payload.decode("utf-8", "replace")}
                for e, stream_id in zip(self.entries, self.ids, strict=True)
            ],
        }


def read_history(client: redis.Redis, keys: Keys, shards: int, node: str, after: int,
                 limit: int) -> History:
    """Up to ``limit`` entries of ``node`` with seq > ``after``, oldest first."""
    shard = shard_for(node, shards)
    last_seq = int(cast(bytes | None, client.hget(keys.seqs(shard), node)) or 0)
    found = History(node, last_seq=last_seq)
    if last_seq <= after:
        return found
    newest_first = _scan_back(client, keys.stream(shard), node, after)
    newest_first.reverse()
    seqs = [env.seq for env, _ in newest_first]
    found.lost = seqs != list(range(after + 1, after + 1 + len(seqs))) or not seqs
    for env, sid in newest_first[:limit]:
        found.entries.append(env)
        found.ids.append(sid)
    return found


def _scan_back(client: redis.Redis, key: str, node: str,
               after: int) -> list[tuple[Envelope, str]]:
    """Entries of ``node`` newer than ``after``, newest first, stopping at ``after``."""
    out: list[tuple[Envelope, str]] = []
    end, scanned = "+", 0
    while scanned < MAX_SCAN:
        chunk = cast(list[tuple[bytes, dict[bytes, bytes]]],
                     client.xrevrange(key, max=end, min="-", count=SCAN_CHUNK))
        for sid, fields in chunk:
            try:
                env = decode(fields.get(ENTRY_FIELD, b""))
            except EnvelopeError:
                continue
            if env.node != node:
                continue
            if env.seq <= after:
                return out
            out.append((env, sid.decode()))
        if len(chunk) < SCAN_CHUNK:
            return out
        scanned += len(chunk)
        end = "(" + chunk[-1][0].decode()
    return out
