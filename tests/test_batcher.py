"""Batching rules and per-node ordering, without I/O."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from hypothesis import given
from hypothesis import strategies as st

from scalepub.shard.batcher import Batcher, Caps
from scalepub.xmpp.batch import Batch, Entry, entry_part, publish_iq, well_formed


def entry(node: str, seq: int, payload: bytes = b"<p>x</p>", fmt: bytes = b"xml") -> Entry:
    sid = f"1-{seq}".encode()
    part = entry_part(node=node.encode(), seq=seq, stream_id=sid, ts_ns=seq, model=b"a.b",
                      pk=str(seq).encode(), fmt=fmt, payload=payload)
    return Entry(sid, node, seq, seq, part, b"")


def test_count_cap_closes_a_batch_at_once() -> None:
    b = Batcher(Caps(max_entries=3, max_bytes=10_000, linger_s=60))
    for seq in range(1, 8):
        assert b.add(entry("/n", seq), 0, now=0.0)
    first = b.next_batch(now=0.0)
    assert first is not None and [e.seq for e in first.entries] == [1, 2, 3]
    assert b.next_batch(now=0.0) is None  # one batch per node in flight
    b.done(first)
    second = b.next_batch(now=0.0)
    assert second is not None and [e.seq for e in second.entries] == [4, 5, 6]


def test_byte_cap_and_oversized_entry() -> None:
    size = len(entry("/n", 1).part)
    b = Batcher(Caps(max_entries=100, max_bytes=size * 2 + 1, linger_s=0))
    for seq in range(1, 6):
        b.add(entry("/n", seq), 0, now=0.0)
    got = b.next_batch(now=1.0)
    assert got is not None and len(got.entries) == 2 and got.size <= size * 2 + 1
    assert not b.add(entry("/n", 9, payload=b"x" * (size * 3)), 0, now=0.0)


def test_linger_waits_then_sends_and_busy_nodes_keep_filling() -> None:
    b = Batcher(Caps(max_entries=100, max_bytes=100_000, linger_s=0.005))
    b.add(entry("/a", 1), 0, now=0.0)
    assert b.next_batch(now=0.001) is None  # still lingering
    assert b.next_due() == 0.005
    a1 = b.next_batch(now=0.006)
    assert a1 is not None and [e.seq for e in a1.entries] == [1]
    for seq in range(2, 6):  # arrive while /a is in flight: they stay in one open batch
        b.add(entry("/a", seq), 0, now=0.01)
    assert b.next_batch(now=1.0) is None
    b.done(a1)
    a2 = b.next_batch(now=1.0)
    assert a2 is not None and [e.seq for e in a2.entries] == [2, 3, 4, 5]


def test_retry_puts_batches_back_first_in_order() -> None:
    b = Batcher(Caps(max_entries=2, max_bytes=100_000, linger_s=0))
    for seq in range(1, 7):
        b.add(entry("/n", seq), 0, now=0.0)
    sent = b.next_batch(now=0.0)
    assert sent is not None
    first, second = sent.split()
    b.retry(first, second)
    order = []
    while (nxt := b.next_batch(now=0.0)) is not None:
        order += [e.seq for e in nxt.entries]
        b.done(nxt)
    assert order == [1, 2, 3, 4, 5, 6]
    assert b.idle


@given(st.lists(st.tuples(st.sampled_from(["/a", "/b", "/c"]), st.booleans()), max_size=200))
def test_any_interleaving_keeps_per_node_order(events: list[tuple[str, bool]]) -> None:
    """Adds and confirmations in any order: each node's entries go out in seq order, once."""
    b = Batcher(Caps(max_entries=4, max_bytes=100_000, linger_s=0))
    seqs = {"/a": 0, "/b": 0, "/c": 0}
    sent: dict[str, list[int]] = {n: [] for n in seqs}
    inflight: list[Batch] = []
    for node, confirm in events:
        seqs[node] += 1
        b.add(entry(node, seqs[node]), 0, now=0.0)
        if confirm and inflight:
            b.done(inflight.pop(0))
        while (nxt := b.next_batch(now=1.0)) is not None:
            assert all(x.node != nxt.node for x in inflight)
            sent[nxt.node] += [e.seq for e in nxt.entries]
            inflight.append(nxt)
    for x in inflight:
        b.done(x)
    while (nxt := b.next_batch(now=1.0)) is not None:
        sent[nxt.node] += [e.seq for e in nxt.entries]
        b.done(nxt)
    assert sent == {n: list(range(1, seqs[n] + 1)) for n in seqs}


