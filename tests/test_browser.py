"""The demo page in a real browser: Chromium (Debian's) driven by Playwright.

Django saves → streams → `scalepub run` → ejabberd → BOSH or WebSocket → the browser client
(client/js, built to client/js/dist) → the demo page (example/twitter). The page records what
it shows in ``window.scalepubDemo``; these tests read it and the DOM.

Playwright's sync API marks its event loop as running in the thread that drives it, and
Django's ORM refuses to run in such a thread (SynchronousOnlyOperation), so the browser lives
in a worker thread of its own (``Browser``) and the test thread saves the rows.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

import pytest

from scalepub.settings import Settings
from tests.e2e import PoolProcess, create_nodes, wait_until
from tests.stack import Stack

pytestmark = [pytest.mark.stack, pytest.mark.django_db(transaction=True),
              pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "client" / "js" / "dist" / "scalepub-client.iife.js"
ARTIFACTS = REPO / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync",
]
XSS = "<img src=x onerror=alert(1)>"
# Runs before the page's scripts: records every history request the client makes and how many
# entries each answer held (the client takes window.fetch when it is constructed).
RECORD_HISTORY = """
window.__historyFetches = [];
const pageFetch = window.fetch.bind(window);
window.fetch = async (...args) => {
  const response = await pageFetch(...args);
  const url = String(args[0] && args[0].url ? args[0].url : args[0]);
  if (url.includes("/scalepub/history")) {
    const record = { url, status: response.status, entries: null };
    window.__historyFetches.push(record);
    response.clone().json().then(b => { record.entries = b.entries.length; }, () => {});
  }
  return response;
};
"""

T = TypeVar("T")


class Browser:
    """Chromium driven by Playwright's sync API, every call made in one worker thread."""

    def __init__(self) -> None:
        from playwright.sync_api import sync_playwright

        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="playwright")
        self._playwright: Any = self.call(lambda: sync_playwright().start())
        try:
            self._browser: Any = self.call(lambda: self._playwright.chromium.launch(
                executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS))
        except BaseException:
            self.call(self._playwright.stop)
            self._worker.shutdown()
            raise

    def call(self, fn: Callable[[], T], timeout: float = 60.0) -> T:
        """Run ``fn`` in the browser's thread and return its result."""
        return self._worker.submit(fn).result(timeout)

    def open(self, url: str) -> DemoPage:
        """A new page (own context: fresh cookies and storage) at ``url``."""
        return DemoPage(self, url)

    def close(self) -> None:
        try:
            self.call(self._browser.close)
            self.call(self._playwright.stop)
        finally:
            self._worker.shutdown()


class DemoPage:
    """The demo page; ``dialogs``, ``console`` and ``errors`` record what the page raised."""

    def __init__(self, browser: Browser, url: str) -> None:
        self.browser = browser
        self.dialogs: list[str] = []
        self.console: list[str] = []
        self.errors: list[str] = []

        def open_page() -> Any:
            context = browser._browser.new_context(viewport={"width": 1000, "height": 800})
            context.add_init_script(RECORD_HISTORY)
            page = context.new_page()
            page.on("dialog", self._on_dialog)
            page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: self.errors.append(str(e)))
            page.goto(url, wait_until="load")
            return page

        self.page: Any = browser.call(open_page)

    def _on_dialog(self, dialog: Any) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def evaluate(self, script: str) -> Any:
        return self.browser.call(lambda: self.page.evaluate(script))

    def state(self) -> dict[str, Any]:
        """``window.scalepubDemo``: received entries, statuses, lost ranges."""
        found: dict[str, Any] | None = self.evaluate("() => window.scalepubDemo || null")
        return found or {"received": [], "statuses": [], "lost": []}

    def statuses(self) -> list[str]:
        return list(self.evaluate("() => window.scalepubDemo ? window.scalepubDemo.statuses : []"))

    def received_count(self) -> int:
        return int(self.evaluate(
            "() => window.scalepubDemo ? window.scalepubDemo.received.length : 0"))

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        return wait_until(predicate, timeout, 0.2)

    def history_fetches(self) -> list[dict[str, Any]]:
        """The client's requests to the history endpoint: {url, status, entries}."""
        return list(self.evaluate("() => window.__historyFetches"))

    def wait_subscribed(self, nodes: int, timeout: float = 30.0) -> None:
        """Until the client reported 'subscribed' once per node."""
        assert self.wait_for(lambda: self.statuses().count("subscribed") >= nodes, timeout), (
            self.diagnose())

    def diagnose(self) -> str:
        """What the page said, for assertion messages."""
        try:
            statuses: Any = self.statuses()
            count: Any = self.received_count()
        except Exception as exc:
            statuses = count = f"<unavailable: {exc!r}>"
        return (f"statuses={statuses} received={count} errors={self.errors[-5:]} "
                f"console={self.console[-15:]}")

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.browser.call(lambda: self.page.screenshot(path=str(path)))

    def close(self) -> None:
        self.browser.call(self.page.context.close)




