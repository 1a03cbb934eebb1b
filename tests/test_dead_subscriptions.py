"""Dead anonymous subscriptions (issue 13 part 5) against the real ejabberd of the stack.

ejabberd 23.01 removes an anonymous account when its last session ends, but mod_pubsub then
cleans only the anonymous domain's own pubsub service, so a subscription to a node of the
publisher's service stayed and every later item was routed to it (docs/security.md).
ops/ejabberd/mod_scalepub_purge.erl unsubscribes such an account on the other services too.
Here anonymous sessions subscribe and end in each way a browser's can: a clean stream close,
a TCP reset, a BOSH session left to time out; the node must keep only the live subscriber,
who still gets the next item. Sessions that were open when ejabberd was killed never ran the
hook: the module removes them when ejabberd starts again.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from xml.sax.saxutils import quoteattr

import pytest

from loadtest.bosh import BoshClient, HTTPTransport
from loadtest.run import ejabberd_pids
from tests.e2e import wait_until
from tests.rawxmpp import NS_PUBSUB, RawClient
from tests.stack import Stack, running

pytestmark = pytest.mark.stack

NS_OWNER = "http://jabber.org/protocol/pubsub#owner"
# Seconds: closed/reset TCP sessions (ejabberd sees the close at once) and BOSH sessions
# (mod_bosh's max_inactivity, 30 s by default, after the last request), with room for a loaded box.
TCP_BOUND = 15.0
# Seconds for Mnesia to write the node and subscriptions to disk before the kill (they would
# be lost with it, and there would be nothing to test).
MNESIA_DUMP = 5.0
BOSH_BOUND = 75.0


@pytest.fixture
def publisher(stack: Stack) -> Iterator[RawClient]:
    """The publisher account's session (owner of the nodes it creates)."""
    env = stack.env
    user, domain = env["SCALEPUB_XMPP_JID"].split("@")
    client = RawClient(env["SCALEPUB_XMPP_HOST"], int(env["SCALEPUB_XMPP_PORT"]))
    client.login_plain(user, domain, env["SCALEPUB_XMPP_PASSWORD"])
    yield client
    client.close()


def owner_iq(publisher: RawClient, service: str, body: str, kind: str = "set") -> bytes:
    """An owner IQ by the publisher; the answer must be a result."""
    answer = publisher.iq(f"<pubsub xmlns='{NS_OWNER}'>{body}</pubsub>", service, kind)
    assert b"type='result'" in answer or b'type="result"' in answer, answer
    return answer


def subscribers(publisher: RawClient, service: str, node: str) -> set[str]:
    """Full JIDs subscribed to ``node`` (the owner's subscriptions list)."""
    answer = owner_iq(publisher, service, f"<subscriptions node={quoteattr(node)}/>", "get")
    return {m.decode() for m in re.findall(rb"<subscription [^>]*jid=['\"]([^'\"]+)", answer)}


def anonymous(stack: Stack, service: str, node: str) -> RawClient:
    """An anonymous TCP session subscribed to ``node``."""
    env = stack.env
    client = RawClient(env["SCALEPUB_XMPP_HOST"], int(env["SCALEPUB_XMPP_PORT"]))
    client.login_anonymous(env["SCALEPUB_ANON_DOMAIN"])
    assert b"type='result'" in client.subscribe(service, node)
    return client


def reset(client: RawClient) -> None:
    """Drop the connection with a TCP reset (no stream close): a lost network, a killed tab."""
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.sock.close()


def abandoned_bosh(stack: Stack, service: str, node: str) -> str:
    """A BOSH session that subscribes and is never polled again; returns its JID."""
    transport = HTTPTransport(stack.env["SCALEPUB_BOSH_URL"])
    client = BoshClient(transport, stack.env["SCALEPUB_ANON_DOMAIN"], wait=5)
    jid = client.connect()
    client.subscribe(service, [node])
    transport.close()
    return jid


