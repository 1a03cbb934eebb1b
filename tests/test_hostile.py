"""Hostile or odd rows (docs/reliability.md §4): each has its documented outcome.

Unit and property tests build the real batch bytes (scalepub/xmpp/batch.py) and read them
the way the browser client does: parse the publish stanza, take the ``<batch>``'s text, parse
``"<entries>" + text + "</entries>"``. The Django-save and end-to-end tests use the session's
real Redis and ejabberd.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import msgpack
import pytest
import redis
from django.conf import settings as django_settings
from django.core import serializers
from django.db import connection, transaction
from django.test import override_settings
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from kitchensink.models import Keyed, Routed, Specimen
from prometheus_client import REGISTRY

import scalepub
from scalepub.backlog import backlogs
from scalepub.django.announce import NodeError
from scalepub.django.serialize import (
    ENTRY_OVERHEAD_BYTES,
    NOT_XML_CHARS,
    REPLACEMENT,
    TRUNCATION_RE,
    EntryTooLarge,
    serialize,
    wire_size,
)
from scalepub.nodes import InvalidNodeName, validate_node
from scalepub.producer import PendingEntry, StreamProducer
from scalepub.settings import PAYLOAD_FORMATS, Settings
from scalepub.sharding import Keys, shard_for
from scalepub.xmpp.batch import NS_BATCH, Batch, Entry, entry_part, publish_iq
from tests.e2e import Collector, PoolProcess, create_nodes
from tests.streams import StoredEntry, read_all

FORMATS = PAYLOAD_FORMATS  # every format the PAYLOAD_FORMAT setting accepts
# Fragments that broke or could break something: CDATA end, markup, XML-illegal characters,
# CR (normalised to LF by parsers), astral-plane emoji, a lone surrogate, non-characters.
HOSTILE = ["]]>", "]]", "]", ">", "<", "&", "&amp;", "<![CDATA[", "\x00", "\x01", "\x0b", "\x1f",
           "\r", "\r\n", "\t", "\n", "\ufffe", "\uffff", "\ufffd", "\ud800", "\udfff", "😀",
           "👩\u200d👩\u200d👧", "\U0010ffff", "é", "\u2028", "\x7f", "\x85", '"', "'", "\\u0000"]
ANY_CHAR = st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=())
ANY_TEXT = st.lists(st.one_of(st.text(ANY_CHAR, max_size=40), st.sampled_from(HOSTILE)),
                    max_size=60).map("".join)
HUGE_TEXT = st.tuples(st.sampled_from(["a", "é", "😀", "<&", "\x00", "]]>", "\r"]),
                      st.integers(0, 40_000), ANY_TEXT).map(lambda t: t[0] * t[1] + t[2])
LIMIT = 6000  # payload byte limit in the property tests (the default is ~127 kB)


def storable(text: str) -> str:
    """``text`` as the test database can store it: PostgreSQL refuses NUL in text columns
    (Django's DataError, before scalepub sees the row: tests/test_postgres.py), SQLite keeps it."""
    return text.replace("\x00", "") if connection.vendor == "postgresql" else text


def expected(text: str, fmt: str) -> str:
    """The documented transformation: XML replaces what it cannot carry, JSON is exact.

    Exact as JSON can be: surrogate code points next to each other read back as the one
    astral character they encode (no database hands out surrogates; hypothesis does).
    """
    return NOT_XML_CHARS.sub(REPLACEMENT, text) if fmt == "xml" else json_identity(text)


def json_identity(value: Any) -> Any:
    return json.loads(json.dumps(value))


# -- the client's view of real batch bytes ----------------------------------------------------

def batch_bytes(payloads: list[tuple[str, str, bytes]], node: str = "/kitchensink/x") -> bytes:
    """The publish IQ the shard would send for these (pk, fmt, payload) entries."""
    batch = Batch(node, 0)
    for seq, (pk, fmt, payload) in enumerate(payloads, 1):
        part = entry_part(node=node.encode(), seq=seq, stream_id=f"{seq}-0".encode(), ts_ns=seq,
                          model=b"kitchensink.specimen", pk=pk.encode(), fmt=fmt.encode(),
                          payload=payload)
        batch.add(Entry(f"{seq}-0".encode(), node, seq, seq, part, b""))
    return publish_iq("iq1", "pubsub.localhost", batch)


def client_entries(iq: bytes) -> list[ET.Element]:
    """What the browser does: the batch's text content, parsed inside <entries>."""
    batch = ET.fromstring(iq).find(f".//{{{NS_BATCH}}}batch")
    assert batch is not None
    return list(ET.fromstring(f"<entries>{batch.text or ''}</entries>"))


def field_value(entry: ET.Element, name: str) -> Any:
    """One field as the client reads it (Django XML: element text; JSON: parsed)."""
    if entry.get("fmt") == "json":
        return json.loads(entry.text or "")[0]["fields"][name]
    field = entry.find(f"django-objects/object/field[@name='{name}']")
    assert field is not None, ET.tostring(entry)
    return None if field.find("None") is not None else (field.text or "")


def payload_text(entry: ET.Element) -> str:
    """The payload recovered by the client, as text Django's deserializer takes."""
    if entry.get("fmt") == "json":
        return entry.text or ""
    [objects] = list(entry)
    return ET.tostring(objects, encoding="unicode")


def assert_text_outcome(got: str, original: str, fmt: str, too_big: bool) -> None:
    """Exactly the transformed text; or, only if the payload was too big, prefix + marker."""
    want = expected(original, fmt)
    mark = TRUNCATION_RE.search(got)
    if mark is None:
        assert got == want
        return
    assert too_big
    kept = got[:mark.start()]
    assert want.startswith(kept)
    assert len(kept) + int(mark.group(1)) == len(want)


# -- properties over field contents ----------------------------------------------------------

@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.one_of(ANY_TEXT, HUGE_TEXT), title=ANY_TEXT.map(lambda t: t[:200]),
       fmt=st.sampled_from(FORMATS))
