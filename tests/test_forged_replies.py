"""Forged publish replies and other stanzas sent to a shard's XMPP session (issue 13 part 1).

A publisher session's full JID is predictable (``pub@DOMAIN/scalepub-<KEY_PREFIX>-shard-<N>``), and
anyone who can log in anonymously can send it stanzas. The link (scalepub/xmpp/link.py) takes
an IQ answer only for an id it waits for and only from the pubsub service (errors also from
the server itself); everything else is dropped and counted in
``scalepub_ignored_stanzas_total{kind}``.

Unit tests: the rule (``judge``, ``Peers``), the error parsing, the ids. Against the real
ejabberd: what it sends when the service cannot be reached (the rule must let those errors
through), and a 5,000-entry run while an anonymous client floods every shard session with
forged errors and results for the very ids in flight (read off the wire by a relay between
the pool and ejabberd, which holds the pool's bytes back a little so the forgeries arrive
first), old-style guessed ids, messages, presence and IQ requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import re
import socket
import threading
import time
import urllib.request
import uuid
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis
import slixmpp
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from scalepub.settings import Settings
from scalepub.sharding import Keys
from scalepub.xmpp.batch import Batch, Entry, entry_part, publish_iq
from scalepub.xmpp.link import Ignored, Peers, Reply, Verdict, XmppLink, judge, reply_of
from tests.e2e import Collector, PoolProcess, assert_complete_and_ordered, create_nodes, wait_until
from tests.rawxmpp import RawClient
from tests.stack import Stack, free_port
from tests.streams import drained, produce

IQ, MESSAGE, PRESENCE = ("{jabber:client}" + t for t in ("iq", "message", "presence"))
PEERS = Peers.of("pubsub.localhost", "pub@localhost")
ATTACKER = "x1y2@anon.localhost/z3"


# --- the rule, as a table ------------------------------------------------------------------

@pytest.mark.parametrize(("tag", "iq_type", "sender", "pending", "live", "expected"), [
    # the answer to an IQ in flight, from the service
    (IQ, "result", "pubsub.localhost", True, True, (Verdict.REPLY, None)),
    (IQ, "error", "pubsub.localhost", True, True, (Verdict.REPLY, None)),
    (IQ, "result", "PubSub.LocalHost", True, True, (Verdict.REPLY, None)),
    # errors the server makes itself on the account's behalf (RFC 6120 §8.1.2.1)
    (IQ, "error", None, True, True, (Verdict.REPLY, None)),
    (IQ, "error", "localhost", True, True, (Verdict.REPLY, None)),
    (IQ, "error", "pub@localhost", True, True, (Verdict.REPLY, None)),
    (IQ, "error", "Pub@LocalHost", True, True, (Verdict.REPLY, None)),
    # ... but no results from them: only the service stores items
    (IQ, "result", "localhost", True, True, (Verdict.DROP, Ignored.FORGED_REPLY)),
    (IQ, "result", None, True, True, (Verdict.DROP, Ignored.FORGED_REPLY)),
    (IQ, "result", "pub@localhost", True, True, (Verdict.DROP, Ignored.FORGED_REPLY)),
    # anyone else, with a real id
    (IQ, "result", ATTACKER, True, True, (Verdict.DROP, Ignored.FORGED_REPLY)),
    (IQ, "error", ATTACKER, True, True, (Verdict.DROP, Ignored.FORGED_REPLY)),
    (IQ, "error", "pub@localhost/other-shard", True, True, (Verdict.DROP, Ignored.FORGED_REPLY)),
    (IQ, "error", "pubsub.localhost/x", True, True, (Verdict.DROP, Ignored.FORGED_REPLY)),
    (IQ, "error", "evil.pubsub.localhost", True, True, (Verdict.DROP, Ignored.FORGED_REPLY)),
    (IQ, "result", "pubsub.localhost.evil", True, True, (Verdict.DROP, Ignored.FORGED_REPLY)),
    (IQ, "error", "x@pubsub.localhost", True, True, (Verdict.DROP, Ignored.FORGED_REPLY)),
    # an id nobody waits for, whoever sends it
    (IQ, "result", "pubsub.localhost", False, True, (Verdict.DROP, Ignored.UNKNOWN_ID)),
    (IQ, "error", ATTACKER, False, True, (Verdict.DROP, Ignored.UNKNOWN_ID)),
    # before the session started, slixmpp waits for its own set-up IQs (bind)
    (IQ, "result", None, False, False, (Verdict.SLIXMPP, None)),
    # requests: the server's go to slixmpp, anyone else's get service-unavailable
    (IQ, "set", None, False, True, (Verdict.SLIXMPP, None)),
    (IQ, "get", "localhost", False, True, (Verdict.SLIXMPP, None)),
    (IQ, "get", ATTACKER, False, True, (Verdict.REFUSE, Ignored.UNEXPECTED)),
    (IQ, "set", "pubsub.localhost", False, True, (Verdict.REFUSE, Ignored.UNEXPECTED)),
    (IQ, None, ATTACKER, False, True, (Verdict.DROP, Ignored.UNEXPECTED)),
    (IQ, "bogus", ATTACKER, True, True, (Verdict.DROP, Ignored.UNEXPECTED)),
    # messages and presence: a publisher expects none, from anyone
    (MESSAGE, "chat", ATTACKER, False, True, (Verdict.DROP, Ignored.UNEXPECTED)),
    (MESSAGE, None, "localhost", False, True, (Verdict.DROP, Ignored.UNEXPECTED)),
    (PRESENCE, "subscribe", ATTACKER, False, True, (Verdict.DROP, Ignored.UNEXPECTED)),
    (PRESENCE, None, "pubsub.localhost", False, True, (Verdict.DROP, Ignored.UNEXPECTED)),
    # stream-level elements stay slixmpp's
    ("{http://etherx.jabber.org/streams}error", None, None, False, True, (Verdict.SLIXMPP, None)),
    ("{urn:ietf:params:xml:ns:xmpp-sasl}success", None, None, False, False,
     (Verdict.SLIXMPP, None)),
])
def test_judge(tag: str, iq_type: str | None, sender: str | None, pending: bool, live: bool,
               expected: tuple[Verdict, Ignored | None]) -> None:
    assert judge(tag, iq_type, sender, pending, live, PEERS) == expected


def test_peers_of_a_full_jid_setting_is_the_bare_account() -> None:
    peers = Peers.of("PubSub.Example.com", "Pub@Example.com/res")
    assert peers.may_answer("PubSub.Example.com", error=False)
    assert peers.may_answer("pubsub.example.com", error=False)
    assert peers.may_answer("pub@example.com", error=True)
    assert not peers.may_answer("pub@example.com/res", error=True)
    assert not peers.may_answer("example.org", error=True)


@pytest.mark.parametrize(("raw", "expected"), [
    ("<iq xmlns='jabber:client' type='result' id='a'/>", Reply("a", True)),
    ("<iq xmlns='jabber:client' type='error' id='a'><error type='wait'><resource-constraint "
     "xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/><text "
     "xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'>busy</text></error></iq>",
     Reply("a", False, "wait", "resource-constraint", "busy")),
    # the text first, a second condition ignored (RFC 6120 allows one)
    ("<iq xmlns='jabber:client' type='error' id='a'><pubsub xmlns='p'/><error type='modify'>"
     "<text xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'>t</text><not-acceptable "
     "xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/><gone "
     "xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/><x xmlns='app'/></error></iq>",
     Reply("a", False, "modify", "not-acceptable", "t")),
    ("<iq xmlns='jabber:client' type='error' id='a'/>",
     Reply("a", False, "cancel", "undefined-condition")),
    ("<iq xmlns='jabber:client' type='error' id='a'><error/></iq>",
     Reply("a", False, "cancel", "undefined-condition")),
])
def test_reply_of(raw: str, expected: Reply) -> None:
    assert reply_of(ET.fromstring(raw), "a") == expected


def test_ids_are_random_per_connection_and_need_no_escaping(settings_for: Settings) -> None:
    links = [XmppLink(settings_for, "ids", lambda _i: False, lambda _r: None, lambda: None)
             for _ in range(50)]
    firsts = [link.new_id() for link in links]
    assert len(set(firsts)) == 50
    link = links[0]
    ids = [link.new_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    prefix = ids[0].rpartition("-")[0]
    assert len(prefix) >= 18 and all(i.startswith(prefix + "-") for i in ids)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", i) for i in ids)


# --- what ejabberd 23.01 sends when the service cannot be reached --------------------------

def one_entry_batch(node: str) -> Batch:
    batch = Batch(node, 0)
    part = entry_part(node=node.encode(), seq=1, stream_id=b"1-0", ts_ns=time.time_ns(),
                      model=b"t.row", pk=b"1", fmt=b"xml", payload=b"<row/>")
    batch.add(Entry(b"1-0", node, 1, time.time_ns(), part, b""))
    return batch


async def publish_once(settings: Settings, ignored: list[Ignored]) -> Reply:
    """One publish IQ over the shard's link; the answer its filter let through."""
    iq_id = ""
    answer: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
    link = XmppLink(settings, f"probe{uuid.uuid4().hex[:6]}", lambda i: i == iq_id,
                    answer.set_result, lambda: None, ignored.append)
    await link.connect()
    try:
        iq_id = link.new_id()
        link.send(publish_iq(iq_id, settings.pubsub_service, one_entry_batch("/forged/probe"),
                             link.publish_options))
        return await asyncio.wait_for(answer, 20)
    finally:
        await link.close()