def publish(publisher: RawClient, service: str, node: str, text: str) -> None:
    item = f"<item><entry xmlns='urn:scalepub:test'>{text}</entry></item>"
    answer = publisher.iq(f"<pubsub xmlns='{NS_PUBSUB}'><publish node={quoteattr(node)}>"
                          f"{item}</publish></pubsub>", service, "set")
    assert b"type='result'" in answer, answer


def test_anonymous_subscriptions_end_with_their_sessions(stack: Stack,
                                                         publisher: RawClient) -> None:
    service, node = stack.env["SCALEPUB_PUBSUB_SERVICE"], f"/dead/{uuid.uuid4().hex}"
    answer = publisher.iq(f"<pubsub xmlns='{NS_PUBSUB}'><create node={quoteattr(node)}/>"
                          "</pubsub>", service, "set")
    assert b"type='result'" in answer, answer
    how: dict[str, str] = {}
    how |= {abandoned_bosh(stack, service, node): "BOSH timed out" for _ in range(2)}
    started = time.monotonic()
    live = anonymous(stack, service, node)
    for _ in range(3):
        clean = anonymous(stack, service, node)
        how[clean.jid] = "stream closed"
        clean.close()
    for _ in range(3):
        dropped = anonymous(stack, service, node)
        how[dropped.jid] = "TCP reset"
        reset(dropped)
    bosh = {jid for jid, way in how.items() if way == "BOSH timed out"}
    left: set[str] = set()

    def only_live_left(ignored: set[str]) -> Callable[[], bool]:
        def check() -> bool:
            nonlocal left
            left = subscribers(publisher, service, node) - {live.jid} - ignored
            return not left
        return check

    # A closed or reset TCP session ends at once: its subscription goes within seconds.
    assert wait_until(only_live_left(bosh), TCP_BOUND, step=0.5), {j: how[j] for j in left}
    tcp_seconds = time.monotonic() - started
    assert wait_until(only_live_left(set()), BOSH_BOUND, step=1.0), {j: how[j] for j in left}
    assert live.jid in subscribers(publisher, service, node)
    publish(publisher, service, node, "after")
    assert live.read_until(rb"<entry xmlns='urn:scalepub:test'>after</entry>")
    live.close()
    print(f"dead subscriptions gone: TCP {tcp_seconds:.1f} s, BOSH {time.monotonic() - started:.1f} s")


@pytest.fixture
def own_stack() -> Iterator[Stack]:
    """A stack of its own: this test kills its ejabberd."""
    yield from running()


def login_publisher(stack: Stack) -> RawClient:
    env = stack.env
    user, domain = env["SCALEPUB_XMPP_JID"].split("@")
    client = RawClient(env["SCALEPUB_XMPP_HOST"], int(env["SCALEPUB_XMPP_PORT"]))
    client.login_plain(user, domain, env["SCALEPUB_XMPP_PASSWORD"])
    return client


def test_subscriptions_of_sessions_open_at_a_crash_go_at_the_next_start(own_stack: Stack) -> None:
    service, node = own_stack.env["SCALEPUB_PUBSUB_SERVICE"], "/dead/crash"
    publisher = login_publisher(own_stack)
    answer = publisher.iq(f"<pubsub xmlns='{NS_PUBSUB}'><create node={quoteattr(node)}/>"
                          "</pubsub>", service, "set")
    assert b"type='result'" in answer, answer
    clients = [anonymous(own_stack, service, node) for _ in range(3)]
    assert len(subscribers(publisher, service, node)) == 3
    time.sleep(MNESIA_DUMP)
    for pid in ejabberd_pids(own_stack):
        os.kill(pid, signal.SIGKILL)  # no session of it ends: no hook runs
    assert wait_until(lambda: not ejabberd_pids(own_stack), 30)
    for client in clients:
        client.sock.close()
    own_stack.up()
    publisher = login_publisher(own_stack)
    assert subscribers(publisher, service, node) == set()
    publisher.close()
