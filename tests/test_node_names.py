"""Node names from user data, end to end: a per-author node for ``José Ñ``, ``mary jane`` and
``a&b <c> "d"`` (the readable name is the node id, docs/protocol.md "Node names").

Django save → stream → ``scalepub run`` → ejabberd → an independent slixmpp subscriber
(tests/e2e.Collector) and the JS client in Chromium (the built bundle, over BOSH), both
subscribed under the readable names; then the history endpoint, asked by the JS client
itself (a page that resumes from seq 0) and by plain HTTP.
"""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest

from scalepub.settings import Settings
from tests.e2e import Collector, Got, PoolProcess, create_nodes
from tests.stack import Stack
from tests.test_browser import Browser

pytestmark = [pytest.mark.stack, pytest.mark.django_db(transaction=True),
              pytest.mark.timeout(240)]

TWEETS = 3  # per author
PAGE = """<!doctype html><meta charset="utf-8"><title>node names</title>
<script src="/static/scalepub-client.iife.js"></script>
<script>
  window.got = []; window.statuses = []; window.asked = [];
  const config = %s;
  window.client = new ScalePub.PubSubClient(Object.assign(config, {
    event_cb: (e) => window.got.push({ node: e.node, seq: e.seq, text: (e.fields || {}).text }),
    status_cb: (s, d) => window.statuses.push([s, typeof d === "string" ? d : JSON.stringify(d)]),
    fetch: async (url, options) => {  // the history requests, with how many entries came back
      const response = await window.fetch(url, options);
      const body = await response.clone().json();
      window.asked.push({ url: String(url), status: response.status, entries: body.entries.length });
      return response;
    },
  }));
</script>"""


class Page:
    """A page of the live server's origin running PubSubClient with ``config``."""

    def __init__(self, browser: Browser, origin: str, config: dict[str, Any]) -> None:
        self.browser = browser
        self.console: list[str] = []
        body = PAGE % json.dumps(config).replace("<", "\\u003c")  # no </script> in the JSON

        def open_page() -> Any:
            context = browser._browser.new_context()
            page = context.new_page()
            page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))
            # A document of the live server's origin, loaded from it (a page Playwright made
            # up would count as public, and Chromium blocks its requests to loopback BOSH).
            page.goto(f"{origin}/static/scalepub-client.iife.js", wait_until="load")
            page.set_content(body, wait_until="load")
            return page

        self.page: Any = browser.call(open_page)

    def evaluate(self, script: str) -> Any:
        return self.browser.call(lambda: self.page.evaluate(script))

    def wait_for(self, script: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.evaluate(script):
                return True
            time.sleep(0.2)
        return False

    def got(self) -> list[tuple[str, int, str]]:
        return [(e["node"], e["seq"], e["text"]) for e in self.evaluate("() => window.got")]

    def close(self) -> None:
        self.browser.call(self.page.context.close)


def test_readable_node_names_end_to_end(browser: Browser, live_server: Any, stack: Stack,
                                        scalepub_django: Settings, tmp_path: Path) -> None:
    from twitter.models import Tweet

    tag = uuid.uuid4().hex[:6]
    authors = [f"José Ñ {tag}", f"mary jane {tag}", f'a&b <c> "d" {tag}']
    nodes = [f"/twitter/Tweet/{a}" for a in authors]
    create_nodes(stack.env, nodes)  # so both subscribers are in place before the first save
    config = {"nodes": nodes, "service": stack.env["SCALEPUB_BOSH_URL"],
              "domain": stack.env["SCALEPUB_ANON_DOMAIN"],
              "pubsub": stack.env["SCALEPUB_PUBSUB_SERVICE"], "historyUrl": "/scalepub/history"}
    pool = PoolProcess(scalepub_django, tmp_path / "pool.log", "--shards", "4")
    collector = Collector(stack.env, nodes).start()
    live = Page(browser, live_server.url, config)
    pages = [live]
    try:
        assert live.wait_for("() => window.statuses.filter(s => s[0] === 'subscribed').length"
                             " === 3", 30), (live.evaluate("() => window.statuses"), live.console)
        for i in range(TWEETS):
            for author in authors:
                Tweet.objects.create(author=author, text=f"{author} says {i}")
            # One pubsub item per round: ejabberd replays only a node's last item to a new
            # subscriber, so the page that resumes from 0 must ask the history for the rest.
            made = len(authors) * (i + 1)

            def enough(got: list[Got], n: int = made) -> bool:
                return len(got) >= n

            assert collector.wait_for(enough, 60), (
                collector.received, pool.output()[-2000:])
        expected = [(n, seq, f"{a} says {seq - 1}")
                    for a, n in zip(authors, nodes, strict=True) for seq in range(1, TWEETS + 1)]

        # The independent subscriber: every entry, under the readable name, in seq order.
        assert collector.wait_for(lambda got: len(got) >= len(expected), 60), (
            collector.received, pool.output()[-2000:])
        assert {n: [g.seq for g in got] for n, got in collector.by_node().items()} == (
            {node: list(range(1, TWEETS + 1)) for node in nodes})

        # The JS client, live over BOSH.
        assert live.wait_for(f"() => window.got.length >= {len(expected)}", 30), (
            live.evaluate("() => window.statuses"))
        assert sorted(live.got()) == sorted(expected)

        # The JS client's catch-up: a page resuming from seq 0 gets the last item replayed by
        # ejabberd on subscribe (seq 3) and asks the history endpoint for the seqs before it.
        resumed = Page(browser, live_server.url, {**config, "since": dict.fromkeys(nodes, 0)})
        pages.append(resumed)
        assert resumed.wait_for(f"() => window.got.length >= {len(expected)}", 30), (
            resumed.evaluate("() => [window.statuses, window.asked]"))
        assert sorted(resumed.got()) == sorted(expected)
        fetches = resumed.evaluate("() => window.asked")
        assert {f["status"] for f in fetches} == {200}, fetches
        asked = {parse_qs(urlsplit(f["url"]).query)["node"][0] for f in fetches if f["entries"]}
        assert asked == set(nodes), fetches  # each readable name, sent and answered
        time.sleep(0.5)
        assert len(live.got()) == len(expected)  # nothing twice
    finally:
        for page in pages:
            page.close()
        collector.stop()
        pool.kill()

    # The history endpoint by plain HTTP, the node name percent-encoded in the query.
    for author, node in zip(authors, nodes, strict=True):
        query = urlencode({"node": node, "after": 0})
        with urllib.request.urlopen(f"{live_server.url}/scalepub/history?{query}") as reply:
            body = json.load(reply)
        assert body["node"] == node and body["last_seq"] == TWEETS and not body["lost"]
        assert [(e["node"], e["seq"]) for e in body["entries"]] == [
            (node, seq) for seq in range(1, TWEETS + 1)]
        texts = [ET.fromstring(e["payload"]).findtext("object/field[@name='text']")
                 for e in body["entries"]]
        assert texts == [f"{author} says {i}" for i in range(TWEETS)]