def test_any_text_survives_the_batch_and_the_client(text: str, title: str, fmt: str) -> None:
    row = Specimen(pk=1, title=title, body=text)
    payload = serialize(row, fmt, max_bytes=LIMIT)
    assert wire_size(payload, fmt) <= LIMIT
    neighbour = serialize(Specimen(pk=2, body="neighbour"), fmt, max_bytes=LIMIT)
    entries = client_entries(batch_bytes([("1", fmt, payload), ("2", fmt, neighbour)]))
    assert [e.get("seq") for e in entries] == ["1", "2"]
    too_big = wire_size(serialize(row, fmt, max_bytes=10**9), fmt) > LIMIT
    assert_text_outcome(field_value(entries[0], "body"), text, fmt, too_big)
    assert_text_outcome(field_value(entries[0], "title"), title, fmt, too_big)
    assert field_value(entries[1], "body") == "neighbour"
    # Django reads the payload back with the same outcome (its XML reader strips the text).
    [obj] = serializers.deserialize(fmt, payload.decode())
    body = field_value(entries[0], "body")
    assert obj.object.body == (body.strip() if fmt == "xml" else body)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | ANY_TEXT
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_TEXT, inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(blob=st.one_of(st.none(), st.binary(max_size=3000)), data=json_values,
       day=st.dates(), at=st.datetimes(timezones=st.just(dt.UTC)),
       amount=st.decimals(min_value=-(10**19), max_value=10**19, places=10),
       token=st.uuids(), span=st.timedeltas(min_value=-dt.timedelta(days=10**6),
                                           max_value=dt.timedelta(days=10**6)),
       ratio=st.floats(allow_nan=False, allow_infinity=False),
       flag=st.one_of(st.none(), st.booleans()), fmt=st.sampled_from(FORMATS))
def test_odd_field_types_round_trip(blob: bytes | None, data: Any, day: dt.date,
                                    at: dt.datetime, amount: Decimal, token: uuid.UUID,
                                    span: dt.timedelta, ratio: float, flag: bool | None,
                                    fmt: str) -> None:
    row = Specimen(pk=3, blob=blob, data=data, day=day, at=at, amount=amount, token=token,
                   span=span, ratio=ratio, flag=flag)
    payload = serialize(row, fmt, max_bytes=10**9)
    [entry] = client_entries(batch_bytes([("3", fmt, payload)]))
    [obj] = serializers.deserialize(fmt, payload_text(entry))
    got = obj.object
    assert (bytes(got.blob) if got.blob is not None else None) == blob
    assert got.data == json_identity(data)
    assert (got.day, got.amount, got.token, got.ratio, got.flag) == (
        day, amount, token, ratio, flag)
    # DjangoJSONEncoder keeps milliseconds only (documented in docs/reliability.md §4).
    assert got.at == (at if fmt == "xml" else at.replace(microsecond=at.microsecond // 1000 * 1000))
    assert got.span == span


@settings(max_examples=300, deadline=None)
@given(pk=st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF,
                                exclude_categories=["Cs"]), min_size=1, max_size=30))
