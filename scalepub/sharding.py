"""Which shard a node belongs to, and the Redis keys of one shard.

Every key of a shard carries the Redis Cluster hash tag ``{N}``, so one Lua script can touch
the shard's stream and sequence counters atomically, and a cluster can spread shards later.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

# The consumer group every shard process reads its stream through.
CONSUMER_GROUP = "scalepub"
# Field of a stream entry that holds the msgpack envelope.
ENTRY_FIELD = b"e"


def shard_for(node: str, shards: int) -> int:
    """The shard of ``node``: a stable hash, the same in every process and on every host."""
    # crc32 rather than hash(): Python's str hash is salted per process.
    return zlib.crc32(node.encode("utf-8")) % shards


@dataclass(frozen=True)
class Keys:
    """Redis key names under one prefix."""

    prefix: str = "scalepub"

    def stream(self, shard: int) -> str:
        """The stream a shard's entries are appended to."""
        return f"{self.prefix}:{{{shard}}}:stream"

    def seqs(self, shard: int) -> str:
        """Hash of per-node sequence counters (field = node)."""
        return f"{self.prefix}:{{{shard}}}:seq"

    def meta(self, shard: int) -> str:
        """Hash with the shard count this shard's stream was written for."""
        return f"{self.prefix}:{{{shard}}}:meta"

    def history(self, shard: int, node: str) -> str:
        """Stream of one node's newest entries (ids ``<seq>-0``), for subscribers' catch-up."""
        return f"{self.prefix}:{{{shard}}}:h:{node}"

    def dead(self, shard: int) -> str:
        """Dead-letter stream: entries the XMPP server refused, with the reason."""
        return f"{self.prefix}:{{{shard}}}:dead"

    def wait_probe(self, shard: int) -> str:
        """Key the relay writes before WAIT, so WAIT covers its appends to this shard's master
        whichever pooled connection made them (connections.unreplicated)."""
        return f"{self.prefix}:{{{shard}}}:waited"

    def heartbeat(self, shard: int) -> str:
        """Key with a TTL that a live shard process keeps refreshing."""
        return f"{self.prefix}:{{{shard}}}:alive"

    def lease(self, shard: int) -> str:
        """Hash of the shard's lease (fence ``token:owner``, since) with a TTL: its one owner."""
        return f"{self.prefix}:{{{shard}}}:lease"

    def fence(self, shard: int) -> str:
        """Counter of the shard's lease acquisitions: the fencing token, only ever growing."""
        return f"{self.prefix}:{{{shard}}}:fence"

    @property
    def node_creation(self) -> str:
        """Lock (with a TTL) held by the one shard connection creating pubsub nodes now."""
        return f"{self.prefix}:{{nodes}}:creating"

    @property
    def supervisors(self) -> str:
        """Sorted set of live supervisors (score: Redis time in ms their entry expires)."""
        return f"{self.prefix}:{{supervisors}}:members"

    @property
    def supervisor_info(self) -> str:
        """Hash of what each live supervisor reports (JSON per id), for `scalepub status`."""
        return f"{self.prefix}:{{supervisors}}:info"

    def relay_record(self, shard: int, database: str) -> str:
        """What the outbox relay of ``database`` last appended to a shard (for retries)."""
        return f"{self.prefix}:{{{shard}}}:relayed:{database}"

    def relay_lease(self, database: str) -> str:
        """Key whose holder is the one outbox relay moving ``database``'s rows."""
        return f"{self.prefix}:relay:{database}"

    def relay_nudge(self, database: str) -> str:
        """Pub/sub channel on which relays that do not lead wake the leader of ``database``."""
        return f"{self.prefix}:relay:{database}:nudge"

    def relay_state(self, database: str) -> str:
        """Hash with the outbox backlog the relay of ``database`` last saw (with a TTL)."""
        return f"{self.prefix}:relay:{database}:state"

    @property
    def relay_state_pattern(self) -> str:
        """SCAN pattern matching every relay's state hash."""
        return f"{self.prefix}:relay:*:state"

    @property
    def shard_count(self) -> str:
        """The shard count producers and the pool agreed on."""
        return f"{self.prefix}:shards"

    @property
    def stream_pattern(self) -> str:
        """SCAN pattern matching every shard stream under this prefix."""
        return f"{self.prefix}:{{*}}:stream"
