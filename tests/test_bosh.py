"""The load tests' BOSH client: framing, rid/sid, terminate, retries and reconnect (fake
transport), then against the real ejabberd of the test stack (plain blocking HTTP)."""

from __future__ import annotations

import time
import uuid
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Iterator
from typing import Any

import pytest

from loadtest.bosh import (
    NS_HTTPBIND,
    BoshClient,
    BoshError,
    BoshTerminated,
    HTTPTransport,
    Session,
    TransportError,
    pubsub_items,
)
from loadtest.entries import Histogram, NodeTrack, Tracker, entries_of_batch, scan_body
from loadtest.leanhttp import LeanTransport
from tests.httpstub import Handler, serving
from tests.stack import Stack

B = f"xmlns='{NS_HTTPBIND}'"
STREAM = "xmlns:stream='http://etherx.jabber.org/streams'"
SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
CREATED = (f"<body {B} {STREAM} sid='s1' wait='7' hold='1' requests='2' inactivity='30'>"
           f"<stream:features><mechanisms xmlns='{SASL}'><mechanism>ANONYMOUS</mechanism>"
           f"<mechanism>PLAIN</mechanism></mechanisms></stream:features></body>")
SUCCESS = f"<body {B}><success xmlns='{SASL}'/></body>"
RESTARTED = (f"<body {B} {STREAM}><stream:features><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/>"
             "</stream:features></body>")
EMPTY = f"<body {B}/>"


def bound(iq_id: str = "lt1") -> str:
    return (f"<body {B}><iq xmlns='jabber:client' type='result' id='{iq_id}'>"
            "<bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><jid>a@anon/r</jid></bind></iq></body>")


class Scripted:
    """A transport that records requests and answers from a script (bytes or exceptions)."""

    def __init__(self, *answers: str | Exception) -> None:
        self.answers: deque[str | Exception] = deque(answers)
        self.sent: list[ET.Element] = []

    def post(self, body: bytes, timeout: float) -> bytes:
        self.sent.append(ET.fromstring(body))
        answer = self.answers.popleft()
        if isinstance(answer, Exception):
            raise answer
        return answer.encode()


def find(element: ET.Element, path: str) -> ET.Element:
    """``element.find(path)``, which the test expects to be there."""
    found = element.find(path)
    assert found is not None, path
    return found


def connected(*more: str | Exception) -> tuple[BoshClient, Scripted]:
    transport = Scripted(CREATED, SUCCESS, RESTARTED, bound(), EMPTY, *more)
    client = BoshClient(transport, "anon.example", wait=7, rid=1000, sleep=lambda _s: None)
    assert client.connect(resource="r") == "a@anon/r"
    return client, transport


# ---------------------------------------------------------------------------- framing


def test_session_creation_and_login_are_framed_per_xep_0124_and_0206() -> None:
    client, t = connected()
    create, auth, restart, bind, presence = t.sent
    assert create.tag == f"{{{NS_HTTPBIND}}}body"
    assert create.get("rid") == "1000" and create.get("sid") is None
    assert create.get("to") == "anon.example" and create.get("wait") == "7"
    assert create.get("hold") == "1" and create.get("{urn:xmpp:xbosh}version") == "1.0"
    assert [r.get("rid") for r in t.sent] == ["1000", "1001", "1002", "1003", "1004"]
    assert {r.get("sid") for r in t.sent[1:]} == {"s1"}
    assert auth[0].tag == f"{{{SASL}}}auth" and auth[0].get("mechanism") == "ANONYMOUS"
    assert restart.get("{urn:xmpp:xbosh}restart") == "true" and len(restart) == 0
    assert find(bind[0], "{urn:ietf:params:xml:ns:xmpp-bind}bind/"
                         "{urn:ietf:params:xml:ns:xmpp-bind}resource").text == "r"
    assert presence[0].tag == f"{{{NS_HTTPBIND}}}presence"
    assert client.session is not None and client.session.wait == 7


def test_plain_login_sends_authzid_less_credentials() -> None:
    t = Scripted(CREATED, SUCCESS, RESTARTED, bound(), EMPTY)
    BoshClient(t, "example", rid=5).connect("pub", "s3cret")
    import base64
    assert t.sent[1][0].get("mechanism") == "PLAIN"
    credentials = t.sent[1][0].text
    assert credentials is not None
    assert base64.b64decode(credentials) == b"\0pub\0s3cret"