@example(pk="]]>")
@example(pk='a\t"b"\r\n<&>\x00\uffff😀')
def test_text_primary_keys_in_attributes(pk: str) -> None:
    """A text pk travels in the entry's and in Django's attributes."""
    payload = serialize(Keyed(code=pk, text="x"), "xml", max_bytes=10**6)
    [entry] = client_entries(batch_bytes([(pk, "xml", payload)]))
    want = NOT_XML_CHARS.sub(REPLACEMENT, pk)
    obj = entry.find("django-objects/object")
    assert obj is not None and obj.get("pk") == want
    assert entry.get("pk") == want


@given(name=st.one_of(ANY_TEXT, st.from_regex(r"\A/[a-z]+(/[A-Za-z0-9_.@:~+=-]+)*\n?\Z")))
def test_a_valid_node_name_is_carried_exactly(name: str) -> None:
    try:
        node = validate_node(name)
    except InvalidNodeName:
        return
    assert "\n" not in node
    [entry] = client_entries(batch_bytes([("1", "json", b"[]")], node=node))
    assert entry.get("node") == node


def test_node_names_invalid_cases() -> None:
    for bad in ("/a/b\n", "", "a/b", "/", "/a/\x00", "/a\ufffe", 42, None, "/" + "a" * 255):
        with pytest.raises(InvalidNodeName):
            validate_node(bad)


def test_text_beyond_the_limit_is_cut_with_a_marker() -> None:
    row = Specimen(pk=4, title="kept", body="😀" * 100_000)
    for fmt in FORMATS:
        payload = serialize(row, fmt, max_bytes=50_000)
        assert 40_000 < wire_size(payload, fmt) <= 50_000  # cut, but not needlessly
        [entry] = client_entries(batch_bytes([("4", fmt, payload)]))
        body = field_value(entry, "body")
        mark = TRUNCATION_RE.search(body)
        assert mark is not None and set(body[:mark.start()]) == {"😀"}
        assert mark.start() + int(mark.group(1)) == 100_000
        assert field_value(entry, "title") == "kept"


def test_payload_too_large_without_text_to_cut_is_refused() -> None:
    row = Specimen(pk=5, body="short", blob=b"\x00" * 100_000)
    with pytest.raises(EntryTooLarge, match="blob"):
        serialize(row, "xml", max_bytes=50_000)


# -- real Django saves -------------------------------------------------------------------------

def failures(reason: str) -> float:
    return REGISTRY.get_sample_value("scalepub_enqueue_failures_total", {"reason": reason}) or 0.0


def altered(reason: str) -> float:
    return REGISTRY.get_sample_value("scalepub_payloads_altered_total", {"reason": reason}) or 0.0


def entries_of(client: redis.Redis, settings: Settings, node: str, count: int,
               timeout: float = 10.0) -> list[StoredEntry]:
    """The node's stream entries, once ``count`` are there (direct delivery appends at once)."""
    deadline = time.monotonic() + timeout
    while True:
        got = [e for e in read_all(client, settings) if e.env.node == node]
        if len(got) >= count or time.monotonic() > deadline:
            return sorted(got, key=lambda e: e.env.seq)
        time.sleep(0.05)


# Both deliveries: ``direct`` appends on commit, ``outbox`` (the default) serializes inside
# the save's transaction and a relay thread appends.
DELIVERIES = pytest.mark.parametrize("delivery", ["scalepub_django", "outbox_django"])


@pytest.mark.stack
@pytest.mark.django_db(transaction=True)
@DELIVERIES
def test_node_rules_that_fail_fail_the_save(
    delivery: str, request: pytest.FixtureRequest, redis_client: redis.Redis
) -> None:
    """A node rule that raises or names an invalid node fails the save: never a silent drop."""
    scalepub_django: Settings = request.getfixturevalue(delivery)
    chan = f"/kitchensink/Routed/{uuid.uuid4().hex[:8]}"
    before = failures("node")
    rows = [Routed.objects.create(route=chan, note=str(i)) for i in range(3)]
    for route in ("raise", "has space", chan + "\n", "/" + "x" * 300):
        with pytest.raises(NodeError, match=r"kitchensink\.Routed pk=\d+"):
            Routed.objects.create(route=route)
    with pytest.raises(NodeError, match="route_node raised RuntimeError"), transaction.atomic():
        Routed.objects.create(route=chan, note="rolled back with its transaction")
        Routed.objects.create(route="raise")
    with pytest.raises(NodeError):  # a mixed list publishes none of its rows
        scalepub.publish_many([rows[1], Routed(pk=rows[0].pk, route="raise")])
    assert Routed.objects.count() == len(rows)
    got = entries_of(redis_client, scalepub_django, chan, len(rows))
    assert failures("node") == before + 6
    assert [e.env.seq for e in got] == [1, 2, 3]
    assert [e.env.pk for e in got] == [str(r.pk) for r in rows]


