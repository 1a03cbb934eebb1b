"""ejabberd limits of ops/ejabberd (issue 13 part 5, server half) against the real server.

An anonymous connection is shaped (anon_c2s, 20,000 B/s after a 20,000 B burst); the
publisher account never is; an account other than the publisher keeps at most 10 sessions,
the publisher many more. Times here are lower bounds of a limit and a ratio measured in the
same run, not speed claims.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from scalepub.settings import Settings, env_mapping
from scalepub.xmpp.batch import publish_iq
from scalepub.xmpp.link import Reply, XmppLink
from tests.rawxmpp import RawClient
from tests.stack import Stack
from tests.test_amplification import big_batch
from tests.test_security import register

pytestmark = pytest.mark.stack

ANON_RATE = 20_000  # bytes/s: ops/ejabberd/ejabberd.yml shaper anon_c2s (burst = rate)
FLOOD = 100_000  # bytes a client sends before a ping; the ping's answer waits for them
PING = "<ping xmlns='urn:xmpp:ping'/>"


def anonymous_flood_seconds(env: dict[str, str]) -> float:
    """Seconds from the start of FLOOD bytes (whitespace) to the answer of the ping after it."""
    client = RawClient(env["SCALEPUB_XMPP_HOST"], int(env["SCALEPUB_XMPP_PORT"]), timeout=60)
    try:
        client.login_anonymous(env["SCALEPUB_ANON_DOMAIN"])
        start = time.monotonic()
        client.send(b" " * FLOOD)
        answer = client.iq(PING, env["SCALEPUB_ANON_DOMAIN"])
        assert b"type='result'" in answer, answer
        return time.monotonic() - start
    finally:
        client.close()


async def publisher_flood_seconds(settings: Settings, publishes: int) -> tuple[float, float]:
    """The publisher's link: FLOOD whitespace bytes then a ping, and ``publishes`` 2 KB
    publish IQs in flight at once; seconds for each."""
    waiting: dict[str, asyncio.Future[Reply]] = {}
    link = XmppLink(settings, f"limits-{uuid.uuid4().hex[:6]}", lambda i: i in waiting,
                    lambda r: waiting.pop(r.iq_id).set_result(r), lambda: None)
    loop = asyncio.get_running_loop()
    await link.connect(20)
    try:
        waiting["ping"] = loop.create_future()
        start = time.monotonic()
        link.send(b" " * FLOOD)
        # The link takes answers from the pubsub service only (issue 13 part 1): ask it.
        link.send(f"<iq type='get' id='ping' to='{settings.pubsub_service}'>"
                  "<query xmlns='http://jabber.org/protocol/disco#info'/></iq>".encode())
        assert (await asyncio.wait_for(waiting["ping"], 60)).ok
        flood = time.monotonic() - start
        node = f"/limits/{uuid.uuid4().hex[:8]}"
        futures = []
        start = time.monotonic()
        for seq in range(1, publishes + 1):
            futures.append(waiting.setdefault(f"lp{seq}", loop.create_future()))
            link.send(publish_iq(f"lp{seq}", settings.pubsub_service,
                                 big_batch(node, seq, 2_000), link.publish_options))
        replies = await asyncio.wait_for(asyncio.gather(*futures), 60)
        assert all(r.ok for r in replies), [r.reason for r in replies if not r.ok][:3]
        return flood, time.monotonic() - start
    finally:
        await link.close()


def test_an_anonymous_client_is_shaped_and_the_publisher_is_not(stack: Stack) -> None:
    settings = Settings.from_mapping(env_mapping(stack.env))
    anonymous = anonymous_flood_seconds(stack.env)
    publishes = 200
    publisher, publishing = asyncio.run(publisher_flood_seconds(settings, publishes))
    published_bytes = publishes * 2_000
    print(f"\n{FLOOD} B then a ping: anonymous {anonymous:.2f} s, publisher {publisher:.3f} s "
          f"(ratio {anonymous / publisher:.0f}); publisher sent {published_bytes} B of publish "
          f"IQs in {publishing:.2f} s = {published_bytes / publishing / ANON_RATE:.1f}x the "
          "anonymous rate")
    # The shaper: (FLOOD - burst) / rate = 4 s; a margin for the token bucket's rounding.
    assert anonymous >= 0.7 * (FLOOD - ANON_RATE) / ANON_RATE
    assert anonymous / publisher >= 10
    # Publishing goes far faster than any shaped connection could carry it.
    assert published_bytes / publishing >= 5 * ANON_RATE


def test_sessions_per_account_are_bounded_except_for_the_publisher(stack: Stack) -> None:
    env = stack.env
    host, port, domain = env["SCALEPUB_XMPP_HOST"], int(env["SCALEPUB_XMPP_PORT"]), \
        env["SCALEPUB_XMPP_DOMAIN"]
    jid, password = register(stack, f"limits{uuid.uuid4().hex[:8]}")
    user = jid.partition("@")[0]
    clients = [RawClient(host, port) for _ in range(11)]
    try:
        for client in clients:
            client.login_plain(user, domain, password)
        # The 11th session replaced the oldest: ejabberd closed its stream with a conflict.
        closed = clients[0].read_until(rb"</stream:stream>", 10)
        assert b"<conflict" in closed, closed
        for client in clients[1:]:
            assert b"type='result'" in client.iq(PING, domain)
    finally:
        for client in clients:
            client.close()

    publisher = env["SCALEPUB_XMPP_JID"].partition("@")[0]
    clients = [RawClient(host, port) for _ in range(15)]
    try:
        for client in clients:
            client.login_plain(publisher, domain, env["SCALEPUB_XMPP_PASSWORD"])
        for client in clients:
            assert b"type='result'" in client.iq(PING, domain)
    finally:
        for client in clients:
            client.close()
