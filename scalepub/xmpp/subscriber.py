"""A terminal subscriber: receive batches, unpack entries, report end-to-end latency.

Used by ``scalepub tail`` (the demo's live feed and a debugging tool). It does what a browser
client does: log in (anonymously by default), subscribe with its full JID, unpack each
``<batch xmlns="urn:scalepub:1">`` into entries. Like the browser client, it takes pubsub
events only from the pubsub service: anyone who can log in may send a ``<message>`` with an
event to a subscriber's full JID (docs/security.md, threat model).
"""

from __future__ import annotations

import asyncio
import logging
import time
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import slixmpp
from slixmpp.exceptions import IqError, IqTimeout

from scalepub.settings import Settings, SettingsError
from scalepub.xmpp.batch import NS_BATCH
from scalepub.xmpp.link import (
    XmppAuthError,
    XmppTlsError,
    XmppUnreachable,
    configure_transport,
)

log = logging.getLogger(__name__)

NODE_RETRY_S = 2.0  # a node that does not exist yet is tried again (created on first publish)
_WHY_GRACE_S = 0.2  # see Subscriber._disconnected


@dataclass(frozen=True)
class ReceivedEntry:
    """One entry unpacked from a batch."""

    node: str
    seq: int
    stream_id: str
    ts_ns: int
    model: str
    pk: str
    fmt: str
    element: ET.Element
    received_ns: int

    @property
    def latency_s(self) -> float:
        """Seconds from the row's commit to its arrival here."""
        return (self.received_ns - self.ts_ns) / 1e9

    def summary(self) -> str:
        """The row's fields in one line (XML payload) or its JSON text."""
        if self.fmt == "json":
            return (self.element.text or "").strip()
        fields = self.element.iter("field")
        return " ".join(f"{f.get('name')}={(f.text or '').strip()!r}" for f in fields)


def from_service(sender: str, service: str) -> bool:
    """Whether ``sender`` is the pubsub service ``service`` (bare JIDs, compared case-folded).

    The server stamps ``from`` on what its users send, so no one else can send from it.
    """
    bare = sender.partition("/")[0]
    return bool(bare) and bare.casefold() == service.partition("/")[0].casefold()


def unpack(batch: ET.Element, received_ns: int) -> list[ReceivedEntry]:
    """The entries of a batch element (its text, a CDATA section, is an XML fragment)."""
    fragment = ET.fromstring(f"<entries>{batch.text or ''}</entries>")
    return [
        ReceivedEntry(
            node=e.get("node", ""), seq=int(e.get("seq", "0")), stream_id=e.get("id", ""),
            ts_ns=int(e.get("ts", "0")), model=e.get("model", ""), pk=e.get("pk", ""),
            fmt=e.get("fmt", "xml"), element=e, received_ns=received_ns,
        )
        for e in fragment.iter("entry")
    ]