@pytest.mark.stack
@pytest.mark.django_db(transaction=True)
@DELIVERIES
def test_hostile_rows_saved_for_real(delivery: str, request: pytest.FixtureRequest,
                                     redis_client: redis.Redis) -> None:
    scalepub_django: Settings = request.getfixturevalue(delivery)
    chan = uuid.uuid4().hex[:8]
    node = f"/kitchensink/Specimen/{chan}"
    texts = [storable(t) for t in ["plain", "nul\x00 vt\x0b", "cr\r\nlf", "😀 astral \U0001f9ea",
                                   "cdata ]]> end", "\ufffe\uffff", "x" * 300_000]]
    before_fail, before_cut, before_chars = (
        failures("serialize"), altered("truncated"), altered("xml_chars"))
    rows = [Specimen.objects.create(channel=chan, body=t, data={"t": t[:100]}) for t in texts]
    Specimen.objects.create(channel=chan, body="too big", blob=b"\xff" * 200_000)
    rows.append(Specimen.objects.create(channel=chan, body="after", data={"t": "after"}))
    got = entries_of(redis_client, scalepub_django, node, len(rows))
    assert [e.env.pk for e in got] == [str(r.pk) for r in rows]  # the blob row is not sent
    assert failures("serialize") == before_fail + 1
    assert altered("truncated") == before_cut + 1
    assert altered("xml_chars") == before_chars + 2
    limit = scalepub_django.batch_max_bytes - ENTRY_OVERHEAD_BYTES
    entries = client_entries(batch_bytes([(e.env.pk, "xml", e.env.payload) for e in got], node))
    for entry, text in zip(entries, [*texts, "after"], strict=True):
        body = field_value(entry, "body")
        if len(text) > limit:
            mark = TRUNCATION_RE.search(body)
            assert mark is not None and text.startswith(body[:mark.start()])
        else:
            assert body == expected(text, "xml")
        assert json.loads(field_value(entry, "data")) == {"t": text[:100]}
    assert all(len(e.env.payload) <= limit for e in got)


# -- end to end: a burst through a real pool ---------------------------------------------------

class PayloadCollector(Collector):
    """The independent subscriber, keeping each received entry element too."""

    def __init__(self, env: dict[str, str], nodes: list[str]) -> None:
        super().__init__(env, nodes)
        self.elements: list[ET.Element] = []

    def _on_publish(self, msg: Any) -> None:
        super()._on_publish(msg)
        payload = msg["pubsub_event"]["items"]["item"]["payload"]
        if payload is not None:
            with self._lock:
                self.elements.extend(ET.fromstring(f"<entries>{payload.text or ''}</entries>"))


def foreign(node: str, pk: str, payload: bytes) -> PendingEntry:
    """An entry from a producer that broke the protocol (not the Django side)."""
    return PendingEntry(node, time.time_ns(), "foreign.raw", pk, "xml", payload)


@pytest.mark.stack
@pytest.mark.timeout(240)
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("delivery", "fmt"), [("scalepub_django", "xml"),
                                                ("outbox_django", "json")])
def test_burst_of_hostile_rows_through_the_pool(
    delivery: str, fmt: str, request: pytest.FixtureRequest, stack: Any,
    redis_client: redis.Redis, tmp_path: Any
) -> None:
    scalepub_django: Settings = request.getfixturevalue(delivery)
    with override_settings(SCALEPUB={**django_settings.SCALEPUB, "PAYLOAD_FORMAT": fmt}):
        _burst(scalepub_django, fmt, stack, redis_client, tmp_path)