def test_refused_sasl_names_the_condition() -> None:
    t = Scripted(CREATED, f"<body {B}><failure xmlns='{SASL}'><not-authorized/></failure></body>")
    with pytest.raises(BoshError, match="not-authorized"):
        BoshClient(t, "example").connect("pub", "wrong")


def test_subscribe_sends_all_iqs_in_one_request_and_waits_for_every_result() -> None:
    results = "".join(f"<iq xmlns='jabber:client' type='result' id='lt{i}'/>" for i in (2, 3))
    client, t = connected(f"<body {B}><iq xmlns='jabber:client' type='result' id='lt2'/></body>",
                          f"<body {B}><iq xmlns='jabber:client' type='result' id='lt3'/></body>")
    client.subscribe("pubsub.example", ["/a", "/b"])
    sub, poll = t.sent[-2:]
    assert [find(iq, "{http://jabber.org/protocol/pubsub}pubsub/"
                     "{http://jabber.org/protocol/pubsub}subscribe").attrib for iq in sub] == [
        {"node": "/a", "jid": "a@anon/r"}, {"node": "/b", "jid": "a@anon/r"}]
    assert len(poll) == 0  # the second result came on an empty poll
    assert results  # both ids answered


def test_an_iq_error_raises_with_its_condition() -> None:
    client, _ = connected(f"<body {B}><iq xmlns='jabber:client' type='error' id='lt2'><error "
                          "type='cancel'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>"
                          "</error></iq></body>")
    with pytest.raises(BoshError, match="item-not-found"):
        client.subscribe("pubsub.example", ["/missing"])


def test_stanzas_received_while_waiting_for_an_iq_stay_in_the_inbox() -> None:
    event = "<message xmlns='jabber:client'><body>hi</body></message>"
    client, _ = connected(f"<body {B}>{event}<iq xmlns='jabber:client' type='result' id='lt2'/>"
                          "</body>")
    client.subscribe("pubsub.example", ["/a"])
    assert [s.findtext("{jabber:client}body") for s in client.poll()] == ["hi"]


# ---------------------------------------------------------------------------- rid, retries, end


def test_a_transport_error_is_retried_with_the_same_rid_then_the_rid_moves_on() -> None:
    client, t = connected(TransportError("reset"), TransportError("reset"), EMPTY, EMPTY)
    client.poll()
    client.poll()
    assert [r.get("rid") for r in t.sent[-4:]] == ["1005", "1005", "1005", "1006"]
    assert client.retried == 2


def test_retries_are_bounded() -> None:
    client, _ = connected(*[TransportError("down")] * 4)
    with pytest.raises(TransportError):
        client.poll()


@pytest.mark.parametrize("answer, condition", [
    (f"<body {B} type='terminate' condition='item-not-found'/>", "item-not-found"),
    (TransportError("HTTP 404", 404), "item-not-found"),
    (f"<body {B} {STREAM}><stream:error><conflict xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
     "</stream:error></body>", "conflict"),
])
def test_a_terminated_session_raises_and_forgets_its_sid(answer: str | Exception,
                                                         condition: str) -> None:
    client, _ = connected(answer)
    with pytest.raises(BoshTerminated) as info:
        client.poll_raw()
    assert info.value.condition == condition
    assert client.session is None
    with pytest.raises(BoshError, match="no session"):
        client.poll()


def test_reconnect_is_a_new_session_with_a_new_login() -> None:
    client, t = connected(f"<body {B} type='terminate' condition='remote-connection-failed'/>")
    with pytest.raises(BoshTerminated):
        client.poll()
    t.answers.extend([CREATED.replace("s1", "s2"), SUCCESS, RESTARTED, bound("lt2"), EMPTY])
    client.connect(resource="r")
    assert t.sent[-5].get("sid") is None and t.sent[-1].get("sid") == "s2"


def test_close_sends_terminate() -> None:
    client, t = connected(EMPTY)
    client.close()
    assert t.sent[-1].get("type") == "terminate" and client.session is None


def test_features_that_come_after_the_session_creation_answer_are_polled_for() -> None:
    bare = f"<body {B} sid='s9' wait='7' hold='1' requests='2' inactivity='30'/>"
    features = CREATED[CREATED.index("<stream:features>"):CREATED.index("</body>")]
    t = Scripted(bare, f"<body {B} {STREAM}>{features}</body>", SUCCESS, RESTARTED, bound(), EMPTY)
    client = BoshClient(t, "anon.example", rid=1)
    assert client.connect() == "a@anon/r"
    assert len(t.sent[1]) == 0 and t.sent[1].get("sid") == "s9"  # an empty poll for them