def unique_prefix() -> str:
    return f"b{uuid.uuid4().hex[:6]}u"


class Demo:
    """The pool, pubsub nodes of ``authors`` authors and the demo page subscribed to them."""

    def __init__(self, browser: Browser, live_server: Any, stack: Stack, settings: Settings,
                 log: Path, authors: int, transport: str = "bosh") -> None:
        self.prefix = unique_prefix()
        self.authors = [f"{self.prefix}{i}" for i in range(authors)]
        self.nodes = [f"/twitter/Tweet/{a}" for a in self.authors]
        create_nodes(stack.env, self.nodes)
        self.pool = PoolProcess(settings, log, "--shards", "4")
        self.page: DemoPage | None = None
        try:
            query = {"authors": authors, "prefix": self.prefix}
            if transport == "websocket":
                query["transport"] = "websocket"
            self.page = browser.open(f"{live_server.url}/?{urlencode(query)}")
            self.page.wait_subscribed(len(self.nodes))
        except BaseException:
            self.close()
            raise

    def tweet(self, author: int, text: str) -> None:
        from twitter.models import Tweet

        Tweet.objects.create(author=self.authors[author], text=text)

    def received(self) -> list[dict[str, Any]]:
        assert self.page is not None
        return list(self.page.state()["received"])

    def distinct(self) -> int:
        assert self.page is not None
        return int(self.page.evaluate(
            "() => new Set(window.scalepubDemo.received.map(e => e.node + ' ' + e.seq)).size"))

    def wait_distinct(self, count: int, timeout: float) -> None:
        assert self.page is not None
        assert self.page.wait_for(lambda: self.distinct() >= count, timeout), (
            f"{self.distinct()}/{count} distinct entries; {self.page.diagnose()}; "
            f"pool: {self.pool.output()[-2000:]}")

    def close(self) -> None:
        try:
            if self.page is not None:
                self.page.close()
        finally:
            self.pool.kill()


@pytest.fixture
def demo(browser: Browser, live_server: Any, stack: Stack, scalepub_django: Settings,
         tmp_path: Path) -> Iterator[Callable[..., Demo]]:
    """A factory: ``demo(authors, transport)``; everything it started is stopped after."""
    made: list[Demo] = []

    def make(authors: int, transport: str = "bosh") -> Demo:
        d = Demo(browser, live_server, stack, scalepub_django, tmp_path / f"pool{len(made)}.log",
                 authors, transport)
        made.append(d)
        return d

    try:
        yield make
    finally:
        for d in made:
            d.close()


def assert_exactly_once_in_order(received: list[dict[str, Any]],
                                 expected: dict[str, int]) -> None:
    """Every node shows seqs 1..n, in that order, none twice."""
    twice = [k for k, n in Counter((e["node"], e["seq"]) for e in received).items() if n > 1]
    assert not twice, f"shown twice: {twice[:10]}"
    by_node: dict[str, list[int]] = {}
    for e in received:
        by_node.setdefault(e["node"], []).append(int(e["seq"]))
    assert set(by_node) == set(expected), set(by_node) ^ set(expected)
    for node, count in expected.items():
        assert by_node[node] == list(range(1, count + 1)), f"{node}: {by_node[node][:30]}..."


def feed_of_500(d: Demo) -> str:
    """500 tweets over 10 authors; the page shows each exactly once, per node in seq order.

    Returns the timings: saves, first save to last entry shown, latencies the page shows.
    """
    assert d.page is not None
    started = time.monotonic()
    for i in range(500):
        d.tweet(i % 10, f"tweet {i}")
    saved = time.monotonic() - started
    d.wait_distinct(500, timeout=60)
    elapsed = time.monotonic() - started
    time.sleep(0.5)  # anything shown twice would show up now
    received = d.received()
    assert len(received) == 500, d.page.diagnose()
    assert_exactly_once_in_order(received, dict.fromkeys(d.nodes, 50))
    for e in received:  # the payload made it through: author i's k-th tweet
        author = d.nodes.index(e["node"])
        assert e["text"] == f"tweet {10 * (e['seq'] - 1) + author}", e
    assert d.page.state()["lost"] == []
    assert d.page.evaluate("() => document.getElementById('count').textContent") == "500"
    rows = d.page.evaluate("() => Array.from(document.querySelectorAll('#feed li .text'),"
                           " c => c.textContent)")
    assert len(rows) == 200  # the page keeps the newest 200
    assert set(rows) <= {f"tweet {i}" for i in range(500)}
    assert d.page.history_fetches() == []  # all of it live, none caught up
    assert not d.page.errors, d.page.errors
    cells = d.page.evaluate("() => Array.from(document.querySelectorAll('#feed li .latency'),"
                            " c => c.textContent)")
    shown = sorted(int(c.split()[0]) for c in cells)
    return (f"500 tweets over 10 nodes saved in {saved:.2f} s, all shown {elapsed:.2f} s after "
            f"the first save; latency (commit → shown) of the last 200: median {shown[100]} ms, "
            f"max {shown[-1]} ms")


