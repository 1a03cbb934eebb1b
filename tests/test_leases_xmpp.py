"""What ejabberd does with a replaced session's bytes: the XMPP half of shard fencing.

Every owner of a shard logs in with the same full JID (``scalepub-<prefix>-shard-<N>``), so
the new owner's login replaces the old owner's session. The fencing argument
(docs/reliability.md, "Shard leases and fencing") needs two facts, checked here with raw
sockets against the real ejabberd:

1. Once the new session is bound, nothing the old session sends is published: the server
   closed it (``<conflict/>``) and drops the rest.
2. What the old session wrote before the replacement is handled in its order; usually all of
   it before the new session's first publish, but ejabberd ends a replaced session
   asynchronously, so the tail of a burst it had already received can be handled after it
   (late duplicates with older seqs, never anything written after the replacement).
"""

from __future__ import annotations

import base64
import time
from xml.sax.saxutils import quoteattr

from scalepub.settings import Settings
from tests.e2e import Collector, create_nodes
from tests.rawxmpp import NS_PUBSUB, RawClient
from tests.stack import Stack

_STREAM = ("<?xml version='1.0'?><stream:stream to={domain} xmlns='jabber:client' "
           "xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>")
BURST = 300


def _login(env: dict[str, str], resource: str) -> RawClient:
    """A raw publisher session bound to ``resource``."""
    user, domain = env["SCALEPUB_XMPP_JID"].split("@")
    client = RawClient(env["SCALEPUB_XMPP_HOST"], int(env["SCALEPUB_XMPP_PORT"]))
    token = base64.b64encode(f"\0{user}\0{env['SCALEPUB_XMPP_PASSWORD']}".encode()).decode()
    client.send(_STREAM.format(domain=quoteattr(domain)))
    client.read_until(rb"</stream:features>")
    client.send(f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{token}</auth>")
    client.read_until(rb"<success[^>]*(/>|</success>)")
    client.send(_STREAM.format(domain=quoteattr(domain)))
    client.read_until(rb"</stream:features>")
    client.send("<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
                f"<resource>{resource}</resource></bind></iq>")
    client.read_until(rb"</iq>")
    return client


def _publish(service: str, node: str, seq: int, who: str) -> str:
    entry = f'<entry node={quoteattr(node)} seq="{seq}" id="{who}-{seq}"/>'
    return (f"<iq type='set' id='{who}{seq}' to={quoteattr(service)}><pubsub xmlns='{NS_PUBSUB}'>"
            f"<publish node={quoteattr(node)}><item id='{who}{seq}'><batch xmlns='urn:t'>"
            f"<![CDATA[{entry}]]></batch></item></publish></pubsub></iq>")


def test_a_replaced_session_publishes_nothing_after_the_new_login(
        settings_for: Settings, stack: Stack) -> None:
    env = stack.env
    service = env["SCALEPUB_PUBSUB_SERVICE"]
    node = f"/lease/{settings_for.key_prefix}/replaced"
    resource = f"scalepub-{settings_for.key_prefix}-shard-0"
    create_nodes(env, [node])
    collector = Collector(env, [node]).start()
    try:
        old = _login(env, resource)
        old.send(_publish(service, node, 1, "old"))
        old.read_until(rb"id='old1'|id=\"old1\"")
        # The old owner has a burst in its socket when the new owner logs in (a stalled
        # owner's last writes, or bytes a healed partition delivers late).
        old.send("".join(_publish(service, node, seq, "old") for seq in range(2, BURST + 2)))
        new = _login(env, resource)
        new.send(_publish(service, node, 10_000, "new"))
        new.read_until(rb"id='new10000'|id=\"new10000\"")
        # The old session was told why it ended, and what it sends now goes nowhere.
        conflict = old.read_until(rb"<conflict|</stream:stream>", timeout=10)
        assert b"conflict" in conflict
        late_error = None
        try:
            for seq in range(20_000, 20_005):
                old.send(_publish(service, node, seq, "old"))
                time.sleep(0.05)
        except OSError as exc:  # the server closed the socket: the write fails
            late_error = exc
        new.send(_publish(service, node, 10_001, "new"))
        new.read_until(rb"id='new10001'|id=\"new10001\"")
        assert collector.wait_for(lambda got: any(g.seq == 10_001 for g in got), 20)
        time.sleep(0.5)
        got = [g.seq for g in collector.by_node()[node]]
    finally:
        collector.stop()
    marker = got.index(10_000)
    before, after = got[:marker], got[marker:]
    assert before[0] == 1 and before == sorted(before), before[:20]
    # Nothing the old session wrote after it was told <conflict/> is ever published.
    assert not any(seq >= 20_000 for seq in got)
    new_ones = [seq for seq in after if seq >= 10_000]
    late = [seq for seq in after if seq < 10_000]
    assert new_ones == [10_000, 10_001], after
    # The old session's process can still be routing the burst it had already received when
    # the new session publishes (ejabberd ends a replaced session asynchronously: seen once in
    # a loaded CI run, 1 of 300 after the new login). Such late ones are only bytes written
    # before the new login, in their order, and after everything handled before it: in a
    # shard they are entries the new owner re-publishes (duplicates with older seqs, which
    # subscribers drop by seq; docs/reliability.md §5, point 4).
    burst = range(2, BURST + 2)
    assert all(seq in burst for seq in late) and late == sorted(late), late
    assert not late or late[0] > before[-1], (before[-5:], late[:5])
    print(f"old session: {len(before) - 1} of its {BURST} burst publishes were handled before the "
          f"new login, {len(late)} after it; its later writes: "
          f"{type(late_error).__name__ if late_error else 'accepted by the socket, dropped'}")