def test_publish_iq_carries_one_item_whose_cdata_parses_into_entries() -> None:
    batch = Batch("/n", 0)
    for seq, payload in enumerate([b"<p>a</p>", b'<p a="]]>"/>', b'{"t": "<b>&]]>"}'], 1):
        batch.add(entry("/n", seq, payload, b"json" if payload.startswith(b"{") else b"xml"))
    iq = ET.fromstring(publish_iq("id1", "pubsub.localhost", batch))
    items = iq.findall(".//{http://jabber.org/protocol/pubsub}item")
    assert len(items) == 1 and items[0].get("id") == "1-3"
    [payload_el] = list(items[0])
    fragment = ET.fromstring(f"<entries>{payload_el.text}</entries>")
    entries = fragment.findall("entry")
    assert [e.get("seq") for e in entries] == ["1", "2", "3"]
    split = entries[1].find("p")
    assert split is not None and split.get("a") == "]]>"  # split across two CDATA sections
    assert entries[2].text == '{"t": "<b>&]]>"}'


def test_well_formed_flags_control_characters() -> None:
    assert well_formed(entry("/n", 1)) is None
    assert "not well-formed" in (well_formed(entry("/n", 2, b"<p>\x01</p>")) or "")


@given(st.lists(st.sampled_from(["confirm", "split", "requeue", "drop_first"]), max_size=300),
       st.integers(1, 40))
def test_recovery_moves_keep_the_count_and_the_order(moves: list[str], count: int) -> None:
    """What the publisher does with a failed batch (policy.py's decisions) keeps the batcher's
    bookkeeping true: every entry ends published or dropped once, published ones in order."""
    b = Batcher(Caps(max_entries=8, max_bytes=100_000, linger_s=0))
    for seq in range(1, count + 1):
        b.add(entry("/n", seq), 0, now=0.0)
    published: list[int] = []
    dropped: list[int] = []
    moves_left = iter(moves)
    while (batch := b.next_batch(now=1.0)) is not None:
        move = next(moves_left, "confirm")
        if move == "split" and len(batch.entries) > 1:  # SPLIT
            b.retry(*batch.split())
        elif move == "requeue":  # RETRY, or SEND after a lost connection
            b.retry(batch)
        elif move == "drop_first":  # DEAD_LETTER of a not well-formed entry, the rest re-sent
            dropped.append(batch.entries[0].seq)
            b.forget(batch.entries[:1])
            rest = Batch(batch.node, batch.shard)
            for e in batch.entries[1:]:
                rest.add(e)
            if rest.entries:
                b.retry(rest)
            else:
                b.release(batch.node)
        else:
            published += [e.seq for e in batch.entries]
            b.done(batch)
    assert b.idle and b.buffered == 0
    assert b.held_bytes == 0  # the reader's memory bound cannot drift through recovery
    assert published == sorted(published)
    assert sorted(published + dropped) == list(range(1, count + 1))


def test_open_batches_wait_for_a_reply_when_not_allowed() -> None:
    """The publisher's reply-driven rule: with IQs in flight an open batch keeps filling."""
    b = Batcher(Caps(max_entries=100, max_bytes=100_000, linger_s=0))
    b.add(entry("/a", 1), 0, now=0.0)
    assert b.next_batch(now=0.0, open_ok=False) is None  # something else in flight
    b.add(entry("/a", 2), 0, now=0.0)
    got = b.next_batch(now=0.0, open_ok=True)  # a reply came, or nothing in flight
    assert got is not None and [e.seq for e in got.entries] == [1, 2]
    assert got.read_at == 0.0 and b.held_bytes == sum(e.held for e in got.entries)
    full = Batcher(Caps(max_entries=2, max_bytes=100_000, linger_s=0))
    for seq in (1, 2, 3):
        full.add(entry("/a", seq), 0, now=1.0)
    first = full.next_batch(now=1.0, open_ok=False)  # a full batch goes regardless
    assert first is not None and [e.seq for e in first.entries] == [1, 2]
    full.done(first)
    assert full.held_bytes == entry("/a", 3).held