def test_poll_raw_refuses_while_stanzas_wait_in_the_inbox() -> None:
    client, _ = connected()
    client.inbox.append(ET.Element("x"))
    with pytest.raises(BoshError, match="inbox"):
        client.poll_raw()


def test_an_answer_that_is_not_a_bosh_body_is_an_error() -> None:
    client, _ = connected("<html>proxy error</html>")
    with pytest.raises(BoshError, match="not a BOSH body"):
        client.poll()


@pytest.fixture
def http_server() -> Iterator[str]:
    with serving() as address:
        yield address


# Both transports the BOSH client runs on: http.client's, and the load test's lean one.
TRANSPORTS = [pytest.param(HTTPTransport, id="http.client"), pytest.param(LeanTransport, id="lean")]


@pytest.mark.parametrize("transport_type", TRANSPORTS)
def test_a_transport_keeps_the_connection_and_retries_a_dropped_one_with_the_same_rid(
        http_server: str, transport_type: Any) -> None:
    Handler.answers.extend([(200, EMPTY.encode(), {}), (0, b"", {}), (200, EMPTY.encode(), {})])
    transport = transport_type(http_server)
    client = BoshClient(transport, "x", rid=7, sleep=lambda _s: None)
    client.session = Session("s", 5, 1, 2, 30)
    client.poll()
    client.poll()  # the server drops it once: resent with the same rid on a new connection
    assert [ET.fromstring(b).get("rid") for _port, b in Handler.seen] == ["7", "8", "8"]
    assert client.retried == 1
    assert len({port for port, _body in Handler.seen}) == 2  # a new connection after the drop
    transport.close()


@pytest.mark.parametrize("transport_type", TRANSPORTS)
def test_http_404_ends_the_session(http_server: str, transport_type: Any) -> None:
    Handler.answers.append((404, b"", {}))
    client = BoshClient(transport_type(http_server), "x", rid=1)
    client.session = Session("s", 5, 1, 2, 30)
    with pytest.raises(BoshTerminated) as info:
        client.poll()
    assert info.value.condition == "item-not-found"


# ---------------------------------------------------------------------------- entries


def entry(node: str, seq: int, ts: int, text: str = "x") -> str:
    return (f'<entry node="{node}" seq="{seq}" id="1-{seq}" ts="{ts}" model="t.t" pk="{seq}" '
            f'fmt="xml"><o>{text}</o></entry>')


def body_with(fragment: str, cdata: bool) -> bytes:
    text = f"<![CDATA[{fragment}]]>" if cdata else fragment.replace("&", "&amp;").replace(
        "<", "&lt;").replace(">", "&gt;")
    return (f"<body {B}><message xmlns='jabber:client' from='pubsub.x'><event "
            "xmlns='http://jabber.org/protocol/pubsub#event'><items node='/n'><item id='1-2'>"
            f"<batch xmlns='urn:scalepub:1'>{text}</batch></item></items></event></message>"
            "</body>").encode()


@pytest.mark.parametrize("cdata", [True, False])
def test_scan_finds_entries_in_cdata_and_in_escaped_text(cdata: bool) -> None:
    raw = body_with(entry("/n", 1, 10) + entry("/n", 2, 20), cdata)
    assert scan_body(raw) == [(b"/n", b"1", b"10"), (b"/n", b"2", b"20")]


def test_scan_gives_up_when_a_row_holds_entry_markup_and_the_tree_path_is_exact() -> None:
    fragment = entry("/n", 1, 10, text="&lt;entry node=&quot;/evil&quot;")
    raw = body_with(fragment, cdata=True)
    assert scan_body(raw) is None
    stanza = BoshClient(Scripted(), "x").parse(raw)[0]
    [(node, item)] = list(pubsub_items(stanza, "pubsub.x"))
    assert list(pubsub_items(stanza, "pubsub.y")) == []  # not from the service: a forgery
    assert node == "/n" and entries_of_batch(item[0]) == [(b"/n", b"1", b"10")]


