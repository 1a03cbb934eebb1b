"""Forged pubsub events sent to a subscriber (follow-up of issue 13 part 1).

Anyone who can log in, anonymously too, can send a ``<message>`` carrying a pubsub event with
a scalepub batch to a subscriber's full JID. Subscribers take events only from the pubsub
service (bare JID, compared case-folded); the server stamps ``from`` on what its users send,
so a forger cannot claim the service's address. Here: the rule as a table, and ``scalepub
tail``'s Subscriber against the real ejabberd while an anonymous raw client (tests/rawxmpp)
forges events for the same node, with the seqs the real entries will have and beyond; and
that ejabberd ends the stream of a client claiming the service's address. The browser client's test is tests/test_browser_forged.py.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from xml.sax.saxutils import escape, quoteattr

import pytest

from scalepub.settings import Settings
from scalepub.xmpp.batch import Batch, Entry, entry_part, publish_iq
from scalepub.xmpp.link import Reply, XmppLink
from scalepub.xmpp.subscriber import ReceivedEntry, Subscriber, from_service
from tests.e2e import create_nodes
from tests.rawxmpp import RawClient
from tests.stack import Stack

NS_EVENT = "http://jabber.org/protocol/pubsub#event"


@pytest.mark.parametrize(("sender", "service", "taken"), [
    ("pubsub.localhost", "pubsub.localhost", True),
    ("PubSub.LocalHost", "pubsub.localhost", True),
    ("pubsub.localhost", "PubSub.localhost", True),
    ("pubsub.localhost/res", "pubsub.localhost", True),  # a resource only the server can use
    ("", "pubsub.localhost", False),  # no from: the server for the account, not the service
    ("localhost", "pubsub.localhost", False),
    ("x@pubsub.localhost", "pubsub.localhost", False),
    ("x@pubsub.localhost/r", "pubsub.localhost", False),
    ("evil.pubsub.localhost", "pubsub.localhost", False),
    ("pubsub.localhost.evil", "pubsub.localhost", False),
    ("abc@anon.localhost/r1", "pubsub.localhost", False),
    ("pubsub.localhost", "", False),
])
def test_from_service(sender: str, service: str, taken: bool) -> None:
    assert from_service(sender, service) is taken


def forged_event(to: str, node: str, seqs: list[int], claimed_from: str | None = None) -> str:
    """A pubsub event message as the service would send it, batch and all, made by anyone."""
    entries = "".join(
        f'<entry node={quoteattr(node)} seq="{s}" id="{s}-0" ts="{time.time_ns()}" '
        f'model="twitter.tweet" pk="{s}" fmt="json">'
        f'{escape(json.dumps([{"fields": {"text": "forged", "author": "mallory"}}]))}</entry>'
        for s in seqs)
    sender = "" if claimed_from is None else f" from={quoteattr(claimed_from)}"
    return (f"<message to={quoteattr(to)}{sender} type='headline'><event xmlns='{NS_EVENT}'>"
            f"<items node={quoteattr(node)}><item id='{seqs[0]}-{seqs[-1]}'>"
            f"<batch xmlns='urn:scalepub:1' node={quoteattr(node)} first='{seqs[0]}' "
            f"last='{seqs[-1]}' count='{len(seqs)}'><![CDATA[{entries}]]></batch></item></items>"
            "</event></message>")


def forgeries(to: str, node: str, first: int) -> list[str]:
    """Events a forger sends while seq ``first`` is the next real one: the same seqs (they would
    be shown, and hide the real ones as duplicates) and a seq far ahead (a gap that would hold
    the real ones back)."""
    return [forged_event(to, node, [first, first + 1]), forged_event(to, node, [first + 1000])]


def forger(env: dict[str, str]) -> RawClient:
    """An anonymous session on the anonymous domain."""
    client = RawClient(env["SCALEPUB_XMPP_HOST"], int(env["SCALEPUB_XMPP_PORT"]))
    client.login_anonymous(env["SCALEPUB_ANON_DOMAIN"])
    return client


class Publisher:
    """Publishes real batches over the shard's own link, each awaited to its IQ result."""

    def __init__(self, settings: Settings, node: str) -> None:
        self.node = node
        self.waiting: dict[str, asyncio.Future[Reply]] = {}
        self.link = XmppLink(settings, f"forged-events-{uuid.uuid4().hex[:6]}",
                             self.waiting.__contains__, self._answer, lambda: None)
        self.service = settings.pubsub_service

    def _answer(self, reply: Reply) -> None:
        self.waiting.pop(reply.iq_id).set_result(reply)

    async def publish(self, seqs: list[int]) -> None:
        batch = Batch(self.node, 0)
        for s in seqs:
            payload = json.dumps([{"fields": {"text": f"real {s}"}}]).encode()
            part = entry_part(node=self.node.encode(), seq=s, stream_id=f"{s}-0".encode(),
                              ts_ns=time.time_ns(), model=b"twitter.tweet", pk=str(s).encode(),
                              fmt=b"json", payload=payload)
            batch.add(Entry(f"{s}-0".encode(), self.node, s, time.time_ns(), part, b""))
        iq_id = self.link.new_id()
        self.waiting[iq_id] = asyncio.get_running_loop().create_future()
        answer = self.waiting[iq_id]
        self.link.send(publish_iq(iq_id, self.service, batch, self.link.publish_options))
        reply = await asyncio.wait_for(answer, 20)
        assert reply.ok, reply


