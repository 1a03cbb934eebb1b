"""End-to-end helpers: the pool as a real subprocess, and an independent subscriber.

The subscriber is a plain slixmpp client written here, not the project's code: it proves what
arrives on the wire, whatever scalepub believes it sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Self

import redis
import slixmpp

from scalepub.settings import Settings
from scalepub.sharding import Keys

REPO = Path(__file__).resolve().parents[1]


def settings_env(settings: Settings) -> dict[str, str]:
    """SCALEPUB_* variables describing ``settings``."""
    return {f"SCALEPUB_{k.upper()}": str(v) for k, v in dataclasses.asdict(settings).items()}


class PoolProcess:
    """``scalepub run`` in a subprocess, its output in a log file."""

    def __init__(self, settings: Settings, log_path: Path, *args: str) -> None:
        self.settings = settings
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "scalepub"), "run", *args],
            # No metrics endpoint unless a test asks: pools of parallel runs would collide.
            env={**os.environ, **settings_env(settings), "SCALEPUB_METRICS_PORT": "0"},
            stdout=self._log, stderr=self._log,
            cwd=REPO,
        )

    def wait_serving(self, client: redis.Redis, timeout: float = 60.0) -> None:
        """Until the heartbeat of each of the settings' shards is in Redis: every shard process
        has started and reads (asserts, with the pool's log)."""
        keys = Keys(self.settings.key_prefix)
        beats = [keys.heartbeat(s) for s in range(self.settings.shards)]
        assert wait_until(lambda: client.exists(*beats) == len(beats), timeout), \
            self.output()[-3000:]

    def signal(self, signum: int = signal.SIGTERM) -> None:
        """Send a signal to the supervisor."""
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        """Best-effort cleanup after a failed test."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()

    def kill_tree(self) -> float | None:
        """kill -9 of the supervisor and every process under it at once: nothing publishes
        after this returns (a supervisor killed alone leaves its shard processes to notice).
        Returns None here; tests/leases.py's Supervisor overrides it to say when the kill went."""
        tree, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo += _children(pid)
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.kill()
        return None

    def output(self) -> str:
        """Everything the pool logged so far."""
        return self.log_path.read_text(errors="replace")

    def shard_pids(self) -> list[int]:
        """PIDs of the shard processes: the children of the supervisor's forkserver."""
        servers = [p for p in _children(self.proc.pid) if b"forkserver" in _cmdline(p)]
        return [p for server in servers for p in _children(server)]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True,
                         check=False).stdout
    return [int(p) for p in out.split()]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return b""


@dataclasses.dataclass(frozen=True)
class Got:
    """An entry as received: its node, seq and stream id (and, not compared, its append time
    and arrival time, both ``time.time_ns()``, and the number of the pubsub item that carried
    it, counted by the receiver from 1)."""

    node: str
    seq: int
    id: str
    ts: int = dataclasses.field(default=0, compare=False)
    at: int = dataclasses.field(default=0, compare=False)
    item: int = dataclasses.field(default=0, compare=False)


