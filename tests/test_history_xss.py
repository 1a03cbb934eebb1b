"""Crafted history links run no script: real Chromium against a live server of the example project.

A victim who follows ``/scalepub/history?node=<script>…`` (or a payload in ``after`` or
``limit``) must not run the attacker's script in the site's origin. Each payload sets
``window.__pwned`` and opens an alert; the page must show neither. A control page proves
that this browser, so driven, does report a script that runs. Before the fix these links ran
the script: the errors were text/html echoing the parameters (issue 13 part 2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import pytest

from scalepub.producer import PendingEntry, StreamProducer
from scalepub.settings import Settings
from tests.test_browser import Browser

if TYPE_CHECKING:  # playwright is imported where a browser starts (tests/test_browser.py)
    from playwright.sync_api import Dialog

pytestmark = [pytest.mark.stack, pytest.mark.django_db(transaction=True),
              pytest.mark.timeout(240)]

SCRIPT = "<script>window.__pwned=1;alert(1)</script>"
IMG = "<img src=x onerror=\"window.__pwned=1;alert(1)\">"
SVG = "<svg onload=\"window.__pwned=1;alert(1)\">"
# Valid node names may hold markup: that answer is a 200, its JSON echoes the name.
MARKUP_NODE = "/" + SCRIPT + IMG
# How the page took the answer, the text it shows (Chromium puts a JSON or text document in a
# <pre>) and the flag a payload sets.
SHOWN = """() => [document.contentType,
                 (document.querySelector("pre") || document.body || {}).textContent || "",
                 window.__pwned === undefined ? null : window.__pwned]"""
LINKS: dict[str, dict[str, str | list[str]]] = {
    "node: script": {"node": SCRIPT},
    "node: img onerror": {"node": IMG},
    "node: closing quote, then script": {"node": "'\"></pre>" + SCRIPT},
    "after: img onerror": {"node": "/twitter/Tweet/alice", "after": IMG},
    "after: script": {"node": "/twitter/Tweet/alice", "after": SCRIPT},
    "limit: svg onload": {"node": "/twitter/Tweet/alice", "limit": SVG},
    "node given twice": {"node": [SCRIPT, IMG]},
    "valid node holding markup (200)": {"node": MARKUP_NODE},
}


@dataclass
class Visit:
    """What Chromium did with one URL."""

    status: int
    headers: dict[str, str]
    content_type: str  # document.contentType: how the browser took the answer
    text: str  # what the page shows
    pwned: Any  # window.__pwned after load: set only if a payload ran
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def visit(browser: Browser, url: str) -> Visit:
    """Open ``url`` in a fresh context, let it load and settle, and report."""
    dialogs: list[str] = []
    errors: list[str] = []

    def dismiss(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    def run() -> Visit:
        context = browser._browser.new_context()
        try:
            page = context.new_page()
            page.on("dialog", dismiss)
            page.on("pageerror", lambda e: errors.append(str(e)))
            response = page.goto(url, wait_until="load")
            page.wait_for_timeout(300)  # an onerror/onload handler would have run by now
            state = page.evaluate(SHOWN)
            return Visit(response.status if response else 0,
                         dict(response.headers) if response else {}, state[0], state[1],
                         state[2], dialogs, errors)
        finally:
            context.close()

    return browser.call(run)


def test_the_browser_reports_a_script_that_runs(browser: Browser) -> None:
    """Control: the detector sees a payload that does run."""
    ran = visit(browser, "data:text/html," + SCRIPT.replace(";", "%3B"))
    assert ran.pwned == 1 and ran.dialogs == ["1"]


@pytest.mark.parametrize("name", list(LINKS))
def test_a_crafted_history_link_runs_no_script(browser: Browser, live_server: Any,
                                               scalepub_django: Settings, name: str) -> None:
    params = LINKS[name]
    if name.endswith("(200)"):
        publish_one(scalepub_django, MARKUP_NODE)
    url = f"{live_server.url}/scalepub/history?{urlencode(params, doseq=True)}"
    seen = visit(browser, url)
    assert seen.pwned is None and seen.dialogs == [], f"{name}: script ran ({seen})"
    assert seen.headers.get("x-content-type-options") == "nosniff"
    assert seen.headers.get("content-type") == "application/json"
    assert seen.content_type == "application/json"
    body = json.loads(seen.text)  # shown as data, the JSON text itself
    if name.endswith("(200)"):
        assert seen.status == 200 and body["node"] == MARKUP_NODE
        assert [e["seq"] for e in body["entries"]] == [1]
    else:
        assert seen.status == 400 and body["param"] in ("node", "after", "limit"), body


def publish_one(settings: Settings, node: str) -> None:
    producer = StreamProducer(settings)
    try:
        assert not producer.append([PendingEntry(node, 1, "t.row", "1", "json", b"{}")]).failures
    finally:
        producer.close()

