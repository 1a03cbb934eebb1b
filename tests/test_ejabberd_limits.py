"""ejabberd limits of ops/ejabberd (issue 13 part 5, server half) against the real server.

An anonymous connection is shaped (anon_c2s, 20,000 B/s after a 20,000 B burst); the
publisher account never is; an account other than the publisher keeps at most 10 sessions,
the publisher many more. Times here are lower bounds of a limit and a ratio measured in the
same run, not speed claims.

Per-address limits are the kernel's (ejabberd 23.01 has none): ops/ejabberd/firewall loads
ops/ejabberd/per-address-limits.nft. Tested on simulated hosts (network namespaces,
tests/hosts.py): the ruleset is loaded in the server host's namespace only, clients log in
from two other hosts, so the machine's own firewall is never touched.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from scalepub.settings import Settings, env_mapping
from scalepub.xmpp.batch import publish_iq
from scalepub.xmpp.link import Reply, XmppLink
from tests.e2e import wait_until
from tests.hosts import Namespaces, Server, netns_unavailable, simulated_hosts
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


# --- per-address limits: ops/ejabberd/firewall (nftables) ----------------------------------

FIREWALL = Path(__file__).resolve().parent.parent / "ops" / "ejabberd" / "firewall"
REFUSED = (ConnectionRefusedError, ConnectionResetError, ConnectionError)


def load_limits(hosts: Namespaces, server: Server, **limits: str) -> None:
    """``ops/ejabberd/firewall apply`` inside the server host, with SCALEPUB_FW_<name> limits."""
    env = server.env_for("server")
    ports = {"SCALEPUB_XMPP_PORT": env["SCALEPUB_XMPP_PORT"],
             "SCALEPUB_HTTP_PORT": str(urlsplit(env["SCALEPUB_BOSH_URL"]).port)}
    settings = {f"SCALEPUB_FW_{name}": value for name, value in limits.items()}
    done = subprocess.run(["ip", "netns", "exec", hosts.ns("server"), str(FIREWALL), "apply"],
                          env={**os.environ, **ports, **settings}, capture_output=True,
                          text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr


def anonymous_logins(env: dict[str, str], attempts: int) -> tuple[list[RawClient], int]:
    """Anonymous sessions opened one after the other (kept open), and how many were refused."""
    opened: list[RawClient] = []
    refused = 0
    for _ in range(attempts):
        try:
            client = RawClient(env["SCALEPUB_XMPP_HOST"], int(env["SCALEPUB_XMPP_PORT"]), 10)
        except REFUSED:
            refused += 1
            continue
        client.login_anonymous(env["SCALEPUB_ANON_DOMAIN"])
        opened.append(client)
    return opened, refused


def connects(address: tuple[str, int], attempts: int) -> int:
    """How many of ``attempts`` quick TCP connections (opened and closed) were accepted."""
    accepted = 0
    for _ in range(attempts):
        try:
            socket.create_connection(address, timeout=5).close()
            accepted += 1
        except REFUSED:
            pass
    return accepted


def close_all(clients: list[RawClient]) -> None:
    for client in clients:
        client.close()


@pytest.fixture(scope="module")
def limited_hosts() -> Iterator[tuple[Namespaces, Server]]:
    """A server host (Redis + ejabberd) and client hosts a and b, as network namespaces."""
    reason = netns_unavailable()
    if reason:
        pytest.fail(f"network namespaces needed for the per-address limits test: {reason}")
    if shutil.which("nft") is None:
        pytest.fail("nft missing: run `ops/stack install` as root (installs nftables)")
    with simulated_hosts("a", "b") as (hosts, server):
        assert isinstance(hosts, Namespaces)
        yield hosts, server


def test_open_connections_per_address_are_bounded(limited_hosts: tuple[Namespaces, Server],
                                                   ) -> None:
    hosts, server = limited_hosts
    load_limits(hosts, server, MAX_CONNS="5", NEW_PER_S="1000", NEW_BURST="1000")
    env_a, env_b = server.env_for("a"), server.env_for("b")
    http = (env_a["SCALEPUB_XMPP_HOST"], int(urlsplit(env_a["SCALEPUB_BOSH_URL"]).port or 0))
    with hosts.enter("a"):
        clients, refused = anonymous_logins(env_a, 8)
    try:
        assert (len(clients), refused) == (5, 3)
        with hosts.enter("a"):  # BOSH/WebSocket's port counts towards the same address
            assert connects(http, 1) == 0
        with hosts.enter("b"):  # another address is not affected
            others, refused_b = anonymous_logins(env_b, 2)
            assert (len(others), refused_b) == (2, 0)
            assert connects(http, 1) == 1
            close_all(others)
        clients.pop().close()
        with hosts.enter("a"):  # a closed connection frees its place
            again: list[RawClient] = []

            def one_more() -> bool:
                opened, _ = anonymous_logins(env_a, 1)
                again.extend(opened)
                return bool(opened)

            assert wait_until(one_more, 15, step=0.5)
            clients.extend(again)
    finally:
        close_all(clients)


def test_new_connections_per_address_are_rate_limited(limited_hosts: tuple[Namespaces, Server],
                                                      ) -> None:
    hosts, server = limited_hosts
    load_limits(hosts, server, MAX_CONNS="1000", NEW_PER_S="1", NEW_BURST="5")
    env = server.env_for("b")
    c2s = (env["SCALEPUB_XMPP_HOST"], int(env["SCALEPUB_XMPP_PORT"]))
    with hosts.enter("b"):
        start = time.monotonic()
        accepted = connects(c2s, 20)
        elapsed = time.monotonic() - start
    # The burst, plus at most one token per second that passed meanwhile.
    assert 5 <= accepted <= 5 + int(elapsed) + 1, (accepted, elapsed)


def test_exempt_addresses_are_never_limited(limited_hosts: tuple[Namespaces, Server]) -> None:
    hosts, server = limited_hosts
    load_limits(hosts, server, MAX_CONNS="2", NEW_PER_S="1", NEW_BURST="2",
                EXEMPT=hosts.hosts["a"])  # e.g. the pool's host
    env = server.env_for("a")
    with hosts.enter("a"):
        clients, refused = anonymous_logins(env, 8)
    close_all(clients)
    assert (len(clients), refused) == (8, 0)


def test_a_bad_limit_is_refused_naming_the_setting() -> None:
    done = subprocess.run([str(FIREWALL), "render"], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "SCALEPUB_FW_MAX_CONNS": "lots"}, check=False)
    assert done.returncode == 2
    assert "SCALEPUB_FW_MAX_CONNS must be a whole number" in done.stderr
    done = subprocess.run([str(FIREWALL), "render"], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "SCALEPUB_FW_EXEMPT": "10.0.0.1, pool-host"},
                          check=False)
    assert done.returncode == 2
    assert "SCALEPUB_FW_EXEMPT: 'pool-host' is not an IPv4 or IPv6 address" in done.stderr
