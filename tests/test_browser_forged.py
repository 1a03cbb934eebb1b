"""Forged pubsub events sent to the browser client, in real Chromium (issue 13 follow-up).

The demo page (tests/test_browser.Demo: the pool, the example project, the JS bundle over
BOSH) follows two nodes. An anonymous raw XMPP client sends the page's full JID (read from
the client it exposes) pubsub event messages with scalepub batches for the same nodes while
real tweets flow: the seqs the real entries will have (which would be shown, and would hide
the real ones as duplicates) and seqs far ahead (a gap that would hold them back). The page
must show exactly the real tweets, per node in seq order, none lost, and count each forgery.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from scalepub.settings import Settings
from tests.stack import Stack
from tests.test_browser import Browser, Demo, DemoPage, assert_exactly_once_in_order
from tests.test_forged_events import forged_event, forger

pytestmark = [pytest.mark.stack, pytest.mark.django_db(transaction=True),
              pytest.mark.timeout(240)]

ROUNDS = 10  # each: forgeries for both nodes, then one real tweet per node


def ignored(page: DemoPage) -> int:
    """Forged events the page's client dropped (-1: a client that does not count them)."""
    return int(page.evaluate("() => window.scalepubClient.ignoredEvents ?? -1"))


def test_page_shows_only_the_services_entries(browser: Browser, live_server: Any,
                                              stack: Stack, scalepub_django: Settings,
                                              tmp_path: Path) -> None:
    d = Demo(browser, live_server, stack, scalepub_django, tmp_path / "pool.log", 2)
    attacker = forger(stack.env)
    page = d.page
    assert page is not None
    try:
        jid = page.evaluate("() => window.scalepubClient.connection.jid")
        assert "@" in jid and "/" in jid, jid  # the full JID the page is bound to
        sent = 0
        for seq in range(1, ROUNDS + 1):
            for node in d.nodes:
                attacker.send(forged_event(jid, node, [seq, seq + 1]))
                attacker.send(forged_event(jid, node, [seq + 1000]))
                sent += 2
            for author in range(2):
                d.tweet(author, f"real {author} {seq}")
        d.wait_distinct(2 * ROUNDS, timeout=60)
        # The anonymous shaper paces the forger: wait until every forgery reached the page.
        page.wait_for(lambda: ignored(page) >= sent, 30)
        time.sleep(1.0)  # a late forgery or catch-up would show now
        received = d.received()
        assert_exactly_once_in_order(received, dict.fromkeys(d.nodes, ROUNDS))
        assert [e["text"] for e in received if e["node"] == d.nodes[0]] == [
            f"real 0 {s}" for s in range(1, ROUNDS + 1)]
        assert ignored(page) == sent
        assert page.state()["lost"] == []
        assert page.history_fetches() == []  # no gap was ever seen: nothing to catch up
        assert not page.errors, page.errors
    finally:
        attacker.close()
        d.close()
