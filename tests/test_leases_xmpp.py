"""What ejabberd does with a replaced session's bytes: the XMPP half of shard fencing.

Every owner of a shard logs in with the same full JID (``scalepub-<prefix>-shard-<N>``), so
the new owner's login replaces the old owner's session. The fencing argument
(docs/reliability.md §5, "Shard leases and fencing", point 4) needs two facts, checked here
with raw sockets against the real ejabberd:

1. Once the new session is bound, nothing the old session sends is published: the server
   closed it (``<conflict/>``) and drops the rest.
2. Nothing of the old session is handled after the new session's first stanza: what it wrote
   before the replacement is handled in its order before it, or dropped. ejabberd 23.01 alone
   does not give this (the old session's process ends asynchronously and can still be
   publishing the stanzas it had already read); ops/ejabberd/mod_scalepub_replaced.erl holds
   the new bind until that process has ended. With SCALEPUB_EJABBERD_REPLACED_WAIT_MS=0 (the
   module's wait off) this test fails (docs/reliability.md gives the rates measured).
"""

from __future__ import annotations

import base64
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from xml.sax.saxutils import quoteattr

import pytest

from scalepub.settings import Settings
from tests.e2e import Collector, Got, create_nodes
from tests.rawxmpp import NS_PUBSUB, RawClient
from tests.stack import STACK, Stack, new_stack, running

_STREAM = ("<?xml version='1.0'?><stream:stream to={domain} xmlns='jabber:client' "
           "xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>")
# Publish IQs the old session writes right before the new login: enough that its process still
# has a TCP read's worth of them queued when the new session binds.
BURST = 1500
ROUNDS = 4
FIRST_NEW = 10_000
LATE = 20_000
CLUSTER_ROUNDS = 3
# Seconds after a login before every node of a cluster knows (and replaces) its session
# (tests/test_ejabberd_cluster.py measured it).
SESSION_KNOWN_S = 2.0


