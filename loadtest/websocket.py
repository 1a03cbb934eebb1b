"""WebSocket subscribers for the load test: ``python -m loadtest.websocket CONFIG.json``.

XMPP over WebSocket (RFC 7395, ejabberd's ``/ws``; ``websockets`` as the client): each user
opens one connection with the ``xmpp`` subprotocol, logs in with SASL ANONYMOUS, binds,
sends presence, subscribes its nodes with its full JID, then reads: one stanza per WebSocket
message, no HTTP cycle per answer as with BOSH. All users run as tasks of one asyncio
process (one core at most: the run measures whether it had CPU to spare). Entries are
counted as the Locust BOSH users count them (``loadtest/entries.py``), into the same
``progress-<pid>.json`` / ``subscribers-<pid>.json`` files, marked ``"transport": "websocket"``.
SIGTERM (or SIGINT) stops the users and writes the dump.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

from loadtest.bosh import NS_BIND, NS_PUBSUB, NS_SASL, NS_STREAMS, pubsub_items
from loadtest.entries import Tracker, entries_of_batch, scan_body
from loadtest.scenario import nodes_for

log = logging.getLogger("loadtest.websocket")

NS_FRAMING = "urn:ietf:params:xml:ns:xmpp-framing"
TRANSPORT = "websocket"
PROGRESS_EVERY_S = 0.5
STEP_TIMEOUT_S = 30.0
RECONNECT_PAUSE_S = 1.0


class XmppError(Exception):
    """The server refused a step of the login or a subscription."""


class Subscribers:
    """Every user of this process: their counts, tracks and the files the run reads."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.out = Path(config["out_dir"])
        self.tracker = Tracker()
        self.ready = 0
        self.reconnects = 0
        self.subscriptions: dict[str, int] = {}
        self.stop = asyncio.Event()

    async def run(self) -> None:
        """Start the users (at ``spawn_rate`` per second), report, stop on the signal."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        reporter = asyncio.create_task(self._report())
        users = []
        first = int(self.config["first_user"])
        for i in range(int(self.config["users"])):
            users.append(asyncio.create_task(self._user(first + i)))
            if self.stop.is_set():
                break
            await asyncio.sleep(1.0 / float(self.config["spawn_rate"]))
        await self.stop.wait()
        for task in users:
            task.cancel()
        await asyncio.gather(*users, return_exceptions=True)
        reporter.cancel()
        self.dump()

    async def _user(self, number: int) -> None:
        nodes = nodes_for(number, self.config["hot_node"], self.config["author_nodes"],
                          self.config["authors_per_user"])
        counted = False
        while not self.stop.is_set():
            try:
                async with connect(self.config["ws_url"], subprotocols=["xmpp"],  # type: ignore[list-item]
                                   compression=None, max_size=None, ping_interval=None,
                                   open_timeout=STEP_TIMEOUT_S, close_timeout=1) as ws:
                    await _login(ws, self.config["anon_domain"], f"w{number}")
                    for node in nodes:
                        self.tracker.track(number, node)
                    await _subscribe(ws, self.config["pubsub_service"], nodes)
                    if not counted:
                        counted = True
                        self.ready += 1
                        for node in nodes:
                            self.subscriptions[node] = self.subscriptions.get(node, 0) + 1
                    await self._listen(ws, number)
            except (OSError, WebSocketException, XmppError, TimeoutError, ET.ParseError) as exc:
                if self.stop.is_set():
                    return
                self.reconnects += 1
                log.warning("user %d: %s: %s; reconnecting", number, type(exc).__name__, exc)
                await asyncio.sleep(RECONNECT_PAUSE_S)

    async def _listen(self, ws: ClientConnection, number: int) -> None:
        service = self.config["pubsub_service"]
        async for message in ws:
            now = time.time_ns()
            raw = message.encode() if isinstance(message, str) else message
            found = scan_body(raw)
            if found is None:  # the fast scan could not vouch for the count: parse properly
                found = [e for _node, item in pubsub_items(ET.fromstring(raw), service)
                         for payload in item for e in entries_of_batch(payload)]
            if found:
                for _entry in self.tracker.feed(number, found, now):
                    pass
        raise XmppError("the server closed the connection")

    async def _report(self) -> None:
        while True:
            self.write_progress()
            await asyncio.sleep(PROGRESS_EVERY_S)

    def progress(self) -> dict[str, Any]:
        """What the run polls: users ready, entries and duplicates so far, subscriptions."""
        return {"pid": os.getpid(), "time": time.time(), "transport": TRANSPORT,
                "ready": self.ready, "reconnects": self.reconnects,
                "entries": self.tracker.entries, "duplicates": self.tracker.duplicates,
                "subscriptions": self.subscriptions}

    def write_progress(self) -> None:
        """progress-<pid>.json, replaced atomically."""
        _write(self.out / f"progress-{os.getpid()}.json", self.progress())

    def dump(self) -> None:
        """subscribers-<pid>.json: the tracks and histograms (``report.variant_results``)."""
        self.write_progress()
        _write(self.out / f"subscribers-{os.getpid()}.json",
               {**self.progress(), **self.tracker.to_json()})


async def _login(ws: ClientConnection, domain: str, resource: str) -> str:
    """Open, SASL ANONYMOUS, restart, bind, presence; returns the full JID."""
    await _open(ws, domain)
    await ws.send(f"<auth xmlns='{NS_SASL}' mechanism='ANONYMOUS'/>")
    answer = await _next(ws, lambda e: e.tag.startswith(f"{{{NS_SASL}}}"))
    if answer.tag != f"{{{NS_SASL}}}success":
        raise XmppError(f"SASL ANONYMOUS refused: {answer.tag}")
    await _open(ws, domain)
    await ws.send(f"<iq xmlns='jabber:client' type='set' id='bind'><bind xmlns='{NS_BIND}'>"
                  f"<resource>{resource}</resource></bind></iq>")
    result = await _next(ws, lambda e: e.get("id") == "bind")
    jid = result.findtext(f"{{{NS_BIND}}}bind/{{{NS_BIND}}}jid")
    if result.get("type") != "result" or not jid:
        raise XmppError("bind refused")
    await ws.send("<presence xmlns='jabber:client'/>")
    ws.jid = jid  # type: ignore[attr-defined]
    return jid


async def _open(ws: ClientConnection, domain: str) -> None:
    await ws.send(f"<open xmlns='{NS_FRAMING}' to={quoteattr(domain)} version='1.0'/>")
    await _next(ws, lambda e: e.tag == f"{{{NS_STREAMS}}}features")


async def _subscribe(ws: ClientConnection, service: str, nodes: list[str]) -> None:
    jid = ws.jid  # type: ignore[attr-defined]
    waiting = set()
    for i, node in enumerate(nodes):
        waiting.add(f"s{i}")
        await ws.send(f"<iq xmlns='jabber:client' type='set' to={quoteattr(service)} id='s{i}'>"
                      f"<pubsub xmlns='{NS_PUBSUB}'><subscribe node={quoteattr(node)} "
                      f"jid={quoteattr(jid)}/></pubsub></iq>")
    while waiting:
        iq = await _next(ws, lambda e: e.get("id") in waiting)
        if iq.get("type") != "result":
            raise XmppError(f"subscribe {iq.get('id')} refused")
        waiting.discard(iq.get("id", ""))


async def _next(ws: ClientConnection, match: Any) -> ET.Element:
    """The next stanza that matches (others, e.g. the server's ``<open/>``, are skipped)."""
    async with asyncio.timeout(STEP_TIMEOUT_S):
        while True:
            stanza = ET.fromstring(await ws.recv())
            if stanza.tag in (f"{{{NS_STREAMS}}}error", f"{{{NS_FRAMING}}}close"):
                raise XmppError(f"the server ended the stream: {ET.tostring(stanza)[:200]!r}")
            if match(stanza):
                return stanza


def _write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def main(config_path: str) -> int:
    """Run the subscribers of the config file until SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config = json.loads(Path(config_path).read_text())
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(Subscribers(config).run())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
