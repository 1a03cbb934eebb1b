"""Read back what producers appended, for assertions."""

from __future__ import annotations

from dataclasses import dataclass

import redis

from scalepub.envelope import Envelope, decode
from scalepub.settings import Settings
from scalepub.sharding import ENTRY_FIELD, Keys


@dataclass(frozen=True)
class StoredEntry:
    """An envelope and where it sits."""

    shard: int
    stream_id: str
    env: Envelope


def read_all(client: redis.Redis, settings: Settings) -> list[StoredEntry]:
    """Every entry of every shard stream, in stream order per shard."""
    keys = Keys(settings.key_prefix)
    out = []
    for shard in range(settings.shards):
        for sid, fields in client.xrange(keys.stream(shard)):
            out.append(StoredEntry(shard, sid.decode(), decode(fields[ENTRY_FIELD])))
    return out