class Subscriber:
    """Subscribes to nodes (or every node, with ``follow_all``) and calls ``on_entry``.

    ``notice`` gets one line per thing the user should know while nothing arrives: nodes
    that do not exist yet (created on first publish) and subscriptions the server refuses,
    each said once; they are tried again every ``NODE_RETRY_S``.
    """

    def __init__(self, settings: Settings, nodes: Iterable[str],
                 on_entry: Callable[[ReceivedEntry], None], *, follow_all: bool = False,
                 jid: str | None = None, password: str = "",
                 notice: Callable[[str], object] = log.warning) -> None:
        self.settings = settings
        self.wanted = set(nodes)
        self.subscribed: set[str] = set()
        self.follow_all = follow_all
        self.on_entry = on_entry
        self.notice = notice
        self.jid = jid
        self._told: dict[str, str] = {}  # node -> the refusal already reported
        self._started: asyncio.Future[None] | None = None
        self._failed: asyncio.Future[None] | None = None
        self._closing = False
        self._stream_error = ""  # the condition of a <stream:error> the server ended with
        self.ignored = 0  # pubsub event messages not from the pubsub service, dropped
        self.client = _client(settings, jid, password, self._fail)
        self.client.add_event_handler("pubsub_publish", self._on_publish)
        for event, handler in (
            ("session_start", self._on_session), ("failed_all_auth", self._auth_failed),
            ("connection_failed", self._connect_failed), ("disconnected", self._disconnected),
            ("stream_error", self._on_stream_error),
        ):
            self.client.add_event_handler(event, handler)

    async def run(self, connect_timeout: float = 10.0) -> None:
        """Connect, then keep subscribing until cancelled.

        Raises XmppUnreachable (XmppTlsError for TLS) when no session starts within
        ``connect_timeout`` seconds or the session is lost, XmppAuthError when the server
        refuses the login.
        """
        loop = asyncio.get_running_loop()
        self._started, self._failed = loop.create_future(), loop.create_future()
        self.client.connect(self.settings.xmpp_host, self.settings.xmpp_port)
        try:
            await self._connected(connect_timeout)
            while True:
                await self._unless_failed(self._subscribe_missing())
                await self._unless_failed(asyncio.sleep(NODE_RETRY_S))
        finally:
            self._closing = True
            self.client.cancel_connection_attempt()
            self.client.disconnect(wait=0)

    async def _connected(self, timeout: float) -> None:
        assert self._started is not None and self._failed is not None
        await asyncio.wait({self._started, self._failed}, timeout=timeout,
                           return_when=asyncio.FIRST_COMPLETED)
        if self._failed.done():
            self._failed.result()  # raises why
        if not self._started.done():
            raise XmppUnreachable(
                f"no XMPP session with {self._server} within {timeout:g} s "
                "(--connect-timeout)")

    async def _unless_failed(self, step: Awaitable[None]) -> None:
        """Run ``step``; raise at once if the session fails meanwhile."""
        assert self._failed is not None
        task = asyncio.ensure_future(step)
        await asyncio.wait({task, self._failed}, return_when=asyncio.FIRST_COMPLETED)
        if self._failed.done():
            task.cancel()
            self._failed.result()
        task.result()

    @property
    def _server(self) -> str:
        return f"{self.settings.xmpp_host}:{self.settings.xmpp_port}"

    def _fail(self, exc: Exception) -> None:
        """The first failure ends ``run``; slixmpp would otherwise retry on its own, for ever."""
        if self._closing:  # disconnect() below calls _disconnected() again
            return
        self._closing = True
        if self._failed is not None and not self._failed.done():
            self._failed.set_exception(exc)
        self.client.cancel_connection_attempt()
        self.client.disconnect(wait=0)

    def _on_session(self, _event: Any) -> None:
        if self._failed is None or self._failed.done():  # e.g. TLS refused after all
            return
        self.client.send_presence()
        if self._started is not None and not self._started.done():
            self._started.set_result(None)

    def _auth_failed(self, _event: Any) -> None:
        if self.jid:
            self._fail(XmppAuthError(
                f"the XMPP server refused the credentials of {self.jid} "
                "(check --jid and --password or SCALEPUB_TAIL_PASSWORD)"))
        else:
            self._fail(XmppAuthError(
                f"the XMPP server refused an anonymous login on {self.settings.anon_domain} "
                "(check SCALEPUB_ANON_DOMAIN: it must allow SASL ANONYMOUS)"))

    def _connect_failed(self, event: Any) -> None:
        self._fail(XmppUnreachable(f"cannot connect to XMPP server {self._server}: {event}"))

    def _disconnected(self, _event: Any) -> None:
        if self._closing:
            return
        if self._started is not None and self._started.done():
            self._fail(XmppUnreachable(f"lost the session with XMPP server {self._server}"))
            return
        # A refused TLS handshake closes the connection before slixmpp reports why
        # (ssl_invalid_chain): give that reason a moment to arrive and win.
        asyncio.get_running_loop().call_later(_WHY_GRACE_S, self._fail, XmppUnreachable(
            f"the XMPP server {self._server} closed the connection before a session started"
            f"{self._why_closed()}"))

    def _on_stream_error(self, error: Any) -> None:
        self._stream_error = str(error["condition"] or "")

    def _why_closed(self) -> str:
        if self._stream_error == "host-unknown":  # the domain we asked for is not served there
            domain = self.client.boundjid.domain
            return (f": it does not serve {domain} (host-unknown; check "
                    f"{'--jid' if self.jid else 'SCALEPUB_ANON_DOMAIN'})")
        return f" ({self._stream_error})" if self._stream_error else ""

    async def _subscribe_missing(self) -> None:
        if self.follow_all:
            self.wanted |= await self._all_nodes()
        refused: dict[str, str] = {}
        for node in sorted(self.wanted - self.subscribed):
            try:
                await self.client["xep_0060"].subscribe(
                    self.settings.pubsub_service, node, subscribee=self.client.boundjid.full)
            except IqError as exc:
                refused[node] = exc.iq["error"]["condition"] or "error"
                if refused[node] == "remote-server-not-found":  # no such service: never will be
                    raise SettingsError(
                        f"the XMPP server has no pubsub service {self.settings.pubsub_service} "
                        "(remote-server-not-found); check --pubsub-service "
                        "[env SCALEPUB_PUBSUB_SERVICE]") from None
                continue
            except IqTimeout:
                refused[node] = "no answer"
                continue
            self.subscribed.add(node)
            self._told.pop(node, None)
            log.info("subscribed to %s", node)
        self._tell(refused)

    def _tell(self, refused: dict[str, str]) -> None:
        """Say once per node why it is not subscribed yet (it is tried again)."""
        new = {n: why for n, why in refused.items() if self._told.get(n) != why}
        self._told.update(new)
        waiting = [n for n, why in new.items() if why == "item-not-found"]
        retry = f"trying again every {NODE_RETRY_S:g} s"
        if waiting:
            what = "node" if len(waiting) == 1 else f"{len(waiting)} nodes"
            self.notice(f"waiting for {what} {', '.join(map(repr, waiting))} to be created "
                        f"(created on first publish); {retry}")
        for node, why in new.items():
            if why != "item-not-found":
                self.notice(f"cannot subscribe to {node!r}: {why}; {retry}")

    async def _all_nodes(self) -> set[str]:
        try:
            items = await self.client["xep_0030"].get_items(jid=self.settings.pubsub_service)
        except (IqError, IqTimeout):
            return set()
        return {node for _, node, _ in items["disco_items"]["items"] if node}

    def _on_publish(self, msg: Any) -> None:
        now = time.time_ns()
        sender = str(msg["from"])
        if not from_service(sender, self.settings.pubsub_service):
            self.ignored += 1  # a forgery: never shown; its content is the sender's, not logged
            log.debug("ignored a pubsub event from %s", sender)
            return
        payload = msg["pubsub_event"]["items"]["item"]["payload"]
        if payload is None or payload.tag != f"{{{NS_BATCH}}}batch":
            return
        for entry in unpack(payload, now):
            self.on_entry(entry)


def _client(settings: Settings, jid: str | None, password: str,
            on_tls_error: Callable[[XmppTlsError], None]) -> slixmpp.ClientXMPP:
    client = slixmpp.ClientXMPP(jid or settings.anon_domain, password)
    configure_transport(client, settings, on_tls_error)
    for plugin in ("xep_0030", "xep_0060"):
        client.register_plugin(plugin)
    return client
