"""The shard's envelope decoding (envelope.decode_fields) and the entry built from it."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from scalepub.envelope import Envelope, EnvelopeError, decode, decode_fields, encode
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


@given(envelopes, st.binary(max_size=40))
def test_a_payload_is_accepted_exactly_when_it_is_utf8(env: Envelope, payload: bytes) -> None:
    raw = encode(Envelope(env.node, env.seq, env.ts_ns, env.model, env.pk, env.fmt, payload))
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        with pytest.raises(EnvelopeError, match="payload is not UTF-8"):
            decode_fields(raw)
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
    (packed(v=2), "unsupported envelope version 2 (this reader: 1)"),
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


@given(envelopes.filter(lambda e: e.node.isascii() and e.node.isalnum()))
def test_entry_is_built_as_from_the_decoded_envelope(env: Envelope) -> None:
    env = Envelope("/n/" + env.node, env.seq, env.ts_ns, env.model, env.pk, env.fmt,
                   env.payload)
    raw = encode(env)
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