def _burst(scalepub_django: Settings, fmt: str, stack: Any, redis_client: redis.Redis,
           tmp_path: Any) -> None:
    chan = uuid.uuid4().hex[:8]
    node = f"/kitchensink/Specimen/{chan}"
    create_nodes(stack.env, [node])
    collector = PayloadCollector(stack.env, [node]).start()
    pool = PoolProcess(scalepub_django, tmp_path / "pool.log", "--shards", "4")
    producer = StreamProducer(scalepub_django)
    hostile: dict[str, str] = {}
    try:
        first = Specimen.objects.create(channel=chan, body="first, before the burst")
        hostile[str(first.pk)] = first.body
        assert collector.wait_for(lambda got: len(got) >= 1, 60), pool.output()[-3000:]
        bodies = _burst_bodies()
        for i, body in enumerate(bodies):
            if i % 50 == 25:  # a broken producer's entries between the rows
                producer.enqueue([foreign(node, f"nul{i}", b"<p>\x00</p>"),
                                  foreign(node, f"ffff{i}", "<p>\uffff</p>".encode()),
                                  foreign(node, f"badutf{i}", b"<p>\xed\xa0\x80</p>"),
                                  foreign(node, f"big{i}", b"<p>" + b"x" * 200_000 + b"</p>")])
            if i % 40 == 7:
                with pytest.raises(NodeError):  # fails its node rule: the save fails
                    Routed.objects.create(route="raise")
            row = Specimen.objects.create(channel=chan, body=body)
            hostile[str(row.pk)] = body
        stored = entries_of(redis_client, scalepub_django, node, len(bodies) + 17)
        dead_seqs = {e.env.seq for e in stored if e.env.model == "foreign.raw"}
        live = len(stored) - len(dead_seqs)
        assert collector.wait_for(lambda got: len({g.seq for g in got}) >= live, 120), (
            len(collector.received), pool.output()[-3000:])
        assert pool.stop() == 0, pool.output()[-3000:]
        assert all(b.lag == 0 and b.pending == 0
                   for b in backlogs(redis_client, Keys(scalepub_django.key_prefix)))
    finally:
        pool.kill()
        collector.stop()
    # Every neighbour arrived, in order, exactly the stream's entries minus the dead letters.
    first_seen = list(dict.fromkeys(g.seq for g in collector.by_node()[node]))
    assert first_seen == sorted(s for s in (e.env.seq for e in stored) if s not in dead_seqs)
    # Each hostile row arrived with its documented transformation.
    for entry in collector.elements:
        assert entry.get("fmt") == fmt
        body = hostile[entry.get("pk", "")]
        assert_text_outcome(field_value(entry, "body"), body, fmt, len(body) > 100_000)
    assert sum(bool(TRUNCATION_RE.search(field_value(e, "body"))) for e in collector.elements
               ) >= 8
    # The broken entries sit in the dead-letter stream, each with its reason.
    dead: list[tuple[bytes, dict[bytes, bytes]]] = redis_client.xrange(  # type: ignore[assignment]
        Keys(scalepub_django.key_prefix).dead(shard_for(node, scalepub_django.shards)))
    reasons = {msgpack.unpackb(f[b"e"])["pk"]: f[b"reason"].decode() for _, f in dead}
    assert len(reasons) == len(dead_seqs) == 16
    why = {"nul": "not well-formed", "ffff": "not well-formed", "badutf": "not UTF-8",
           "big": "larger than batch_max_bytes"}
    for pk, reason in reasons.items():
        assert why[pk.rstrip("0123456789")] in reason, (pk, reason)


def _burst_bodies() -> list[str]:
    kinds: list[Callable[[int], str]] = [
        lambda i: f"normal row {i}",
        lambda i: f"control \x00\x01\x0b\x1f chars {i}",
        lambda i: f"crlf\r\nline {i}\r",
        lambda i: f"emoji 😀👩\u200d👩\u200d👧 \U0010fffd {i}",
        lambda i: f"cdata ]]> ]]]]> <![CDATA[ {i}",
        lambda i: f"non-characters \ufffe\uffff {i}",
        lambda i: f"markup <b>&amp;</b> {i}",
        lambda i: "huge " + "é" * 150_000,
    ]
    return [storable(kinds[i % len(kinds)](i)) if i % 3 == 0 else f"normal {i}"
            for i in range(200)]


def test_several_text_fields_are_cut_when_one_is_not_enough() -> None:
    for fmt in FORMATS:
        base = wire_size(serialize(Specimen(pk=9, token=uuid.UUID(int=9)), fmt), fmt)
        row = Specimen(pk=9, token=uuid.UUID(int=9), title="a" * 200, body="b" * 200)
        payload = serialize(row, fmt, max_bytes=base + 150)
        assert wire_size(payload, fmt) <= base + 150
        [entry] = client_entries(batch_bytes([("9", fmt, payload)]))
        for name, char in (("title", "a"), ("body", "b")):
            value = field_value(entry, name)
            mark = TRUNCATION_RE.search(value)
            assert mark is not None, (name, value)
            assert value[:mark.start()] == char * (200 - int(mark.group(1)))
