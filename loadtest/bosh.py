"""A small synchronous BOSH client (XEP-0124 with XEP-0206), independent of its HTTP transport.

No maintained Python BOSH client exists. This one does what a scalepub subscriber needs:
session creation, SASL ANONYMOUS or PLAIN, stream restart, resource bind, presence, pubsub
subscribe (and node creation for the publisher account), then long polls. It keeps one
request in flight at a time (``hold=1``), so the server answers a held poll as soon as it has
something. A transport error is retried with the same ``rid`` (XEP-0124 §14.3: the server
answers a repeated rid from its cache); a ``type='terminate'`` body ends the session with
``BoshTerminated``, after which the caller opens a new one.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import itertools
import random
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit
from xml.sax.saxutils import quoteattr

NS_HTTPBIND = "http://jabber.org/protocol/httpbind"
NS_XBOSH = "urn:xmpp:xbosh"
NS_CLIENT = "jabber:client"
NS_STREAMS = "http://etherx.jabber.org/streams"
NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
NS_BIND = "urn:ietf:params:xml:ns:xmpp-bind"
NS_SESSION = "urn:ietf:params:xml:ns:xmpp-session"
NS_PUBSUB = "http://jabber.org/protocol/pubsub"
NS_PUBSUB_EVENT = "http://jabber.org/protocol/pubsub#event"

MESSAGE = f"{{{NS_CLIENT}}}message"
IQ = f"{{{NS_CLIENT}}}iq"
EVENT_ITEM = f"{{{NS_PUBSUB_EVENT}}}event/{{{NS_PUBSUB_EVENT}}}items/{{{NS_PUBSUB_EVENT}}}item"
EVENT_ITEMS = f"{{{NS_PUBSUB_EVENT}}}event/{{{NS_PUBSUB_EVENT}}}items"
# HTTP statuses that BOSH 1.6 legacy servers use to end a session (XEP-0124 §17.2).
TERMINAL_HTTP = {400: "bad-request", 403: "policy-violation", 404: "item-not-found"}
# rids must stay below 2**53 over the whole session (XEP-0124 §14.1).
MAX_START_RID = 2**40


class Transport(Protocol):
    """Posts one BOSH body and returns the response body; raises ``TransportError``."""

    def post(self, body: bytes, timeout: float) -> bytes:
        """Send ``body`` to the connection manager; block until its answer."""
        ...


class TransportError(Exception):
    """The request did not get an answer (connection failed, timeout, HTTP error)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class BoshError(Exception):
    """The server refused a step (auth, bind, an IQ) or broke the protocol."""


class BoshTerminated(BoshError):
    """The server ended the session (``type='terminate'``, a stream error or HTTP 4xx)."""

    def __init__(self, condition: str) -> None:
        super().__init__(f"session terminated: {condition}")
        self.condition = condition


@dataclass
class Session:
    """What the connection manager told us when the session was created."""

    sid: str
    wait: int
    hold: int
    requests: int
    inactivity: int