@pytest.mark.stack
@pytest.mark.parametrize("service", ["nosuch.{domain}", "pubsub.nowhere.invalid",
                                     "PubSub.{domain}"])
def test_the_servers_own_answers_pass_the_filter(stack: Stack, settings_for: Settings,
                                                 service: str) -> None:
    """ejabberd answers from the address the IQ was sent to, also with the errors it makes
    itself (remote-server-not-found): the filter lets them through, the policy sees them."""
    settings = settings_for.replace(
        pubsub_service=service.format(domain=stack.env["SCALEPUB_XMPP_DOMAIN"]))
    ignored: list[Ignored] = []
    reply = asyncio.run(publish_once(settings, ignored))
    if service.startswith("PubSub"):
        assert reply.ok, reply
    else:
        assert (reply.ok, reply.condition) == (False, "remote-server-not-found"), reply
    assert ignored == []


# --- what the log says about ignored stanzas ------------------------------------------------

async def link_takes(settings: Settings, resource: str, attacker: RawClient, stanzas: list[str],
                     ignored: list[Ignored]) -> None:
    """A publisher link with nothing in flight while ``attacker`` sends it ``stanzas``."""
    link = XmppLink(settings, resource, lambda _i: False, lambda _r: None, lambda: None,
                    ignored.append)
    await link.connect()
    try:
        for stanza in stanzas:
            attacker.send(stanza)
        deadline = time.monotonic() + 20
        while len(ignored) < len(stanzas) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        await link.close()


