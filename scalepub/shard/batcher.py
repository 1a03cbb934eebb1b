"""Group entries into per-node batches and decide which batch goes out next.

Pure bookkeeping, no I/O. Per-node order is kept by allowing at most one batch of a node in
flight: a batch that must be retried or split is always published before anything later of
its node. Different nodes are pipelined freely.

When an open (not full) batch goes is the publisher's call, driven by the server's replies
rather than a timer (the TCP_CORK / Nagle idea): with nothing in flight it goes at once, so
a quiet site pays no linger; with IQs in flight it keeps filling until a reply frees the
window, so batches grow exactly when the server is the bottleneck. ``linger_s`` (default 0)
can add a minimum age on top. Under a backlog (``reading_ahead``: the reader's last read was
full and the buffer has room) open batches wait until the reader filled the buffer or caught
up, so each node's batch holds what the memory bound allows rather than what one read
brought (2,000 entries over all of a shard's nodes); full batches still go at once.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

from scalepub.xmpp.batch import ENTRY_OVERHEAD_BYTES, Batch, Entry


@dataclass(frozen=True)
class Caps:
    """When an open batch is closed: entry count, byte size, or age (linger, may be 0)."""

    max_entries: int
    max_bytes: int
    linger_s: float


class _NodeQueue:
    __slots__ = ("busy", "open", "ready")

    def __init__(self) -> None:
        self.ready: deque[Batch] = deque()
        self.open: Batch | None = None
        self.busy = False  # a batch of this node is in flight


class Batcher:
    """Per-node batches, closed on caps, handed out one in flight per node."""

    def __init__(self, caps: Caps) -> None:
        self.caps = caps
        self._nodes: dict[str, _NodeQueue] = {}
        # Nodes that have a ready batch and nothing in flight, oldest first: fair across nodes.
        self._sendable: OrderedDict[str, None] = OrderedDict()
        self._open_nodes: OrderedDict[str, None] = OrderedDict()
        self.buffered = 0  # entries held (open, ready or in flight)
        self.held_bytes = 0  # their memory, roughly (Entry.held): the reader's bound
        # Set by the reader: more is waiting in the stream and the buffer has room for it.
        self.reading_ahead = False

    def add(self, entry: Entry, shard: int, now: float) -> bool:
        """Add an entry; False if it alone exceeds the byte cap (the caller dead-letters it)."""
        if len(entry.part) > self.caps.max_bytes:
            return False
        q = self._nodes.get(entry.node)
        if q is None:
            q = self._nodes[entry.node] = _NodeQueue()
        batch = q.open
        if batch is not None and batch.size + len(entry.part) > self.caps.max_bytes:
            self._close(entry.node, q)
            batch = None
        if batch is None:
            batch = q.open = Batch(entry.node, shard, read_at=now)
            self._open_nodes[entry.node] = None
        batch.add(entry)
        self.buffered += 1
        self.held_bytes += len(entry.part) + ENTRY_OVERHEAD_BYTES  # Entry.held, inlined
        if len(batch.entries) >= self.caps.max_entries:
            self._close(entry.node, q)
        return True

    def next_due(self) -> float | None:
        """When the oldest open batch's linger runs out (None: nothing open)."""
        for node in self._open_nodes:
            batch = self._nodes[node].open
            assert batch is not None
            return batch.read_at + self.caps.linger_s
        return None

    def next_batch(self, now: float, open_ok: bool = True) -> Batch | None:
        """The next batch to publish (its node becomes busy), or None.

        Full batches go first; an open batch goes only if ``open_ok`` (the publisher's
        reply-driven rule, see the module doc), its linger ran out and its node has nothing
        in flight. While a node's previous batch is in flight its open batch keeps growing.
        """
        if not self._sendable and open_ok:
            self._close_expired(now)
        if not self._sendable:
            return None
        node, _ = self._sendable.popitem(last=False)
        q = self._nodes[node]
        batch = q.ready.popleft()
        q.busy = True
        return batch

    def _close_expired(self, now: float) -> None:
        deadline = now - self.caps.linger_s
        for node in self._open_nodes:  # oldest first; skips at most the busy nodes
            q = self._nodes[node]
            assert q.open is not None
            if q.open.read_at > deadline:
                return
            if not q.busy:
                self._close(node, q)
                return

    def done(self, batch: Batch) -> None:
        """The server confirmed ``batch`` (or it was dead-lettered): free its node."""
        self.buffered -= len(batch.entries)
        self.held_bytes -= batch.size + len(batch.entries) * ENTRY_OVERHEAD_BYTES
        self.release(batch.node)

    def retry(self, *batches: Batch) -> None:
        """Put ``batches`` back at the head of their node's queue, in the given order."""
        for batch in reversed(batches):
            self._nodes[batch.node].ready.appendleft(batch)
        for node in {b.node: None for b in batches}:
            self.release(node)

    def forget(self, entries: list[Entry]) -> None:
        """Entries removed without being published (dead-lettered out of a split batch)."""
        self.buffered -= len(entries)
        self.held_bytes -= sum(len(e.part) + ENTRY_OVERHEAD_BYTES for e in entries)

    def release(self, node: str) -> None:
        """Nothing of ``node`` is in flight any more."""
        q = self._nodes[node]
        q.busy = False
        if q.ready:
            self._sendable[node] = None
        elif q.open is None:
            del self._nodes[node]  # idle: keeps memory proportional to active nodes

    def _close(self, node: str, q: _NodeQueue) -> None:
        if q.open is None:
            return
        q.ready.append(q.open)
        q.open = None
        self._open_nodes.pop(node, None)
        if not q.busy:
            self._sendable[node] = None

    @property
    def idle(self) -> bool:
        """Nothing held at all."""
        return self.buffered == 0
