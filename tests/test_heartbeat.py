"""The heartbeat's ``problem`` field: why a live shard cannot publish right now.

Against the real Redis and ejabberd: a pool whose XMPP connection is cut (a TCP relay the test
closes) reports ``xmpp_down`` until the server is reachable again; a pool whose account may
not publish to a node reports the server's refusal; a healthy one reports nothing.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis

from scalepub.producer import PendingEntry, StreamProducer
from scalepub.settings import Settings
from scalepub.shard.heartbeat import Health
from scalepub.sharding import CONSUMER_GROUP, Keys
from tests.e2e import PoolProcess, create_nodes, wait_until
from tests.stack import Stack
from tests.test_security import register


def test_problem_names_each_cause_until_it_passes() -> None:
    health = Health()
    assert health.problem == ""
    health.xmpp_down = True
    health.redis_failing = 2
    health.refused("/a", "wait", "resource-constraint")
    health.refused("/b", "wait", "resource-constraint")
    health.refused("/c", "auth", "forbidden")
    assert health.problem == ("xmpp_down, redis, refused: auth/forbidden, "
                              "refused: wait/resource-constraint")
    health.xmpp_down, health.redis_failing = False, 0
    health.passed("/c")
    health.passed("/a")
    assert health.problem == "refused: wait/resource-constraint"
    health.passed("/b")
    assert health.problem == ""


class CuttableRelay:
    """A TCP relay to ejabberd's c2s port that the test can cut and restore."""

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


def problem(client: redis.Redis, settings: Settings) -> bytes | None:
    value = client.hget(Keys(settings.key_prefix).heartbeat(0), "problem")
    return value if value is None else bytes(value)


def produce_one(settings: Settings, node: str) -> None:
    producer = StreamProducer(settings)
    producer.enqueue([PendingEntry(node, time.time_ns(), "t.row", "1", "xml", b"<row/>")])
    producer.close()


@pytest.mark.stack
def test_a_cut_connection_shows_as_xmpp_down_until_it_is_back(
        settings_for: Settings, stack: Stack, redis_client: redis.Redis, tmp_path: Path) -> None:
    relay = CuttableRelay(int(stack.env["SCALEPUB_XMPP_PORT"]))
    relay.open()
    settings = settings_for.replace(shards=1, xmpp_port=relay.port)
    node = f"/heartbeat/{settings.key_prefix}/down"
    pool = PoolProcess(settings, tmp_path / "pool.log", "--shards", "1")
    try:
        assert wait_until(lambda: problem(redis_client, settings) == b"", 60), pool.output()
        relay.cut()
        assert wait_until(lambda: problem(redis_client, settings) == b"xmpp_down", 30), (
            problem(redis_client, settings), pool.output()[-3000:])
        produce_one(settings, node)  # waits for the link
        relay.open()
        assert wait_until(lambda: problem(redis_client, settings) == b"", 30), (
            problem(redis_client, settings), pool.output()[-3000:])
        assert wait_until(lambda: redis_client.hget(Keys(settings.key_prefix).heartbeat(0),
                                                    "published") == b"1", 30)
        assert pool.stop() == 0
    finally:
        pool.kill()
        relay.cut()


@pytest.mark.stack
def test_a_refusal_being_retried_shows_the_servers_condition(
        settings_for: Settings, stack: Stack, redis_client: redis.Redis, tmp_path: Path) -> None:
    node = f"/heartbeat/{settings_for.key_prefix}/owned"
    create_nodes(stack.env, [node])  # owned by the publisher account
    jid, password = register(stack, f"other{uuid.uuid4().hex[:6]}")
    settings = settings_for.replace(shards=1, xmpp_jid=jid, xmpp_password=password)
    pool = PoolProcess(settings, tmp_path / "pool.log", "--shards", "1")
    try:
        assert wait_until(lambda: problem(redis_client, settings) == b"", 60), pool.output()
        produce_one(settings, node)
        assert wait_until(lambda: problem(redis_client, settings) == b"refused: auth/forbidden",
                          30), (problem(redis_client, settings), pool.output()[-3000:])
        assert pool.stop() == 0
    finally:
        pool.kill()
    # retried, not dropped: the entry waits, unacknowledged, for an account that may publish
    keys = Keys(settings.key_prefix)
    assert redis_client.xlen(keys.dead(0)) == 0
    assert redis_client.xpending(keys.stream(0), CONSUMER_GROUP)["pending"] == 1