@pytest.mark.stack
def test_ignored_stanzas_are_logged_at_debug_without_their_content(
    stack: Stack, settings_for: Settings, caplog: pytest.LogCaptureFixture,
) -> None:
    """Even at DEBUG, where slixmpp logs every stanza it handles, a dropped stanza's content
    (the sender's) never reaches the log: one line with kind, element and sender."""
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="scalepub")  # the example project sets it to INFO
    env = stack.env
    secret = f"secret{uuid.uuid4().hex}"
    resource = f"logprobe{uuid.uuid4().hex[:6]}"
    to = f"{settings_for.xmpp_jid}/{resource}"
    attacker = RawClient(env["SCALEPUB_XMPP_HOST"], int(env["SCALEPUB_XMPP_PORT"]))
    ignored: list[Ignored] = []
    try:
        attacker.login_anonymous(env["SCALEPUB_ANON_DOMAIN"])
        stanzas = [f"<message to='{to}' id='{secret}'><body>{secret}</body></message>",
                   f"<iq type='result' id='{secret}' to='{to}'><x xmlns='{secret}'/></iq>",
                   f"<presence to='{to}'><status>{secret}</status></presence>"]
        asyncio.run(link_takes(settings_for, resource, attacker, stanzas, ignored))
    finally:
        attacker.close()
    assert ignored == [Ignored.UNEXPECTED, Ignored.UNKNOWN_ID, Ignored.UNEXPECTED]
    lines = [r.getMessage() for r in caplog.records]
    assert any(r.levelno == logging.DEBUG and r.name.startswith("slixmpp") for r in caplog.records)
    assert not [line for line in lines if secret in line]
    for kind, element in (("unexpected", "message"), ("unknown_id", "iq"),
                          ("unexpected", "presence")):
        assert f"ignored {kind} stanza ({element}) from {attacker.jid}" in lines, \
            [line for line in lines if "ignored" in line]


# --- a run under a flood of forgeries ------------------------------------------------------

PUBLISH_ID = re.compile(rb'<iq type="set" id="([^"]+)" to=')
RESOURCE = re.compile(rb"<resource>([^<]+)</resource>")


