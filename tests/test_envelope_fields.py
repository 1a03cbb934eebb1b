"""The shard's envelope decoding (envelope.decode_fields) and the entry built from it."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from scalepub.envelope import (
    Envelope,
    EnvelopeError,
    decode,
    decode_fields,
    decode_wire,
    encode,
)
from scalepub.nodes import InvalidNodeName
from scalepub.shard import reader
from scalepub.shard.reader import build_entry
from scalepub.xmpp.batch import entry_part

texts = st.text(max_size=40)
envelopes = st.builds(
    Envelope, node=st.text(min_size=1, max_size=40), seq=st.integers(1, 2**63 - 1),
    ts_ns=st.integers(0, 2**63 - 1), model=texts, pk=texts,
    fmt=st.sampled_from(["xml", "json"]), payload=texts.map(str.encode),
)


@given(envelopes)
def test_fields_are_the_envelopes_as_bytes(env: Envelope) -> None:
    assert decode_fields(encode(env)) == (
        env.node.encode(), env.seq, env.ts_ns, env.model.encode(), env.pk.encode(),
        env.fmt.encode(), env.payload)


@given(envelopes, st.binary(max_size=40), st.sampled_from([1, 2]))
def test_a_payload_is_accepted_exactly_when_it_is_utf8(env: Envelope, payload: bytes,
                                                       version: int) -> None:
    raw = encode(Envelope(env.node, env.seq, env.ts_ns, env.model, env.pk, env.fmt, payload),
                 version)
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        what = "payload" if version == 1 else "envelope field 'w'"
        for decoder in (decode_fields, decode_wire):
            with pytest.raises(EnvelopeError, match=f"{what} is not UTF-8"):
                decoder(raw)
    else:
        assert decode_fields(raw)[6] == payload


GOOD = {"v": 1, "seq": 7, "node": "/a/b", "ts": 5, "model": "a.b", "pk": "1", "fmt": "xml",
        "payload": b"<p/>"}


def packed(**changes: object) -> bytes:
    fields = {k: v for k, v in {**GOOD, **changes}.items() if v is not None}
    return bytes(msgpack.packb(fields, use_bin_type=True))


@pytest.mark.parametrize(("data", "message"), [
    (b"", "not msgpack"),
    (b"\xc1", "not msgpack"),
    (packed() + b"\x00", "not msgpack: unpack(b) received extra data"),
    (msgpack.packb([1, 2]), "envelope is not a map: list"),
    (msgpack.packb(7), "envelope is not a map: int"),
    (packed(v=3), "unsupported envelope version 3 (this reader: 1, 2)"),
    (packed(v=2), "envelope lacks field 'w'"),
    (packed(v=None), "unsupported envelope version None"),
    (packed(payload=None), "envelope lacks field 'payload'"),
    (packed(node=None), "envelope lacks field 'node'"),
    (packed(seq=1.5), "envelope field 'seq' is not an int: float"),
    (packed(ts="now"), "envelope field 'ts' is not an int: bytes"),
    (packed(node=5), "envelope field 'node' is not text: int"),
    (packed(pk=None, model=["a"]), "envelope lacks field 'pk'"),
    (packed(model=["a"]), "envelope field 'model' is not text: list"),
    (packed(fmt={"x": 1}), "envelope field 'fmt' is not text: dict"),
    (packed(payload=b"\xff<p/>"), "payload is not UTF-8"),
    (packed(pk=b"\xed\xa0\x80"), "envelope field 'pk' is not UTF-8"),
])
def test_malformed_envelopes_say_what_is_wrong(data: bytes, message: str) -> None:
    with pytest.raises(EnvelopeError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        decode_fields(data)


def test_unknown_keys_are_ignored_and_non_ascii_text_accepted() -> None:
    raw = packed(extra="new in 1.x", node="/a/é", pk="ñ", payload="ü".encode())
    assert decode_fields(raw) == ("/a/é".encode(), 7, 5, b"a.b", "ñ".encode(), b"xml",
                                  "ü".encode())


@given(envelopes.filter(lambda e: e.node.isascii() and e.node.isalnum()),
       st.sampled_from([1, 2]))
def test_entry_is_built_as_from_the_decoded_envelope(env: Envelope, version: int) -> None:
    env = Envelope("/n/" + env.node, env.seq, env.ts_ns, env.model, env.pk, env.fmt,
                   env.payload)
    raw = encode(env, version)
    entry = build_entry(b"1-2", raw, {})
    d = decode(raw)
    # The envelope itself is not kept (a dead letter reads it back from the stream).
    assert (entry.stream_id, entry.node, entry.seq, entry.ts_ns, entry.raw) == (
        b"1-2", d.node, d.seq, d.ts_ns, b"")
    assert entry.part == entry_part(node=d.node.encode(), seq=d.seq, stream_id=b"1-2",
                                    ts_ns=d.ts_ns, model=d.model.encode(), pk=d.pk.encode(),
                                    fmt=d.fmt.encode(), payload=d.payload)


def test_node_names_are_validated_once_and_the_cache_is_bounded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    nodes: dict[bytes, str] = {}
    with pytest.raises(InvalidNodeName):
        build_entry(b"1-1", packed(node="no slash"), nodes)
    assert nodes == {}
    monkeypatch.setattr(reader, "NODE_CACHE_MAX", 2)
    for i in range(5):
        assert build_entry(b"1-1", packed(node=f"/n/{i}"), nodes).node == f"/n/{i}"
        assert len(nodes) <= 2
    assert nodes[b"/n/4"] == "/n/4"


@given(envelopes.map(lambda e: Envelope("/" + e.node, e.seq, e.ts_ns, e.model, e.pk, e.fmt,
                                         e.payload)))
def test_both_versions_give_the_same_entry_bytes(env: Envelope) -> None:
    """An entry written before the upgrade (version 1) and after (version 2) goes out alike:
    subscribers see the same bytes, and a resend of either is the same item."""
    try:
        old = build_entry(b"9-1", encode(env, 1), {})
    except InvalidNodeName:
        return
    new = build_entry(b"9-1", encode(env, 2), {})
    assert (new.part, new.node, new.seq, new.ts_ns) == (old.part, old.node, old.seq, old.ts_ns)
    assert decode_wire(encode(env, 1)) == decode_wire(encode(env, 2))


def test_a_tail_with_a_raw_cdata_end_cannot_close_the_batch_early() -> None:
    """Any Redis writer may put a version 2 envelope in a stream: its XML still stays inside
    the batch's CDATA section."""
    raw = packed(v=2, payload=None, w=b'" ts="5" model="a.b" pk="1" fmt="xml">]]></batch>'
                                    b"</entry>")
    part = build_entry(b"1-1", raw, {}).part
    assert b"]]></batch>" not in part
    assert part.replace(b"]]]]><![CDATA[>", b"]]>").endswith(b">]]></batch></entry>")
