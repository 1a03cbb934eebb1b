"""A terminal subscriber: receive batches, unpack entries, report end-to-end latency.

Used by ``scalepub tail`` (the demo's live feed and a debugging tool). It does what a browser
client does: log in (anonymously by default), subscribe with its full JID, unpack each
``<batch xmlns="urn:scalepub:1">`` into entries.
"""

from __future__ import annotations

import asyncio
import logging
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import slixmpp
from slixmpp.exceptions import IqError, IqTimeout

from scalepub.settings import Settings
from scalepub.xmpp.batch import NS_BATCH
from scalepub.xmpp.link import XmppTlsError, configure_transport

log = logging.getLogger(__name__)

NODE_RETRY_S = 2.0  # a node that does not exist yet is tried again (created on first publish)


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
    """Subscribes to nodes (or every node, with ``follow_all``) and calls ``on_entry``."""

    def __init__(self, settings: Settings, nodes: Iterable[str],
                 on_entry: Callable[[ReceivedEntry], None], *, follow_all: bool = False,
                 jid: str | None = None, password: str = "") -> None:
        self.settings = settings
        self.wanted = set(nodes)
        self.subscribed: set[str] = set()
        self.follow_all = follow_all
        self.on_entry = on_entry
        self.ready = asyncio.Event()
        self._tls_error: XmppTlsError | None = None
        self.client = _client(settings, jid, password, self._on_tls_error)
        self.client.add_event_handler("pubsub_publish", self._on_publish)
        self.client.add_event_handler("session_start", self._on_session)

    async def run(self) -> None:
        """Connect and keep subscribing until cancelled; raise XmppTlsError if TLS fails."""
        self.client.connect(self.settings.xmpp_host, self.settings.xmpp_port)
        try:
            await self.ready.wait()
            if self._tls_error is not None:
                raise self._tls_error
            while True:
                await self._subscribe_missing()
                await asyncio.sleep(NODE_RETRY_S)
        finally:
            self.client.disconnect(wait=0)

    def _on_tls_error(self, exc: XmppTlsError) -> None:
        self._tls_error = exc
        self.client.cancel_connection_attempt()  # slixmpp would retry on its own, for ever
        self.client.disconnect(wait=0)
        self.ready.set()

    async def _on_session(self, _event: Any) -> None:
        if self._tls_error is not None:
            return
        self.client.send_presence()
        self.ready.set()

    async def _subscribe_missing(self) -> None:
        if self.follow_all:
            self.wanted |= await self._all_nodes()
        for node in sorted(self.wanted - self.subscribed):
            try:
                await self.client["xep_0060"].subscribe(
                    self.settings.pubsub_service, node, subscribee=self.client.boundjid.full)
            except (IqError, IqTimeout) as exc:
                log.debug("subscribe %s: %s (will retry)", node, exc)
                continue
            self.subscribed.add(node)
            log.info("subscribed to %s", node)

    async def _all_nodes(self) -> set[str]:
        try:
            items = await self.client["xep_0030"].get_items(jid=self.settings.pubsub_service)
        except (IqError, IqTimeout):
            return set()
        return {node for _, node, _ in items["disco_items"]["items"] if node}

    def _on_publish(self, msg: Any) -> None:
        now = time.time_ns()
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