class SniffingRelay:
    """A TCP relay between the pool and ejabberd (plain TCP on loopback) that reads each
    publish IQ's id and its session's resource off the wire and hands them to ``on_id``, then
    forwards the pool's bytes ``delay`` seconds later, so that forged answers arrive first."""

    def __init__(self, target_port: int, on_id: Any, delay: float) -> None:
        self.target_port = target_port
        self.on_id = on_id
        self.delay = delay
        self.sniffed = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._server.close()
        for sock in self._socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self._socks += [client, upstream]
            held: queue.Queue[tuple[float, bytes]] = queue.Queue()
            for target, args in ((self._read_pool, (client, held)),
                                 (self._forward_held, (held, upstream)),
                                 (self._pipe, (upstream, client))):
                threading.Thread(target=target, args=args, daemon=True).start()

    def _read_pool(self, src: socket.socket, held: queue.Queue[tuple[float, bytes]]) -> None:
        resource, seen, tail = b"", set(), b""
        try:
            while data := src.recv(65536):
                text, tail = tail + data, (tail + data)[-400:]
                if not resource and (m := RESOURCE.search(text)):
                    resource = m.group(1)
                for iq_id in PUBLISH_ID.findall(text):
                    if iq_id not in seen and resource:
                        seen.add(iq_id)
                        self.sniffed += 1
                        self.on_id(resource.decode(), iq_id.decode())
                held.put((time.monotonic() + self.delay, data))
        except OSError:
            pass
        held.put((0.0, b""))

    @staticmethod
    def _forward_held(held: queue.Queue[tuple[float, bytes]], dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while (item := held.get())[1]:
                time.sleep(max(0.0, item[0] - time.monotonic()))
                dst.sendall(item[1])
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_RDWR)

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_RDWR)


FORGED_ERROR = ("<iq type='error' id='{id}' to='{to}'><error type='modify'><not-acceptable "
                "xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>")
FORGED_RESULT = "<iq type='result' id='{id}' to='{to}'/>"
UNEXPECTED = (
    "<message type='chat' to='{to}' id='m{n}'><body>hello</body></message>",
    "<presence to='{to}' id='p{n}'/>",
    "<iq type='get' to='{to}' id='probe{n}'><query "
    "xmlns='http://jabber.org/protocol/disco#info'/></iq>",
)


class Attacker:
    """An anonymous slixmpp client in its own thread that sends raw stanzas."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.sent: Counter[str] = Counter()
        self.refusals = 0  # service-unavailable answers to its IQ requests
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._client: Any = None
        threading.Thread(target=self._run, daemon=True).start()
        assert self._started.wait(30), "attacker not connected"

    def send(self, kind: str, raw: str) -> None:
        """Send ``raw`` (thread-safe), counted under ``kind``."""
        self._loop.call_soon_threadsafe(self._send, kind, raw)

    def forge(self, to: str, iq_id: str) -> None:
        """A forged error and a forged result for ``iq_id``, in alternating order."""
        first, second = (FORGED_ERROR, FORGED_RESULT) if len(iq_id) % 2 else (FORGED_RESULT,
                                                                               FORGED_ERROR)
        for template in (first, second):
            self.send("forged", template.format(id=iq_id, to=to))

    def stop(self) -> None:
        async def close() -> None:
            await self._client.disconnect(wait=1.0)
            self._loop.stop()
        asyncio.run_coroutine_threadsafe(close(), self._loop)

    def _send(self, kind: str, raw: str) -> None:
        self._client.send_raw(raw)
        self.sent[kind] += 1

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        client = slixmpp.ClientXMPP(self.env["SCALEPUB_ANON_DOMAIN"], "")
        client.enable_starttls = client.enable_direct_tls = False
        client.enable_plaintext = True
        client.register_handler(Callback("refusals", MatchXPath("{jabber:client}iq"),
                                         self._on_iq))
        client.add_event_handler("session_start", lambda _e: self._started.set())
        client.connect(self.env["SCALEPUB_XMPP_HOST"], int(self.env["SCALEPUB_XMPP_PORT"]))
        self._client = client
        self._loop.run_forever()

    def _on_iq(self, iq: Any) -> None:
        if (iq["type"] == "error" and iq["id"].startswith("probe")
                and iq["error"]["condition"] == "service-unavailable"):
            self.refusals += 1


def ignored_counts(port: int) -> Counter[str]:
    """scalepub_ignored_stanzas_total summed over shards, by kind, from the pool's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    counts: Counter[str] = Counter()
    for kind, value in re.findall(
            r'^scalepub_ignored_stanzas_total\{[^}]*kind="(\w+)"[^}]*\} (\S+)$', text, re.M):
        counts[kind] += int(float(value))
    return counts