@dataclass
class BoshClient:
    """One BOSH session: ``connect()``, then ``send()``/``poll()``; ``close()`` to end it."""

    transport: Transport
    domain: str
    wait: int = 20
    hold: int = 1
    retries: int = 3
    retry_delay_s: float = 0.2
    rid: int = field(default_factory=lambda: random.randint(1, MAX_START_RID))
    sleep: Callable[[float], None] = time.sleep
    session: Session | None = None
    jid: str = ""
    inbox: list[ET.Element] = field(default_factory=list)
    requests_sent: int = 0
    retried: int = 0
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    # ------------------------------------------------------------------ session set-up

    def connect(self, username: str | None = None, password: str = "",
                resource: str = "loadtest") -> str:
        """Create the session, authenticate, bind, send presence; returns the full JID."""
        features = self.open()
        self._authenticate(features, username, password)
        features = self._restart()
        self.jid = self._bind(resource)
        if _session_required(features):
            self.iq(f"<iq type='set' id='{self.next_id()}'><session xmlns='{NS_SESSION}'/></iq>")
        self.send("<presence/>")
        return self.jid

    def open(self) -> ET.Element:
        """Session creation request; returns the stream features."""
        attrs = (f" to={quoteattr(self.domain)} wait='{self.wait}' hold='{self.hold}' ver='1.6'"
                 f" content='text/xml; charset=utf-8' xml:lang='en'"
                 f" xmlns:xmpp='{NS_XBOSH}' xmpp:version='1.0'")
        body = self._request(attrs, "", with_sid=False)
        sid = body.get("sid")
        if not sid:
            raise BoshError("session creation answer has no sid")
        self.session = Session(
            sid=sid, wait=int(body.get("wait", self.wait)), hold=int(body.get("hold", self.hold)),
            requests=int(body.get("requests", "2")),
            inactivity=int(body.get("inactivity", "30")),
        )
        return self._await_features(list(body))

    def _authenticate(self, features: ET.Element, username: str | None, password: str) -> None:
        mechanism = "ANONYMOUS" if username is None else "PLAIN"
        offered = {m.text or "" for m in features.iter(f"{{{NS_SASL}}}mechanism")}
        if mechanism not in offered:
            raise BoshError(f"server does not offer SASL {mechanism} (offers {sorted(offered)})")
        data = ""
        if username is not None:
            data = base64.b64encode(f"\0{username}\0{password}".encode()).decode()
        auth = f"<auth xmlns='{NS_SASL}' mechanism='{mechanism}'>{data}</auth>"
        answer = self._await(lambda e: e.tag.startswith(f"{{{NS_SASL}}}"), [auth])
        if answer.tag != f"{{{NS_SASL}}}success":
            condition = next((c.tag.split("}")[1] for c in answer), answer.tag)
            raise BoshError(f"SASL {mechanism} refused: {condition}")

    def _restart(self) -> ET.Element:
        attrs = (f" to={quoteattr(self.domain)} xml:lang='en' xmpp:restart='true'"
                 f" xmlns:xmpp='{NS_XBOSH}'")
        return self._await_features(list(self._request(attrs, "")))

    def _bind(self, resource: str) -> str:
        iq = (f"<iq type='set' id='{self.next_id()}'><bind xmlns='{NS_BIND}'>"
              f"<resource>{_text(resource)}</resource></bind></iq>")
        jid = self.iq(iq).findtext(f"{{{NS_BIND}}}bind/{{{NS_BIND}}}jid")
        if not jid:
            raise BoshError("bind result without a jid")
        return jid

    def _await_features(self, stanzas: list[ET.Element]) -> ET.Element:
        self.inbox.extend(stanzas)
        return self._await(lambda e: e.tag == f"{{{NS_STREAMS}}}features", [])

    # ------------------------------------------------------------------ pubsub

    def subscribe(self, service: str, nodes: Iterable[str]) -> None:
        """Subscribe this resource (full JID) to every node, one request for all IQs."""
        self._pubsub_many(service, (f"<subscribe node={quoteattr(n)} jid={quoteattr(self.jid)}/>"
                                    for n in nodes))

    def create_node(self, service: str, nodes: Iterable[str]) -> None:
        """Create pubsub nodes (as their owner), so subscribers can subscribe before a publish."""
        self._pubsub_many(service, (f"<create node={quoteattr(n)}/>" for n in nodes))

    def _pubsub_many(self, service: str, children: Iterable[str]) -> None:
        iqs = {}
        for child in children:
            i = self.next_id()
            iqs[i] = (f"<iq type='set' to={quoteattr(service)} id='{i}'>"
                      f"<pubsub xmlns='{NS_PUBSUB}'>{child}</pubsub></iq>")
        self.iq_many(iqs)

    # ------------------------------------------------------------------ stanzas

    def next_id(self) -> str:
        """A fresh stanza id."""
        return f"lt{next(self._ids)}"

    def iq(self, stanza: str) -> ET.Element:
        """Send one IQ (its id must be the client's ``next_id()``) and return its result."""
        iq_id = ET.fromstring(stanza).get("id", "")
        return self.iq_many({iq_id: stanza})[iq_id]

    def iq_many(self, iqs: dict[str, str]) -> dict[str, ET.Element]:
        """Send IQs in one request and wait for all results; an error result raises."""
        waiting = set(iqs)
        results: dict[str, ET.Element] = {}
        received = self.send(*iqs.values())
        deadline = time.monotonic() + 3 * self.wait
        while True:
            for stanza in received:
                if stanza.tag == IQ and stanza.get("id") in waiting:
                    waiting.discard(stanza.get("id", ""))
                    results[stanza.get("id", "")] = _checked(stanza)
                else:
                    self.inbox.append(stanza)
            if not waiting:
                return results
            if time.monotonic() > deadline:
                raise BoshError(f"no answer to {len(waiting)} IQ(s) in {3 * self.wait} s")
            received = self._exchange("")

    def send(self, *stanzas: str) -> list[ET.Element]:
        """One request carrying ``stanzas``; returns what the server sent back."""
        return self._exchange("".join(stanzas))

    def poll(self) -> list[ET.Element]:
        """Stanzas already received, else one long poll (empty body, up to ``wait`` s)."""
        if self.inbox:
            out, self.inbox = self.inbox, []
            return out
        return self._exchange("")

    def close(self) -> None:
        """End the session (``type='terminate'``); errors are ignored: we are leaving."""
        if self.session is None:
            return
        with contextlib.suppress(BoshError, TransportError):
            self._request(" type='terminate'", "<presence type='unavailable'/>")
        self.session = None

    # ------------------------------------------------------------------ plumbing

    def _await(self, match: Callable[[ET.Element], bool], stanzas: list[str]) -> ET.Element:
        """Send ``stanzas``, then poll until a stanza matches; others stay in the inbox."""
        backlog, self.inbox = self.inbox, []
        if stanzas:
            backlog += self._exchange("".join(stanzas))
        deadline = time.monotonic() + 3 * self.wait
        while True:
            for i, stanza in enumerate(backlog):
                if match(stanza):
                    self.inbox = backlog[:i] + backlog[i + 1:]
                    return stanza
            if time.monotonic() > deadline:
                self.inbox = backlog
                raise BoshError(f"nothing expected arrived in {3 * self.wait} s")
            backlog += self._exchange("")

    def _exchange(self, payload: str) -> list[ET.Element]:
        body = self._request("", payload)
        self._check_stream_error(body)
        return list(body)

    def _check_stream_error(self, body: ET.Element) -> None:
        for stanza in body:
            if stanza.tag == f"{{{NS_STREAMS}}}error":
                condition = next((c.tag.split("}")[1] for c in stanza), "stream-error")
                self.session = None
                raise BoshTerminated(condition)

    def poll_raw(self) -> bytes:
        """One long poll, returned as raw bytes for callers that scan it without a tree.

        The inbox must be empty (``poll()`` drains it). A body that ends the session still
        raises ``BoshTerminated``.
        """
        if self.inbox:
            raise BoshError("poll_raw() with stanzas waiting in the inbox: poll() first")
        raw = self._post("", "")
        if b"terminate" in raw[:400] or b"stream:error" in raw:
            self._check_stream_error(self.parse(raw))
        return raw

    def _request(self, attrs: str, payload: str, with_sid: bool = True) -> ET.Element:
        return self.parse(self._post(attrs, payload, with_sid))

    def _post(self, attrs: str, payload: str, with_sid: bool = True) -> bytes:
        if with_sid and self.session is None:
            raise BoshError("no session: call connect() first")
        rid = self.rid
        self.rid += 1
        sid = f" sid='{self.session.sid}'" if with_sid and self.session else ""
        data = f"<body rid='{rid}'{sid} xmlns='{NS_HTTPBIND}'{attrs}>{payload}</body>".encode()
        timeout = (self.session.wait if self.session else self.wait) + 10.0
        for attempt in range(self.retries + 1):
            try:
                raw = self.transport.post(data, timeout)
            except TransportError as exc:
                if exc.status in TERMINAL_HTTP:
                    self.session = None
                    raise BoshTerminated(TERMINAL_HTTP[exc.status]) from exc
                if attempt == self.retries:
                    raise
                self.retried += 1
                self.sleep(self.retry_delay_s * 2**attempt)
                continue
            self.requests_sent += 1
            return raw
        raise AssertionError("unreachable")

    def parse(self, raw: bytes) -> ET.Element:
        """A raw answer as a BOSH body element; a terminating body raises ``BoshTerminated``."""
        try:
            body = ET.fromstring(raw)
        except ET.ParseError as exc:
            raise BoshError(f"answer is not XML: {exc}: {raw[:200]!r}") from None
        if body.tag != f"{{{NS_HTTPBIND}}}body":
            raise BoshError(f"answer is not a BOSH body: {body.tag}")
        if body.get("type") == "terminate":
            self.session = None
            raise BoshTerminated(body.get("condition", "terminated"))
        return body


