"""Locust users that are BOSH subscribers of scalepub nodes (run by ``loadtest/run.py``).

Each user opens one BOSH session (SASL ANONYMOUS) on a lean keep-alive HTTP connection of its
own (``loadtest/leanhttp.py``: Locust's own HTTP client cost ~70 % of this process's CPU at
~3,400 long polls/s), subscribes to its nodes and long-polls; every poll is still a Locust
request (``POST bosh``). Every new entry reports its end-to-end latency (now - the entry's commit
timestamp) as a Locust request of type ``entry`` named after the node's kind (``hot`` or
``author``), so Locust's statistics and CSV carry the percentiles. The process also keeps its
own per-second latency histograms and per-node seq tracks (``loadtest/entries.py``): the run
checks them against the rows saved (the producers' databases) for lost entries and duplicates.

Configuration comes from the JSON file named by ``LOADTEST_CONFIG``; results go to its
``out_dir`` as ``progress-<pid>.json`` (every 0.5 s) and ``subscribers-<pid>.json`` (when the
users stop).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import gevent
from locust import User, constant, events, task
from locust.env import Environment

from loadtest.bosh import (
    BoshClient,
    BoshError,
    BoshTerminated,
    TransportError,
    pubsub_items,
)
from loadtest.entries import Tracker, entries_of_batch, scan_body
from loadtest.leanhttp import LeanTransport
from loadtest.scenario import nodes_for

log = logging.getLogger("loadtest")

CONFIG: dict[str, Any] = json.loads(Path(os.environ["LOADTEST_CONFIG"]).read_text())
OUT = Path(CONFIG["out_dir"])
TRACKER = Tracker()
STATE: dict[str, Any] = {"ready": 0, "reconnects": 0, "written": 0.0, "sampled": 0}
SUBSCRIPTIONS: dict[str, int] = {}  # node → users of this process following it
PROGRESS_EVERY_S = 0.5
_numbers = itertools.count()
RECONNECT_PAUSE_S = 1.0
CONNECT_ATTEMPTS = 5


class LocustTransport:
    """Posts BOSH bodies on the user's own connection and reports each as a Locust request."""

    def __init__(self, user: User, url: str) -> None:
        self.fire = user.environment.events.request.fire
        self.http = LeanTransport(url)

    def post(self, body: bytes, timeout: float) -> bytes:
        """POST to the BOSH URL; errors are ``TransportError`` (the client retries)."""
        started = time.perf_counter()
        error: TransportError | None = None
        data = b""
        try:
            data = self.http.post(body, timeout)
        except TransportError as exc:
            error = exc
        self.fire(request_type="POST", name="bosh",
                  response_time=(time.perf_counter() - started) * 1000.0,
                  response_length=len(data), exception=error, context=None)
        if error is not None:
            raise error
        return data

    def close(self) -> None:
        """Drop the connection."""
        self.http.close()


