"""Catch-up in a real browser: a quiet node's missed entries behind a busy shard.

The demo page (client/js in Chromium, as tests/test_browser.py drives it) shows a quiet node's
first entry live; then the pool stops, the node gets two more entries and its shard 200,000
entries of other nodes, and ejabberd restarts. The page reconnects and can only learn of the
two entries from the history endpoint: it must show them, once, and report nothing lost.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from scalepub.settings import Settings
from tests.stack import Stack
from tests.test_browser import Demo, demo  # noqa: F401  (fixture)
from tests.test_history import bury

pytestmark = [pytest.mark.stack, pytest.mark.django_db(transaction=True),
              pytest.mark.timeout(300)]


def test_page_catches_up_a_quiet_node_behind_a_busy_shard(
    demo: Callable[..., Demo], stack: Stack, scalepub_django: Settings,  # noqa: F811
) -> None:
    d = demo(1)
    assert d.page is not None
    [node] = d.nodes
    d.tweet(0, "live")
    d.wait_distinct(1, timeout=30)
    d.pool.kill_tree()  # from now on nothing is published: only the history has what follows
    d.tweet(0, "missed 1")
    d.tweet(0, "missed 2")
    bury(scalepub_django, node, 200_000)
    before = len(d.page.statuses())
    done = stack.run("restart", "ejabberd")  # the page loses its session and reconnects
    assert done.returncode == 0, done.stderr
    d.wait_distinct(3, timeout=90)
    received = d.received()
    assert [(e["seq"], e["text"]) for e in received] == [
        (1, "live"), (2, "missed 1"), (3, "missed 2")], d.page.diagnose()
    assert d.page.state()["lost"] == []
    # the catch-up may finish before the subscription's answer: wait for the latter too
    page = d.page  # narrowed above; a lambda keeps only a local's narrowing
    assert page.wait_for(lambda: "subscribed" in page.statuses()[before:], 30), \
        d.page.statuses()[before:]
    fetches = d.page.history_fetches()
    assert [(f["status"], f["entries"]) for f in fetches] == [(200, 2)], fetches
    assert "after=1" in fetches[0]["url"]
    assert not d.page.errors, d.page.errors