def pubsub_items(stanza: ET.Element, service: str) -> Iterator[tuple[str, ET.Element]]:
    """``(node, item)`` for each item of a pubsub event message from ``service`` (bare JIDs,
    case-insensitive); nothing for other stanzas. Anyone may send a subscriber a forged one."""
    if stanza.tag != MESSAGE:
        return
    sender = stanza.get("from", "").partition("/")[0].casefold()
    if not sender or sender != service.partition("/")[0].casefold():
        return
    for items in stanza.iterfind(EVENT_ITEMS):
        node = items.get("node", "")
        for item in items:
            yield node, item


def _checked(iq: ET.Element) -> ET.Element:
    if iq.get("type") == "error":
        error = iq.find(f"{{{NS_CLIENT}}}error")
        conditions = [c.tag.split("}")[1] for c in error] if error is not None else []
        raise BoshError(f"IQ {iq.get('id')} refused: {' '.join(conditions) or 'error'}")
    return iq


def _session_required(features: ET.Element) -> bool:
    session = features.find(f"{{{NS_SESSION}}}session")
    return session is not None and session.find(f"{{{NS_SESSION}}}optional") is None


def _text(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class HTTPTransport:
    """A blocking keep-alive HTTP/1.1 transport (standard library), for tests and tools."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.url = url
        self.path = parts.path or "/"
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname, parts.port
        self._conn: http.client.HTTPConnection | None = None

    def post(self, body: bytes, timeout: float) -> bytes:
        """POST the body; a broken connection is dropped and reported as ``TransportError``."""
        conn = self._connection(timeout)
        try:
            conn.request("POST", self.path, body, {"Content-Type": "text/xml; charset=utf-8"})
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc
        if response.status != 200:
            raise TransportError(f"HTTP {response.status}", response.status)
        return data

    def close(self) -> None:
        """Drop the connection (the next post opens a new one)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            self._conn = cls(self._host, self._port, timeout=timeout)
        self._conn.timeout = timeout
        if self._conn.sock is not None:
            self._conn.sock.settimeout(timeout)
        return self._conn
