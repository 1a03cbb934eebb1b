"""ejabberd's CPU per publish on a node whose anonymous subscribers left, against two baselines.

Issue 13 part 5 (docs/security.md, "Dead anonymous subscriptions"). On a private stack, three
nodes, published to in interleaved rounds:

- ``clean``: never had a subscriber (the baseline);
- ``gone``: ``--subscribers`` anonymous TCP sessions subscribed and closed their streams
  (ops/ejabberd/mod_scalepub_purge.erl should have removed their subscriptions);
- ``stale``: as many subscriptions of anonymous full JIDs without a session, made by the owner
  (a ``pubsub#owner`` subscriptions set): what ejabberd 23.01 kept before that module.

Prints subscriptions left per node and ejabberd's CPU µs per publish (median of the rounds)
with its ratio to ``clean``; then ejabberd's CPU per anonymous session (log in, subscribe,
close: the module's cleanup scans pubsub_state) before and after ``--table-rows`` more
subscriptions are added to another node. The box may be shared: the ratios, measured in the
same run, are what to read.

    .venv/bin/python loadtest/bench_dead_subscriptions.py --subscribers 500 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
import uuid
from pathlib import Path
from xml.sax.saxutils import quoteattr

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from loadtest.bench_publish import cpu_ticks  # noqa: E402
from loadtest.run import ejabberd_pids  # noqa: E402
from tests.rawxmpp import NS_PUBSUB, RawClient  # noqa: E402
from tests.stack import Stack, new_stack  # noqa: E402

NS_OWNER = "http://jabber.org/protocol/pubsub#owner"
TICK_US = 1e6 / os.sysconf("SC_CLK_TCK")


def iq_ok(client: RawClient, body: str, to: str, kind: str = "set") -> bytes:
    """An IQ whose answer must be a result."""
    answer = client.iq(body, to, kind)
    if b"type='result'" not in answer:
        raise RuntimeError(f"refused: {answer[:300]!r}")
    return answer


def subscription_count(pub: RawClient, service: str, node: str) -> int:
    answer = iq_ok(pub, f"<pubsub xmlns='{NS_OWNER}'><subscriptions node={quoteattr(node)}/>"
                        "</pubsub>", service, "get")
    return len(re.findall(rb"<subscription ", answer))


def leave(env: dict[str, str], node: str, count: int) -> None:
    """``count`` anonymous sessions subscribe to ``node`` and close their streams."""
    for _ in range(count):
        client = RawClient(env["SCALEPUB_XMPP_HOST"], int(env["SCALEPUB_XMPP_PORT"]))
        client.login_anonymous(env["SCALEPUB_ANON_DOMAIN"])
        iq_ok(client, f"<pubsub xmlns='{NS_PUBSUB}'><subscribe node={quoteattr(node)} "
                      f"jid={quoteattr(client.jid)}/></pubsub>", env["SCALEPUB_PUBSUB_SERVICE"])
        client.close()


def stale(pub: RawClient, env: dict[str, str], node: str, count: int) -> None:
    """``count`` subscriptions of anonymous full JIDs that have no session, set by the owner."""
    anon = env["SCALEPUB_ANON_DOMAIN"]
    for start in range(0, count, 100):
        subs = "".join(f"<subscription jid='{uuid.uuid4().hex}@{anon}/r' "
                       "subscription='subscribed'/>" for _ in range(start, min(count, start + 100)))
        iq_ok(pub, f"<pubsub xmlns='{NS_OWNER}'><subscriptions node={quoteattr(node)}>{subs}"
                   "</subscriptions></pubsub>", env["SCALEPUB_PUBSUB_SERVICE"])


def publish_cost_us(pub: RawClient, stack: Stack, node: str, publishes: int) -> float:
    """ejabberd's CPU µs per publish IQ (one small item each, one at a time)."""
    service, pids = stack.env["SCALEPUB_PUBSUB_SERVICE"], ejabberd_pids(stack)
    before = cpu_ticks(pids)
    for i in range(publishes):
        iq_ok(pub, f"<pubsub xmlns='{NS_PUBSUB}'><publish node={quoteattr(node)}><item>"
                   f"<entry xmlns='urn:scalepub:bench'>{i}</entry></item></publish></pubsub>",
              service)
    return (cpu_ticks(pids) - before) * TICK_US / publishes