def test_bosh_page_shows_500_tweets_exactly_once_in_order(demo: Callable[..., Demo]) -> None:
    d = demo(10)
    timings = feed_of_500(d)
    assert d.page is not None
    d.page.screenshot(ARTIFACTS / "demo.png")
    print(f"BOSH: {timings}")


def test_websocket_page_shows_500_tweets_exactly_once_in_order(
    demo: Callable[..., Demo],
) -> None:
    d = demo(10, "websocket")
    print(f"WebSocket: {feed_of_500(d)}")


@pytest.mark.parametrize("transport", ["bosh", "websocket"])
def test_page_catches_up_after_an_ejabberd_restart(
    demo: Callable[..., Demo], stack: Stack, transport: str,
) -> None:
    d = demo(4, transport)
    assert d.page is not None
    made = Counter[int]()

    def tweet() -> None:
        i = sum(made.values())
        made[i % 4] += 1
        d.tweet(i % 4, f"{transport} {i}")

    for _ in range(40):  # before: live
        tweet()
    d.wait_distinct(40, timeout=30)
    before = len(d.page.statuses())

    restarted: list[Any] = []
    restart = threading.Thread(target=lambda: restarted.append(stack.run("restart", "ejabberd")))
    started = time.monotonic()
    restart.start()
    while restart.is_alive():  # while ejabberd stops, is down and starts again
        tweet()
        time.sleep(0.05)
    restart.join()
    assert restarted and restarted[0].returncode == 0, restarted
    down_for = time.monotonic() - started
    during = sum(made.values()) - 40
    for _ in range(40):  # after: back up
        tweet()
    total = sum(made.values())

    d.wait_distinct(total, timeout=90)
    caught_up = time.monotonic() - started
    time.sleep(1.0)  # a late duplicate (re-delivery or a second catch-up) would show now
    received = d.received()
    assert_exactly_once_in_order(received, {d.nodes[a]: made[a] for a in range(4)})
    assert d.page.state()["lost"] == []
    statuses = d.page.statuses()
    assert "disconnected" in statuses[before:], f"the client missed the restart: {statuses}"
    assert statuses[before:].count("subscribed") == 4, statuses[before:]
    # After resubscribing, the client asked the history endpoint for what it missed.
    fetches = d.page.history_fetches()
    assert {f["status"] for f in fetches} == {200}, fetches
    fetched = sum(f["entries"] or 0 for f in fetches)
    assert fetched > 0, fetches
    assert not d.page.errors, d.page.errors
    print(f"{transport}: restart took {down_for:.1f} s with {during} tweets made meanwhile; "
          f"all {total} shown once {caught_up:.1f} s after it began; {len(fetches)} history "
          f"requests returned {fetched} entries; statuses after: {statuses[before:]}")


def test_tweet_text_is_shown_as_text_never_as_html(demo: Callable[..., Demo]) -> None:
    d = demo(1)
    assert d.page is not None
    texts = [XSS, "]]><script>alert(2)</script><![CDATA[", "&amp; &lt;b&gt; \"q\" 'a' ünï 🐍"]
    for text in texts:
        d.tweet(0, text)
    d.wait_distinct(len(texts), timeout=30)
    time.sleep(0.5)  # an onerror handler would have fired by now
    assert [e["text"] for e in d.received()] == texts
    shown = d.page.evaluate("() => Array.from(document.querySelectorAll('#feed li .text'),"
                            " c => c.textContent)")
    assert shown == texts[::-1]  # newest first
    assert d.page.evaluate("() => document.querySelectorAll('img').length") == 0
    assert d.page.evaluate("() => document.querySelectorAll('#feed script, #feed b').length") == 0
    assert d.page.dialogs == []
    assert not d.page.errors, d.page.errors
