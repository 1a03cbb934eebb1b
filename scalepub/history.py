"""Recent entries of one node, for subscribers' catch-up (docs/protocol.md section 5).

Each node has its own history, written by the append script with the shard stream entry:
the stream ``{prefix}:{N}:h:<node>`` (same hash tag as its shard) holds the node's newest
``HISTORY_MAXLEN`` entries under the ids ``<seq>-0``, so the entries after a seq are one XRANGE
away whatever the rest of the shard does, and the key expires ``HISTORY_TTL_S`` after the
node's newest entry. ejabberd keeps none (ops/ejabberd). A subscriber that saw a seq gap, or
reconnected, asks for the entries after the last seq it has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import redis

from scalepub.envelope import Envelope, EnvelopeError, decode
from scalepub.sharding import ENTRY_FIELD, Keys, shard_for

# Field of a history entry holding the entry's id in the shard stream (APPEND_LUA writes it).
STREAM_ID_FIELD = b"i"
_MAX_ID = 2**64 - 1


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
    """Up to ``limit`` entries of ``node`` with seq > ``after``, oldest first.

    One round trip: the node's seq counter and XRANGE of its history from ``after + 1``.
    ``lost`` is exact: the history holds a node's seqs without holes (the append script adds
    every seq, trimming and expiry remove the oldest), so entries after ``after`` are gone
    exactly when the first one kept is not ``after + 1``.
    """
    shard = shard_for(node, shards)
    with client.pipeline(transaction=False) as pipe:
        pipe.hget(keys.seqs(shard), node)
        # (seq ids are below 2**64: a larger ``after`` has nothing after it anyway)
        pipe.xrange(keys.history(shard, node), min=f"{min(after + 1, _MAX_ID)}-0", count=limit)
        raw_last, kept = pipe.execute()
    last_seq = int(cast(bytes | None, raw_last) or 0)
    found = History(node, last_seq=last_seq)
    if last_seq <= after:
        return found
    for hid, fields in cast(list[tuple[bytes, dict[bytes, bytes]]], kept):
        try:
            env = decode(fields.get(ENTRY_FIELD, b""))
        except EnvelopeError:  # only another writer puts such bytes here: a hole, said as lost
            continue
        found.entries.append(env)
        found.ids.append(fields.get(STREAM_ID_FIELD, hid).decode())
    seqs = [env.seq for env in found.entries]
    found.lost = seqs[:1] != [after + 1] or seqs != list(range(after + 1, after + 1 + len(seqs)))
    return found