def _authenticate(env: dict[str, str]) -> RawClient:
    """A raw publisher session, authenticated and restarted, not yet bound."""
    user, domain = env["SCALEPUB_XMPP_JID"].split("@")
    client = RawClient(env["SCALEPUB_XMPP_HOST"], int(env["SCALEPUB_XMPP_PORT"]))
    token = base64.b64encode(f"\0{user}\0{env['SCALEPUB_XMPP_PASSWORD']}".encode()).decode()
    client.send(_STREAM.format(domain=quoteattr(domain)))
    client.read_until(rb"</stream:features>")
    client.send(f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{token}</auth>")
    client.read_until(rb"<success[^>]*(/>|</success>)")
    client.send(_STREAM.format(domain=quoteattr(domain)))
    client.read_until(rb"</stream:features>")
    return client


def _bind(resource: str) -> str:
    return ("<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
            f"<resource>{resource}</resource></bind></iq>")


def _publish(service: str, node: str, seq: int, who: str) -> str:
    entry = f'<entry node={quoteattr(node)} seq="{seq}" id="{who}-{seq}"/>'
    return (f"<iq type='set' id='{who}{seq}' to={quoteattr(service)}><pubsub xmlns='{NS_PUBSUB}'>"
            f"<publish node={quoteattr(node)}><item id='{who}{seq}'><batch xmlns='urn:t'>"
            f"<![CDATA[{entry}]]></batch></item></publish></pubsub></iq>")


def _acked(client: RawClient, who: str, seq: int, timeout: float = 20) -> None:
    client.read_until(f"id='{who}{seq}'|id=\"{who}{seq}\"".encode(), timeout=timeout)


def _replace_once(old_env: dict[str, str], new_env: dict[str, str], node: str, resource: str,
                  known_s: float = 0.0) -> str:
    """Old session, its burst, then the new session's bind and first publish in one write.

    ``known_s``: seconds the old session is given to be known on every node of a cluster.
    """
    service = old_env["SCALEPUB_PUBSUB_SERVICE"]
    new = _authenticate(new_env)
    old = _authenticate(old_env)
    old.send(_bind(resource))
    old.read_until(rb"</iq>")
    old.send(_publish(service, node, 1, "old"))
    _acked(old, "old", 1)
    time.sleep(known_s)
    # The old owner has a burst in flight when the new owner logs in (a stalled owner's last
    # writes, or bytes a healed partition delivers late); its process is handling it.
    old.send("".join(_publish(service, node, seq, "old") for seq in range(2, BURST + 2)))
    _acked(old, "old", 2)
    # The new owner publishes as soon as it can: right behind its bind, in the same write.
    started = time.monotonic()
    new.send(_bind(resource) + _publish(service, node, FIRST_NEW, "new"))
    _acked(new, "new", FIRST_NEW)
    waited = time.monotonic() - started
    ended = _how_it_ended(old)
    # What the old session sends now goes nowhere.
    late_error = "accepted by the socket, dropped"
    try:
        for seq in range(LATE, LATE + 5):
            old.send(_publish(service, node, seq, "old"))
            time.sleep(0.02)
    except OSError as exc:  # the server closed the socket: the write fails
        late_error = type(exc).__name__
    new.send(_publish(service, node, FIRST_NEW + 1, "new"))
    _acked(new, "new", FIRST_NEW + 1)
    old.sock.close()
    new.close()
    return (f"its stream: {ended}; its later writes: {late_error}; "
            f"the new bind to its first publish's answer {waited:.3f} s")


def _how_it_ended(old: RawClient) -> str:
    """The old session was told why it ended (``<conflict/>``), unless the reset came first.

    ejabberd closes the socket with the unread rest of the burst in it, so the kernel answers
    with a reset, which can discard the ``<conflict/>`` before the client has read it.
    """
    try:
        text = old.read_until(rb"<conflict|</stream:stream>", timeout=10)
    except ConnectionResetError:
        return "reset before its <conflict/> was read"
    assert b"conflict" in text, text[-500:]
    return "<conflict/>"


def _violations(got: list[int]) -> list[str]:
    """What breaks the strict claim in one node's seqs (arrival order)."""
    marker = got.index(FIRST_NEW)
    before, after = got[:marker], got[marker:]
    found = []
    if before[0] != 1 or before != sorted(before):
        found.append(f"the old session's publishes out of order: {before[:20]}")
    # Nothing the old session wrote after it was told <conflict/> is ever published, and
    # nothing of it at all after the new session's first publish.
    if after != [FIRST_NEW, FIRST_NEW + 1]:
        found.append(f"after the new session's first publish: {after[:10]} "
                     f"({len(after) - 2} of the old session's)")
    return found


def _assert_strict(by_node: dict[str, list[Got]], nodes: list[str], late: list[str]) -> None:
    """Every round's node, as one subscriber saw it, keeps the strict claim."""
    failed = {}
    for k, node in enumerate(nodes):
        got = [g.seq for g in by_node[node]]
        handled = sum(seq < FIRST_NEW for seq in got)
        print(f"round {k}: the old session's publishes: {handled} handled, "
              f"{BURST + 1 - handled} dropped; {late[k]}")
        if problems := _violations(got):
            failed[k] = problems
    assert not failed, f"{len(failed)} of {len(nodes)} rounds: {failed}"


def _wait_for_rounds(collector: Collector, rounds: int) -> dict[str, list[Got]]:
    assert collector.wait_for(lambda got: sum(g.seq == FIRST_NEW + 1 for g in got) == rounds, 30)
    time.sleep(0.5)
    return collector.by_node()


def test_a_replaced_session_publishes_nothing_after_the_new_login(
        settings_for: Settings, stack: Stack) -> None:
    env = stack.env
    resource = f"scalepub-{settings_for.key_prefix}-shard-0"
    nodes = [f"/lease/{settings_for.key_prefix}/replaced-{k}" for k in range(ROUNDS)]
    create_nodes(env, nodes)
    collector = Collector(env, nodes).start()
    try:
        late = [_replace_once(env, env, node, resource) for node in nodes]
        by_node = _wait_for_rounds(collector, ROUNDS)
    finally:
        collector.stop()
    _assert_strict(by_node, nodes, late)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Stack]:
    """Two clustered ejabberd nodes (no PostgreSQL: nothing here needs it)."""
    yield from running(ejabberd_nodes=2, SCALEPUB_POSTGRES="off")


