"""Node names from user data: what validate_node accepts, and that it travels unchanged.

The readable name is the node id (scalepub/nodes.py, docs/protocol.md "Node names"): these
tests check the rule and that any name it accepts comes out of the shard's publish IQ, and
out of a subscriber's parse of it, exactly as it went in.
"""

from __future__ import annotations

import asyncio
import uuid
import xml.etree.ElementTree as ET

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from scalepub.nodes import MAX_NODE_BYTES, InvalidNodeName, default_node, validate_node
from scalepub.settings import Settings
from scalepub.sharding import shard_for
from scalepub.xmpp.batch import NS_BATCH, NS_PUBSUB, Batch, Entry, entry_part, publish_iq
from scalepub.xmpp.link import Reply, XmppLink
from scalepub.xmpp.subscriber import unpack
from tests.e2e import Collector, create_nodes
from tests.stack import Stack

USER_DATA = [
    "/twitter/Tweet/José Ñ", "/twitter/Tweet/mary jane", "/twitter/Tweet/Jose\u0301",
    "/a/100% a%2Fb+c", "/a/it's \"quoted\"", "/a/b&c<d>e]]>", "/a/😀 日本語 עברית",
    "/a/ leading and trailing ", "/a//empty/segment/", "/a/x\u200dy\ufeff", "/x",
    "/" + "é" * 127,  # 255 bytes
]


def test_default_node_is_the_seed_name() -> None:
    assert default_node("twitter", "Tweet") == "/twitter/Tweet"


@pytest.mark.parametrize("node", ["/twitter/Tweet", "/twitter/Tweet/42", *USER_DATA])
def test_names_from_user_data_are_valid_and_unchanged(node: str) -> None:
    assert validate_node(node) is node


@pytest.mark.parametrize(("node", "why"), [
    ("", "must start with /"),
    ("/", "must start with /"),
    ("twitter/Tweet", "must start with /"),
    ("/a/b\n", "U+000A at position 4"),
    ("/a\tb", "U+0009"),
    ("/a\rb", "U+000D"),
    ("/a\x00", "U+0000"),
    ("/a\x7f", "U+007F"),
    ("/a\x85", "U+0085"),
    ("/a\u2028", "U+2028"),
    ("/a\ud800", "U+D800"),
    ("/a\ufffe", "U+FFFE"),
    ("/a\U0010ffff", "U+10FFFF"),
    ("/a\ufdd0", "U+FDD0"),
    ("/" + "a" * MAX_NODE_BYTES, f"256 bytes of UTF-8, more than {MAX_NODE_BYTES}"),
    ("/" + "é" * 128, "257 bytes"),
    (42, "must be a str, got int"),
    (None, "must be a str, got NoneType"),
    (b"/a", "must be a str, got bytes"),
])
def test_names_that_cannot_work_are_refused_saying_why(node: object, why: str) -> None:
    with pytest.raises(InvalidNodeName, match="node name") as caught:
        validate_node(node)
    assert why in str(caught.value)


def test_a_long_name_is_shown_cut_in_the_error() -> None:
    with pytest.raises(InvalidNodeName) as caught:
        validate_node("/" + "x" * 10_000)
    assert len(str(caught.value)) < 200


def _publish_iq(node: str, entries: int = 2) -> bytes:
    batch = Batch(node, shard_for(node, 8))
    for seq in range(1, entries + 1):
        part = entry_part(node=node.encode(), seq=seq, stream_id=f"{seq}-0".encode(), ts_ns=seq,
                          model=b"twitter.tweet", pk=str(seq).encode(), fmt=b"json",
                          payload=b'[{"pk": 1}]')
        batch.add(Entry(f"{seq}-0".encode(), node, seq, seq, part, b""))
    return publish_iq("iq1", "pubsub.localhost", batch)


NAMES = st.text(min_size=1, max_size=120).map(lambda s: "/" + s)


@given(node=NAMES)
@example(node="/twitter/Tweet/José Ñ")
@example(node='/a/"&<>\'')
@example(node="/a/]]>")
@example(node="/a/\t")
def test_any_valid_name_gives_well_formed_xml_carrying_it_exactly(node: str) -> None:
    """Round trip: name → publish IQ → parsed by a server and by a subscriber → same name."""
    try:
        validate_node(node)
    except InvalidNodeName:
        return
    iq = ET.fromstring(_publish_iq(node))  # raises if not well-formed
    publish = iq.find(f"{{{NS_PUBSUB}}}pubsub/{{{NS_PUBSUB}}}publish")
    assert publish is not None and publish.get("node") == node
    batch = publish.find(f"*/{{{NS_BATCH}}}batch")
    assert batch is not None and batch.get("node") == node
    entries = unpack(batch, 0)
    assert [(e.node, e.seq) for e in entries] == [(node, 1), (node, 2)]



@pytest.mark.stack
def test_ejabberd_takes_every_kind_of_valid_name(settings_for: Settings, stack: Stack) -> None:
    """The shard's own publish IQs to real ejabberd; an independent subscriber gets each name."""
    tag = uuid.uuid4().hex[:6]
    names = [f"{name} {tag}" for name in USER_DATA[:-1]]
    names.append(f"/{tag}" + "é" * ((MAX_NODE_BYTES - 7) // 2))  # 255 bytes with the tag
    assert all(validate_node(n) for n in names)
    create_nodes(stack.env, names)
    collector = Collector(stack.env, names).start()
    try:
        replies = asyncio.run(_publish(settings_for, names))
        assert [r.reason for r in replies if not r.ok] == []
        assert collector.wait_for(lambda got: len(got) >= 2 * len(names), 30), collector.received
        assert {n: [g.seq for g in got] for n, got in collector.by_node().items()} == {
            n: [1, 2] for n in names}
    finally:
        collector.stop()


async def _publish(settings: Settings, names: list[str]) -> list[Reply]:
    pending: dict[str, asyncio.Future[Reply]] = {}
    link = XmppLink(settings, "test-nodes", pending.__contains__,
                    lambda reply: pending.pop(reply.iq_id).set_result(reply), lambda: None)
    await link.connect()
    try:
        loop = asyncio.get_running_loop()
        for i, name in enumerate(names):
            pending[f"n{i}"] = loop.create_future()
            link.send(_publish_iq(name).replace(b'id="iq1"', f'id="n{i}"'.encode(), 1))
        return list(await asyncio.wait_for(asyncio.gather(*pending.values()), 30))
    finally:
        await link.close()