def session_cost_us(stack: Stack, node: str, sessions: int) -> float:
    """ejabberd's CPU µs per anonymous session that logs in, subscribes and closes."""
    pids = ejabberd_pids(stack)
    before = cpu_ticks(pids)
    leave(stack.env, node, sessions)
    time.sleep(1)  # the last sessions' hooks
    return (cpu_ticks(pids) - before) * TICK_US / sessions


def logout_cost(pub: RawClient, stack: Stack, args: argparse.Namespace) -> None:
    """What a session end costs now that it scans pubsub_state: at its size now and larger."""
    node, filler = "/bench/dead/logout", "/bench/dead/filler"
    for name in (node, filler):
        iq_ok(pub, f"<pubsub xmlns='{NS_PUBSUB}'><create node={quoteattr(name)}/></pubsub>",
              stack.env["SCALEPUB_PUBSUB_SERVICE"])
    small = session_cost_us(stack, node, args.sessions)
    stale(pub, stack.env, filler, args.table_rows)
    large = session_cost_us(stack, node, args.sessions)
    added = subscription_count(pub, stack.env["SCALEPUB_PUBSUB_SERVICE"], filler)
    print(f"ejabberd CPU per anonymous session (login, subscribe, close), {args.sessions} each: "
          f"{small:.0f} us at ~{args.subscribers} subscriptions in pubsub_state, {large:.0f} us "
          f"with {added} more ({large / small:.2f}x)")


def measure(stack: Stack, args: argparse.Namespace) -> None:
    env = stack.env
    service = env["SCALEPUB_PUBSUB_SERVICE"]
    user, domain = env["SCALEPUB_XMPP_JID"].split("@")
    pub = RawClient(env["SCALEPUB_XMPP_HOST"], int(env["SCALEPUB_XMPP_PORT"]), timeout=60)
    pub.login_plain(user, domain, env["SCALEPUB_XMPP_PASSWORD"])
    nodes = {name: f"/bench/dead/{name}" for name in ("clean", "gone", "stale")}
    for node in nodes.values():
        iq_ok(pub, f"<pubsub xmlns='{NS_PUBSUB}'><create node={quoteattr(node)}/></pubsub>",
              service)
    leave(env, nodes["gone"], args.subscribers)
    stale(pub, env, nodes["stale"], args.subscribers)
    time.sleep(2)  # the last sessions' hooks
    for name, node in nodes.items():
        print(f"{name:6s}: {subscription_count(pub, service, node):5d} subscriptions left")
    costs: dict[str, list[float]] = {name: [] for name in nodes}
    order = list(nodes)
    for r in range(args.rounds):
        for name in order[r % 3:] + order[:r % 3]:  # rotate who goes first
            costs[name].append(publish_cost_us(pub, stack, nodes[name], args.publishes))
    base = statistics.median(costs["clean"])
    print(f"ejabberd CPU per publish, median of {args.rounds} rounds of {args.publishes}, "
          f"load {os.getloadavg()[0]:.1f}:")
    for name, values in costs.items():
        mid = statistics.median(values)
        print(f"{name:6s}: {mid:8.0f} us  ({mid / base:4.2f}x clean)  rounds: "
              + " ".join(f"{v:.0f}" for v in values))
    if args.table_rows:
        logout_cost(pub, stack, args)
    pub.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--publishes", type=int, default=300, help="per node and round")
    parser.add_argument("--sessions", type=int, default=300,
                        help="anonymous sessions per logout-cost measurement")
    parser.add_argument("--table-rows", type=int, default=20_000,
                        help="subscriptions added before the second logout-cost measurement "
                             "(0: skip it)")
    args = parser.parse_args()
    stack = new_stack()
    try:
        stack.up()
        measure(stack, args)
    finally:
        stack.down()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