class Collector:
    """An anonymous slixmpp subscriber in its own thread, recording every entry received.

    With ``reconnect``, a lost session is re-opened and the nodes subscribed again (entries
    published while it was away are missed: ejabberd keeps no items by default).
    """

    def __init__(self, env: dict[str, str], nodes: Iterable[str], reconnect: bool = False) -> None:
        self.env = env
        self.nodes = list(nodes)
        self.reconnect = reconnect
        self.sessions = 0  # sessions that subscribed (more than 1: it reconnected)
        self._closing = False
        self.received: list[Got] = []
        self.items = 0  # pubsub items received
        self.subscribed = threading.Event()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._error: BaseException | None = None
        self._client: Any = None

    def start(self, timeout: float = 60.0) -> Self:
        """Connect and subscribe to every node; returns once subscribed."""
        self._thread.start()
        if not self.subscribed.wait(timeout):
            raise TimeoutError(f"subscriber not subscribed within {timeout} s: {self._error!r}")
        return self

    def stop(self) -> None:
        """Disconnect and end the thread."""
        self._closing = True

        async def close() -> None:
            if self._client is not None:
                await self._client.disconnect(wait=1.0)
            self._loop.stop()
        asyncio.run_coroutine_threadsafe(close(), self._loop)
        self._thread.join(10)

    def wait_for(self, predicate: Callable[[list[Got]], bool], timeout: float) -> bool:
        """Poll until ``predicate(received)`` holds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if predicate(self.received):
                    return True
            time.sleep(0.2)
        return False

    def count(self) -> int:
        """Entries received so far, duplicates included."""
        with self._lock:
            return len(self.received)

    def by_node(self) -> dict[str, list[Got]]:
        """Received entries per node, in arrival order."""
        out: dict[str, list[Got]] = defaultdict(list)
        with self._lock:
            for got in self.received:
                out[got.node].append(got)
        return out

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        client = slixmpp.ClientXMPP(self.env["SCALEPUB_ANON_DOMAIN"], "")
        client.enable_starttls = client.enable_direct_tls = False
        client.enable_plaintext = True
        client.register_plugin("xep_0060")
        client.add_event_handler("session_start", lambda _e: self._subscribe(client))
        client.add_event_handler("pubsub_publish", self._on_publish)
        if self.reconnect:
            # Every 0.5 s: slixmpp's own retries back off to 1, 3, 7, 15 s, which would time
            # the subscriber's reconnect rather than the server's restart.
            for event in ("disconnected", "connection_failed"):
                client.add_event_handler(event, lambda _e: self._reconnect(client))
        client.connect(self.env["SCALEPUB_XMPP_HOST"], int(self.env["SCALEPUB_XMPP_PORT"]))
        self._client = client
        self._loop.run_forever()
        for task in asyncio.all_tasks(self._loop):
            task.cancel()
        self._loop.run_until_complete(asyncio.sleep(0.05))
        self._loop.close()

    def _reconnect(self, client: Any) -> None:
        if not self._closing:  # connect() cancels slixmpp's own pending retry
            self._loop.call_later(0.5, client.connect, self.env["SCALEPUB_XMPP_HOST"],
                                  int(self.env["SCALEPUB_XMPP_PORT"]))

    def _subscribe(self, client: Any) -> None:
        async def go() -> None:
            try:
                for node in self.nodes:
                    await client["xep_0060"].subscribe(
                        self.env["SCALEPUB_PUBSUB_SERVICE"], node,
                        subscribee=client.boundjid.full)
                self.sessions += 1
                self.subscribed.set()
            except Exception as exc:
                self._error = exc
        self._loop.create_task(go())

    def _on_publish(self, msg: Any) -> None:
        payload: ET.Element | None = msg["pubsub_event"]["items"]["item"]["payload"]
        if payload is None:
            return
        # The batch's text is an XML fragment of <entry> elements (docs/protocol.md).
        fragment = ET.fromstring(f"<entries>{payload.text or ''}</entries>")
        at = time.time_ns()
        with self._lock:
            self.items += 1
            self.received.extend(Got(e.get("node", ""), int(e.get("seq", "0")), e.get("id", ""),
                                     int(e.get("ts", "0")), at, self.items)
                                 for e in fragment.iter("entry"))


async def _session(env: dict[str, str], jid: str, password: str = "") -> Any:
    """A plain-TCP slixmpp session with pubsub, once started (anonymous: the anon domain)."""
    client = slixmpp.ClientXMPP(jid, password)
    client.enable_starttls = client.enable_direct_tls = False
    client.enable_plaintext = True
    client["feature_mechanisms"].unencrypted_plain = True
    client.register_plugin("xep_0060")
    started = asyncio.get_running_loop().create_future()
    client.add_event_handler("session_start", lambda _e: started.set_result(None))
    client.connect(env["SCALEPUB_XMPP_HOST"], int(env["SCALEPUB_XMPP_PORT"]))
    await asyncio.wait_for(started, 20)
    return client


async def _create_nodes(env: dict[str, str], nodes: list[str]) -> None:
    client = await _session(env, env["SCALEPUB_XMPP_JID"] + "/nodes",
                            env["SCALEPUB_XMPP_PASSWORD"])
    await asyncio.gather(*(client["xep_0060"].create_node(env["SCALEPUB_PUBSUB_SERVICE"], node)
                           for node in nodes))
    await client.disconnect()


def create_nodes(env: dict[str, str], nodes: list[str]) -> None:
    """Create pubsub nodes as the publisher, so subscribers can subscribe before the first row."""
    asyncio.run(_create_nodes(env, nodes))


def assert_complete_and_ordered(by_node: dict[str, list[Got]], expected: dict[str, int]) -> int:
    """Every node got seqs 1..n, first arrivals in order; duplicates only re-deliveries.

    Returns the number of duplicates seen.
    """
    duplicates = 0
    assert set(by_node) >= set(expected), set(expected) - set(by_node)
    for node, count in expected.items():
        first_seen: dict[int, str] = {}
        order = []
        for got in by_node[node]:
            if got.seq in first_seen:
                assert first_seen[got.seq] == got.id, f"{node} seq {got.seq}: two different ids"
                duplicates += 1
                continue
            first_seen[got.seq] = got.id
            order.append(got.seq)
        assert sorted(first_seen) == list(range(1, count + 1)), f"{node}: missing seqs"
        assert order == sorted(order), f"{node}: out of order {order[:20]}..."
    return duplicates


def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
    """Poll ``predicate`` every ``step`` seconds until it holds (True) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())


async def _stored(env: dict[str, str], nodes: list[str]) -> dict[str, list[Got]]:
    client = await _session(env, env["SCALEPUB_ANON_DOMAIN"])
    out: dict[str, list[Got]] = {}
    for node in nodes:
        reply = await client.plugin["xep_0060"].get_items(env["SCALEPUB_PUBSUB_SERVICE"], node,
                                                          timeout=30)
        out[node] = []
        for item in reply["pubsub"]["items"]:
            fragment = ET.fromstring(f"<entries>{item['payload'].text}</entries>")
            out[node] += [Got(e.get("node", ""), int(e.get("seq", "0")), e.get("id", ""))
                          for e in fragment.iter("entry")]
    await client.disconnect()
    return out


def stored_entries(env: dict[str, str], nodes: list[str]) -> dict[str, list[Got]]:
    """What the server stored (and so had confirmed) per node, in item order."""
    return asyncio.run(_stored(env, nodes))


class CuttableRelay:
    """A TCP relay (e.g. to ejabberd's c2s port) the test can cut and restore: a network fault."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def open(self) -> None:
        """Listen (again, on the same port) and relay every connection."""
        self._server = socket.create_server(("127.0.0.1", self.port))
        self.port = self._server.getsockname()[1]
        self._server.settimeout(0.1)
        threading.Thread(target=self._accept, args=(self._server,), daemon=True).start()

    def cut(self) -> None:
        """Close every relayed connection and refuse new ones."""
        if self._server is not None:
            self._server.close()
            self._server = None
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _accept(self, server: socket.socket) -> None:
        while server.fileno() != -1:
            try:
                client, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