class BoshSubscriber(User):
    """One anonymous BOSH session following its nodes until the run stops."""

    wait_time = constant(0)
    url = CONFIG["bosh_base"] + CONFIG["bosh_path"]

    def on_start(self) -> None:
        """Pick this user's nodes, log in and subscribe."""
        worker = getattr(self.environment.runner, "worker_index", 0) or 0
        self.number = worker * 100_000 + next(_numbers)
        self.nodes = nodes_for(self.number, CONFIG["hot_node"], CONFIG["author_nodes"],
                               CONFIG["authors_per_user"])
        self.labels = {n.encode(): ("hot" if n == CONFIG["hot_node"] else "author")
                       for n in self.nodes}
        self.fire = self.environment.events.request.fire
        self.bosh = self._open()
        STATE["ready"] += 1
        for node in self.nodes:
            SUBSCRIPTIONS[node] = SUBSCRIPTIONS.get(node, 0) + 1

    def _open(self) -> BoshClient:
        """A subscribed session; a failed attempt is reported and retried with a new one."""
        for attempt in range(1, CONNECT_ATTEMPTS + 1):
            transport = LocustTransport(self, self.url)
            bosh = BoshClient(transport, CONFIG["anon_domain"], wait=CONFIG["wait_s"],
                              retries=1)
            try:
                bosh.connect(resource=f"u{self.number}")
                for node in self.nodes:
                    TRACKER.track(self.number, node)
                bosh.subscribe(CONFIG["pubsub_service"], self.nodes)
            except (BoshError, TransportError) as exc:
                transport.close()
                self.fire(request_type="bosh", name="connect", response_time=0,
                          response_length=0, exception=exc, context=None)
                log.warning("user %d: connect attempt %d failed: %s", self.number, attempt, exc)
                if attempt == CONNECT_ATTEMPTS:
                    raise
                gevent.sleep(RECONNECT_PAUSE_S * attempt)
                continue
            bosh.retries = 3
            self.transport = transport
            return bosh
        raise AssertionError("unreachable")

    @task
    def listen(self) -> None:
        """One long poll; a lost session is reopened (entries missed meanwhile count as lost)."""
        try:
            if self.bosh.inbox:
                self._received_stanzas(self.bosh.poll())
            else:
                self._received_raw(self.bosh.poll_raw())
        except (BoshError, TransportError) as exc:
            self._reconnect(exc)

    def _received_raw(self, raw: bytes) -> None:
        now = time.time_ns()
        if now / 1e9 - STATE["written"] > PROGRESS_EVERY_S:  # also when the timer greenlet
            _write_progress()                                 # starves under a busy loop
        found = scan_body(raw)
        if found is None:  # the fast scan could not vouch for the count: parse properly
            self._received_stanzas(list(self.bosh.parse(raw)), now)
        elif found:
            self._report(found, now)

    def _received_stanzas(self, stanzas: list[Any], now: int | None = None) -> None:
        now = now or time.time_ns()
        for stanza in stanzas:
            for _node, item in pubsub_items(stanza, CONFIG["pubsub_service"]):
                for payload in item:
                    self._report(entries_of_batch(payload), now)

    def _report(self, found: list[tuple[bytes, bytes, bytes]], now: int) -> None:
        entries = TRACKER.feed(self.number, found, now)
        every = CONFIG["locust_sample"]
        if every != 1:
            for i, (node, latency_ms) in enumerate(entries, STATE["sampled"]):
                if every and i % every == 0:
                    self._fire_entry(node, latency_ms)
            STATE["sampled"] += len(found)
            return
        for node, latency_ms in entries:
            self._fire_entry(node, latency_ms)

    def _fire_entry(self, node: bytes, latency_ms: float) -> None:
        self.fire(request_type="entry", name=self.labels.get(node, "other"),
                  response_time=latency_ms, response_length=0, exception=None, context=None)

    def _reconnect(self, exc: Exception) -> None:
        STATE["reconnects"] += 1
        kind = "terminated" if isinstance(exc, BoshTerminated) else type(exc).__name__
        self.fire(request_type="bosh", name="reconnect", response_time=0, response_length=0,
                  exception=exc, context=None)
        log.warning("user %d: %s (%s); reconnecting", self.number, exc, kind)
        self.transport.close()
        gevent.sleep(RECONNECT_PAUSE_S)
        self.bosh = self._open()

    def on_stop(self) -> None:
        """Close the connection (the session times out on the server)."""
        self.transport.close()


def _write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def _progress() -> dict[str, Any]:
    return {"pid": os.getpid(), "time": time.time(), "transport": "bosh", "ready": STATE["ready"],
            "reconnects": STATE["reconnects"], "entries": TRACKER.entries,
            "duplicates": TRACKER.duplicates, "subscriptions": SUBSCRIPTIONS}


def _write_progress() -> None:
    STATE["written"] = time.time()
    _write(OUT / f"progress-{os.getpid()}.json", _progress())


def _report_progress() -> None:
    while True:
        _write_progress()
        gevent.sleep(PROGRESS_EVERY_S)


@events.init.add_listener  # type: ignore[untyped-decorator]  # locust leaves it untyped
def _on_init(environment: Environment, **_kwargs: Any) -> None:
    from locust.runners import MasterRunner

    if not isinstance(environment.runner, MasterRunner):
        gevent.spawn(_report_progress)


@events.test_stopping.add_listener  # type: ignore[untyped-decorator]  # locust leaves it untyped
def _on_test_stopping(environment: Environment, **_kwargs: Any) -> None:
    # The run stops users only once every expected delivery arrived (loadtest/run.py drain),
    # so this dump is complete; a --processes worker may be killed before the events below.
    _dump()


@events.test_stop.add_listener  # type: ignore[untyped-decorator]  # locust leaves it untyped
def _on_test_stop(environment: Environment, **_kwargs: Any) -> None:
    _dump()  # users stopped: nothing is received after this one


@events.quit.add_listener  # type: ignore[untyped-decorator]  # locust leaves it untyped
def _on_quit(**_kwargs: Any) -> None:
    _dump()  # again at exit: the same figures if nothing arrived in between


def _dump() -> None:
    # A master of --processes has no users and no tracker of its own.
    if STATE["ready"] or TRACKER.entries:
        _write_progress()
        _write(OUT / f"subscribers-{os.getpid()}.json", {**_progress(), **TRACKER.to_json()})