def test_node_track_counts_gaps_late_fills_and_duplicates() -> None:
    track = NodeTrack()
    assert [track.see(s) for s in (1, 2, 4, 3, 3, 6)] == [True, True, True, True, False, True]
    assert track.duplicates == 1 and track.missing == {5}
    assert track.lost(truth=8) == 1 + 2  # seq 5, and 7-8 never arrived


def test_a_subscriber_whose_first_entry_is_not_seq_1_misses_the_earlier_ones() -> None:
    track = NodeTrack()
    track.see(3)
    assert track.lost(truth=3) == 2


def test_tracker_latency_and_percentiles() -> None:
    tracker = Tracker()
    now = time.time_ns()
    found = [(b"/n", str(i).encode(), str(now - i * 1_000_000).encode()) for i in range(1, 101)]
    latencies = [ms for _node, ms in tracker.feed(7, found, now)]
    assert latencies == pytest.approx([float(i) for i in range(1, 101)])
    assert list(tracker.feed(7, found[:1], now)) == []  # a duplicate reports nothing
    hist = tracker.per_second[now // 1_000_000_000]
    assert hist.total == 100 and tracker.duplicates == 1
    assert hist.percentile(50) == pytest.approx(50.1)
    assert hist.percentile(99) == pytest.approx(99.1)
    merged = Histogram.from_json(hist.to_json())
    merged.merge(hist)
    assert merged.total == 200 and merged.percentile(50) == pytest.approx(50.1)


# ---------------------------------------------------------------------------- real ejabberd


@pytest.mark.stack
@pytest.mark.timeout(60)
def test_against_ejabberd_subscribe_receive_terminate_and_reconnect(stack: Stack) -> None:
    env = stack.env
    url, service = env["SCALEPUB_BOSH_URL"], env["SCALEPUB_PUBSUB_SERVICE"]
    user, _, domain = env["SCALEPUB_XMPP_JID"].partition("@")
    node = f"/loadtest/bosh/{uuid.uuid4().hex[:8]}"
    pub = BoshClient(HTTPTransport(url), domain, wait=5)
    assert pub.connect(user, env["SCALEPUB_XMPP_PASSWORD"]).startswith(f"{user}@{domain}/")
    pub.create_node(service, [node])

    sub_transport = HTTPTransport(url)
    sub = BoshClient(sub_transport, env["SCALEPUB_ANON_DOMAIN"], wait=5)
    jid = sub.connect(resource="sub")
    assert jid.endswith(f"@{env['SCALEPUB_ANON_DOMAIN']}/sub")
    sub.subscribe(service, [node])

    def publish(first: int, count: int) -> None:
        entries = "".join(entry(node, s, time.time_ns()) for s in range(first, first + count))
        iq_id = pub.next_id()
        pub.iq(f"<iq type='set' to='{service}' id='{iq_id}'><pubsub "
               f"xmlns='http://jabber.org/protocol/pubsub'><publish node='{node}'><item "
               f"id='{first}'><batch xmlns='urn:scalepub:1'><![CDATA[{entries}]]></batch>"
               "</item></publish></pubsub></iq>")

    def receive(count: int) -> list[tuple[bytes, bytes, bytes]]:
        found: list[tuple[bytes, bytes, bytes]] = []
        deadline = time.monotonic() + 20
        while len(found) < count and time.monotonic() < deadline:
            if sub.inbox:
                for stanza in sub.poll():
                    for _node, item in pubsub_items(stanza, service):
                        found += entries_of_batch(item[0])
            else:
                found += scan_body(sub.poll_raw()) or []
        return found

    publish(1, 3)
    got = receive(3)
    assert [seq for _n, seq, _ts in got] == [b"1", b"2", b"3"]
    assert all(n == node.encode() for n, _s, _t in got)

    # A session the server no longer knows: terminate, then a fresh session resubscribes.
    assert sub.session is not None
    old_sid = sub.session.sid
    sub.close()
    sub.session = Session(old_sid, 5, 1, 2, 30)
    with pytest.raises(BoshTerminated):
        sub.poll()
    sub.connect(resource="sub2")
    assert sub.session.sid != old_sid
    sub.subscribe(service, [node])
    publish(4, 2)
    # ops/ejabberd sets send_last_published_item: never (issue 13 part 3): the new
    # subscriber gets no replay of the first batch, only the new entries.
    assert [seq for _n, seq, _ts in receive(2)] == [b"4", b"5"]
    sub.close()
    pub.close()