@pytest.mark.slow  # ~25 s with its own two-node cluster's start
def test_a_replaced_session_on_another_node_publishes_nothing_after_the_new_login(
        cluster: Stack) -> None:
    """The old owner on node 1, the new one on node 2: the module monitors a remote pid, and
    subscribers on both nodes see nothing of the old session after the new one's first."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    resource = f"scalepub-{prefix}-shard-0"
    nodes = [f"/lease/{prefix}/replaced-{k}" for k in range(CLUSTER_ROUNDS)]
    env1, env2 = cluster.node_env(1), cluster.node_env(2)
    for node in nodes:  # one at a time: creations at once abort each other on a cluster
        create_nodes(env1, [node])
    collectors = [Collector(env1, nodes).start(), Collector(env2, nodes).start()]
    try:
        late = [_replace_once(env1, env2, node, resource, SESSION_KNOWN_S) for node in nodes]
        seen = [_wait_for_rounds(c, CLUSTER_ROUNDS) for c in collectors]
    finally:
        for c in collectors:
            c.stop()
    for where, by_node in zip(("node 1", "node 2"), seen, strict=True):
        print(f"a subscriber on {where}:")
        _assert_strict(by_node, nodes, late)


@pytest.fixture(scope="module")
def short_wait() -> Iterator[Stack]:
    """A stack whose binds wait at most 1 ms for a replaced session (less than any takes)."""
    yield from running(SCALEPUB_POSTGRES="off", SCALEPUB_EJABBERD_REPLACED_WAIT_MS="1")


def test_past_the_bound_the_new_session_goes_on_and_ejabberd_says_so(short_wait: Stack) -> None:
    env = short_wait.env
    resource = f"scalepub-t{uuid.uuid4().hex[:10]}-shard-0"
    old = _authenticate(env)
    old.send(_bind(resource))
    old.read_until(rb"</iq>")
    new = _authenticate(env)
    new.send(_bind(resource) + "<iq type='get' id='ping'><ping xmlns='urn:xmpp:ping'/></iq>")
    answer = new.read_until(rb"id='ping'[^>]*>|id=\"ping\"[^>]*>")
    assert b"result" in answer, answer
    assert b"conflict" in old.read_until(rb"<conflict|</stream:stream>", timeout=10)
    old.sock.close()
    new.close()
    log = short_wait.state_dir / "ejabberd" / "log" / "ejabberd.log"
    deadline = time.monotonic() + 10
    while b"mod_scalepub_replaced" not in log.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.2)
    lines = [line for line in log.read_text().splitlines() if "mod_scalepub_replaced" in line]
    assert any(f"/{resource}: 1 of 1 older session(s) still running" in line
               for line in lines), lines


@pytest.mark.parametrize("value", ["-1", "5s", "12345678"])
def test_a_bad_wait_is_refused_naming_the_setting(tmp_path: Path, value: str) -> None:
    stack = new_stack(SCALEPUB_STACK_DIR=str(tmp_path), SCALEPUB_EJABBERD_REPLACED_WAIT_MS=value)
    done = subprocess.run([str(STACK), "env"], env={**os.environ, **stack.control}, text=True,
                          capture_output=True, timeout=30, check=False)
    assert done.returncode == 1, done
    assert "SCALEPUB_EJABBERD_REPLACED_WAIT_MS" in done.stderr and value in done.stderr