def flood_the_rest(attackers: dict[str, Attacker], pids: list[int]) -> None:
    """Replies with guessed old-style ids (``sp<pid>-<n>``), then stanzas nobody expects."""
    for to, attacker in attackers.items():
        for pid in pids:
            for n in range(50):
                attacker.send("guessed", FORGED_ERROR.format(id=f"sp{pid}-{n}", to=to))
        for n in range(30):
            for i, template in enumerate(UNEXPECTED):
                attacker.send(("message", "presence", "iq_get")[i], template.format(to=to, n=n))


def total(attackers: list[Attacker]) -> Counter[str]:
    """What the attackers sent, by kind."""
    return sum((a.sent for a in attackers), Counter())


@pytest.mark.stack
@pytest.mark.timeout(300)
def test_a_flood_of_forged_replies_loses_nothing(
    stack: Stack, settings_for: Settings, redis_client: redis.Redis, tmp_path: Path,
) -> None:
    env = stack.env
    prefix = uuid.uuid4().hex[:6]
    nodes = [f"/forged/{prefix}/n{i}" for i in range(50)]
    create_nodes(env, nodes)
    # One anonymous session per shard session: ejabberd may shape each anonymous session.
    crew = [Attacker(env) for _ in range(4)]
    attackers: dict[str, Attacker] = {}

    def on_id(resource: str, iq_id: str) -> None:
        to = f"{settings_for.xmpp_jid}/{resource}"
        attackers.setdefault(to, crew[len(attackers) % len(crew)]).forge(to, iq_id)

    relay = SniffingRelay(int(env["SCALEPUB_XMPP_PORT"]), on_id, delay=0.5)
    settings = settings_for.replace(xmpp_port=relay.port)
    collector = Collector(env, nodes).start()
    metrics_port = free_port()
    pool = PoolProcess(settings, tmp_path / "pool.log", "--shards", "4", "--batch-max-entries",
                       "20", "--metrics-port", str(metrics_port))
    try:
        pool.wait_serving(redis_client)
        for _ in range(10):  # 5,000 entries while the pool runs: 10 per node a round
            produce(settings, nodes, 10)
            time.sleep(0.3)
        assert wait_until(lambda: len(attackers) == 4, 30), attackers
        # Each shard session's full JID is the predictable one (the same for every owner of
        # the shard, since the fenced leases): nothing rests on its secrecy, only on the ids
        # and the sender check (docs/security.md).
        assert set(attackers) == {f"{settings.xmpp_jid}/scalepub-{settings.key_prefix}-shard-{n}"
                                  for n in range(4)}, attackers
        flood_the_rest(attackers, pool.shard_pids())
        assert collector.wait_for(
            lambda got: len({(g.node, g.seq) for g in got}) >= 5000, 180), collector.count()
        assert wait_until(lambda: drained(settings, redis_client), 60)
        keys = Keys(settings.key_prefix)
        dead = {s: redis_client.xlen(keys.dead(s)) for s in range(4)}
        assert sum(dead.values()) == 0, f"dead-lettered: {dead}\n{pool.output()[-3000:]}"
        assert_complete_and_ordered(collector.by_node(), dict.fromkeys(nodes, 100))

        sent = total(crew)
        unexpected = sent["message"] + sent["presence"] + sent["iq_get"]
        assert wait_until(lambda: sum(ignored_counts(metrics_port).values())
                          >= sent["forged"] + sent["guessed"] + unexpected, 60)
        counts = ignored_counts(metrics_port)
        refusals = sum(a.refusals for a in crew)
        print(f"sniffed {relay.sniffed} publish IQs; sent {dict(sent)}; ignored {dict(counts)}; "
              f"refusals {refusals}")
        # Forgeries arrived while their IQ was in flight (the relay held it back); the rest,
        # and every guessed id, answered nothing in flight.
        assert counts[Ignored.FORGED_REPLY] > 0, counts
        assert counts[Ignored.FORGED_REPLY] + counts[Ignored.UNKNOWN_ID] == \
            sent["forged"] + sent["guessed"], counts
        assert counts[Ignored.UNEXPECTED] == unexpected, counts
        # RFC 6120 §8.2.3: each IQ request is answered, here with service-unavailable.
        assert wait_until(lambda: sum(a.refusals for a in crew) == sent["iq_get"], 10)
        assert pool.stop() == 0, pool.output()[-3000:]
    finally:
        pool.kill()
        collector.stop()
        for attacker in crew:
            attacker.stop()
        relay.close()
