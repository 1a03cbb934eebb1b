"""The publisher's reply-driven batching (issue 16 §1), without I/O.

A pure unit test of ``Publisher.pump``: the XMPP link is replaced by a recorder of what
would be written, replies are handed in as the link would. Against a real server the same
rule is exercised by every pool test; here the order of events is exact.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from scalepub.settings import Settings
from scalepub.shard.batcher import Batcher, Caps
from scalepub.shard.heartbeat import Health
from scalepub.shard.publisher import Publisher
from scalepub.shard.stats import Meters, Stats
from scalepub.sharding import Keys
from scalepub.xmpp.link import Reply
from tests.test_batcher import entry


class _Link:
    up = True
    publish_options = b""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self._n = 0

    def new_id(self) -> str:
        self._n += 1
        return f"iq{self._n}"

    def send(self, data: bytes) -> None:
        self.sent.append(data)


class _Acks:
    redis = None  # the node creator's lock: not used while no publish is refused item-not-found
    keys = Keys()

    def __init__(self) -> None:
        self.acked: list[bytes] = []

    def add(self, _shard: int, ids: Any) -> None:
        self.acked.extend(ids)


def _publisher(window: int = 32, allowed: Callable[[], bool] = lambda: True
               ) -> tuple[Publisher, _Link, Batcher]:
    """A Publisher on a fake link; ``allowed`` stands for the shard's lease (valid)."""
    settings = Settings(window=window, linger_ms=0)
    batcher = Batcher(Caps(250, 128_000, 0.0))
    pub = Publisher(settings, "t", "r", batcher, _Acks(), Stats(),  # type: ignore[arg-type]
                    Meters("t"), Health(), max_buffer=10_000, stop=asyncio.Event(),
                    space=asyncio.Event(), spawn=lambda _c: None, allowed=allowed)
    link = _Link()
    pub.link = link  # type: ignore[assignment]
    return pub, link, batcher


def _nodes_and_seqs(link: _Link) -> list[tuple[str, list[int]]]:
    import re
    out = []
    for iq in link.sent:
        node = re.search(rb'<publish node="([^"]+)"', iq)
        seqs = re.findall(rb'<entry node="[^"]+" seq="(\d+)"', iq)
        assert node is not None
        out.append((node.group(1).decode(), [int(s) for s in seqs]))
    return out


def test_nothing_in_flight_sends_at_once_then_entries_wait_for_a_reply() -> None:
    pub, link, batcher = _publisher()
    batcher.add(entry("/a", 1), 0, now=0.0)
    pub.pump()  # what the reader does after handing entries over
    assert _nodes_and_seqs(link) == [("/a", [1])]  # no linger, no timer: at once
    for node, seq in (("/b", 1), ("/a", 2), ("/b", 2), ("/a", 3)):
        batcher.add(entry(node, seq), 0, now=0.0)
        pub.pump()
    assert len(link.sent) == 1  # an IQ is in flight: the new entries accumulate
    [first_id] = pub.inflight
    pub._on_reply(Reply(first_id, ok=True))
    # The reply freed the window: everything that accumulated goes together.
    assert _nodes_and_seqs(link)[1:] == [("/b", [1, 2]), ("/a", [2, 3])]
    for iq_id in list(pub.inflight):
        pub._on_reply(Reply(iq_id, ok=True))
    assert not pub.inflight and batcher.idle
    assert pub.acks.acked == [f"1-{s}".encode() for s in (1, 1, 2, 2, 3)]  # type: ignore[attr-defined]


def test_a_full_batch_goes_while_others_are_in_flight() -> None:
    pub, link, batcher = _publisher()
    batcher.add(entry("/a", 1), 0, now=0.0)
    pub.pump()
    for seq in range(1, 251):
        batcher.add(entry("/b", seq), 0, now=0.0)
    pub.pump()
    assert [len(seqs) for _, seqs in _nodes_and_seqs(link)] == [1, 250]


def test_reading_ahead_into_a_backlog_holds_open_batches_until_the_reader_stops() -> None:
    pub, link, batcher = _publisher()
    for node in ("/a", "/b"):
        batcher.add(entry(node, 1), 0, now=0.0)
    pub.pump()
    assert len(link.sent) == 2
    batcher.reading_ahead = True  # the reader's last read was full: a backlog
    for seq in (2, 3):
        batcher.add(entry("/a", seq), 0, now=0.0)
        batcher.add(entry("/b", seq), 0, now=0.0)
    for iq_id in list(pub.inflight):
        pub._on_reply(Reply(iq_id, ok=True))
    assert len(link.sent) == 2 and not pub.inflight  # read deeper first, even idle
    batcher.reading_ahead = False  # buffer full or caught up; the reader then pumps
    pub.pump()
    assert _nodes_and_seqs(link)[2:] == [("/a", [2, 3]), ("/b", [2, 3])]


def test_a_pump_refused_by_the_lease_is_tried_again_without_another_trigger() -> None:
    """Nothing in flight, the reader waiting for buffer space: the only pump came while the
    lease was not valid (a late renewal). The publisher looks again by itself, so the held
    entries go once the lease is valid again (a shard once stalled holding 12,000)."""
    async def main() -> None:
        lease = {"valid": False}
        pub, link, batcher = _publisher(allowed=lambda: lease["valid"])
        batcher.add(entry("/a", 1), 0, now=0.0)
        pub.pump()
        assert link.sent == []
        lease["valid"] = True
        await asyncio.sleep(0.3)
        assert _nodes_and_seqs(link) == [("/a", [1])]

    asyncio.run(main())