async def until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return False


async def tail_under_forgery(settings: Settings, env: dict[str, str], node: str,
                             ) -> tuple[list[ReceivedEntry], int, int]:
    """Subscriber on ``node``; 3 rounds of forgeries then 3 real entries. Returns what it
    took, how many events it ignored and how many forged events were sent."""
    got: list[ReceivedEntry] = []
    sub = Subscriber(settings, [node], got.append)
    run = asyncio.create_task(sub.run())
    publisher = Publisher(settings, node)
    await publisher.link.connect()
    attacker = await asyncio.to_thread(forger, env)
    sent = 0
    try:
        assert await until(lambda: node in sub.subscribed, 20), sub.subscribed
        to = sub.client.boundjid.full
        for first in (1, 4, 7):
            for stanza in forgeries(to, node, first):
                await asyncio.to_thread(attacker.send, stanza)
                sent += 1
            await publisher.publish([first, first + 1, first + 2])
        assert await until(lambda: len(got) >= 9 and sub.ignored >= sent, 20), (
            [e.seq for e in got], sub.ignored, sent)
        await asyncio.sleep(0.5)  # anything late would show now
        return got, sub.ignored, sent
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        attacker.close()
        await publisher.link.close()


@pytest.mark.stack
@pytest.mark.timeout(90)
def test_tail_takes_only_the_services_events(stack: Stack, settings_for: Settings) -> None:
    node = f"/forged/events/{uuid.uuid4().hex[:8]}"
    create_nodes(stack.env, [node])
    settings = settings_for
    got, ignored, sent = asyncio.run(tail_under_forgery(settings, stack.env, node))
    assert [(e.node, e.seq) for e in got] == [(node, s) for s in range(1, 10)]
    assert [json.loads(e.summary())[0]["fields"]["text"] for e in got] == [
        f"real {s}" for s in range(1, 10)]
    assert ignored == sent == 6


@pytest.mark.stack
@pytest.mark.timeout(60)
def test_ejabberd_ends_the_stream_of_a_client_claiming_the_services_address(
        stack: Stack) -> None:
    """What the rule rests on: a forger cannot send from the service's address."""
    target = forger(stack.env)
    claimer = forger(stack.env)
    try:
        claimer.send(forged_event(target.jid, "/forged/claim", [1],
                                  claimed_from=stack.env["SCALEPUB_PUBSUB_SERVICE"]))
        with pytest.raises(ConnectionError, match="invalid-from"):
            claimer.drain(5)
        with pytest.raises(TimeoutError):  # nothing reached the target (its stream lives on)
            target.read_until(rb"forged", timeout=2)
    finally:
        claimer.close()
        target.close()
