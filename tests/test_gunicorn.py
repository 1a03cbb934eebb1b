"""Several web workers (issue 17 §5): gunicorn with 4 workers on PostgreSQL under a small,
bounded HTTP load that creates tweets, the pool publishing to an independent subscriber.

Every committed row is delivered once, per node in commit order, and the relay lease moves to
another worker when the worker holding it is killed (-9) in the middle of the load.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis

from scalepub.settings import Settings
from scalepub.sharding import Keys
from tests.e2e import (
    REPO,
    Collector,
    PoolProcess,
    assert_complete_and_ordered,
    create_nodes,
    settings_env,
    wait_until,
)
from tests.stack import Stack, free_port
from tests.streams import read_all

pytestmark = [pytest.mark.stack, pytest.mark.slow, pytest.mark.timeout(300)]

EXAMPLE = REPO / "example"
BIN = Path(sys.executable).parent
WORKERS = 4
AUTHORS = 6
PER_AUTHOR = 60  # 360 requests: one client thread per author, each waits for its answer


@pytest.fixture
def database(stack: Stack) -> Iterator[str]:
    """A fresh database on the stack's PostgreSQL (dropped after): its URL."""
    base = stack.env["DATABASE_URL"]
    name = f"gunicorn_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"{base.rsplit('/', 1)[0]}/{name}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


class Gunicorn:
    """gunicorn serving the example project, its log in a file."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = log.open("ab")
        self.log = log
        self.proc = subprocess.Popen(
            [str(BIN / "gunicorn"), "--workers", str(WORKERS), "--bind",
             f"127.0.0.1:{self.port}", "--chdir", str(EXAMPLE), "--timeout", "60",
             "--graceful-timeout", "10", "exampleproject.wsgi:application"],
            env=env, stdout=self._log, stderr=self._log)

    def workers(self) -> set[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True,
                             text=True, check=False).stdout
        return {int(p) for p in out.split()}

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


def post_tweet(url: str, author: str, text: str) -> int:
    """POST /tweets; the HTTP status (0 when the connection broke: a killed worker)."""
    data = urllib.parse.urlencode({"author": author, "text": text}).encode()
    try:
        with urllib.request.urlopen(f"{url}/tweets", data=data, timeout=30) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0


def relay_pid(client: redis.Redis, settings: Settings) -> int | None:
    """The pid the working relay of the (only) database last reported."""
    for key in client.scan_iter(match=Keys(settings.key_prefix).relay_state_pattern):
        pid = client.hget(key, "pid")
        return int(pid) if pid else None
    return None


def rows_by_author(url: str) -> dict[str, list[int]]:
    """pks of the committed tweets per author, in commit order (pk order: see the load)."""
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT author, id FROM twitter_tweet ORDER BY id").fetchall()
        left = conn.execute("SELECT count(*) FROM scalepub_outbox").fetchone()
    assert left == (0,), f"{left} rows still in the outbox"
    out: dict[str, list[int]] = defaultdict(list)
    for author, pk in rows:
        out[author].append(pk)
    return out


def test_four_gunicorn_workers_deliver_every_tweet_once_in_order(
        settings_for: Settings, stack: Stack, database: str, redis_client: redis.Redis,
        tmp_path: Path) -> None:
    settings = settings_for.replace(delivery="outbox", outbox_relay="thread")
    env = {**os.environ, **stack.env, **settings_env(settings), "DATABASE_URL": database,
           "SCALEPUB_METRICS_PORT": "0", "DJANGO_DEBUG": "0",
           "PYTHONPATH": os.pathsep.join([str(EXAMPLE), str(REPO)])}
    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"],
                   cwd=EXAMPLE, env=env, check=True, timeout=120)
    prefix = f"g{uuid.uuid4().hex[:6]}"
    authors = [f"{prefix}{i}" for i in range(AUTHORS)]
    nodes = {a: f"/twitter/Tweet/{a}" for a in authors}
    create_nodes(stack.env, list(nodes.values()))
    collector = Collector(stack.env, nodes.values()).start()
    pool = PoolProcess(settings, tmp_path / "pool.log", "--shards", str(settings.shards))
    web = Gunicorn(env, tmp_path / "gunicorn.log")
    try:
        pool.wait_serving(redis_client)
        assert wait_until(lambda: len(web.workers()) == WORKERS and post_tweet(
            web.url, authors[0], "warm-up") == 201, 60), web.log.read_text()[-3000:]
        killed, statuses = run_load_and_kill_the_leader(web, authors, redis_client, settings)
        assert wait_until(lambda: relay_pid(redis_client, settings) not in (None, killed), 30)
        moved_to = relay_pid(redis_client, settings)
        assert moved_to in web.workers(), (moved_to, web.workers())  # a live worker leads now
        expected = rows_by_author_when_relayed(database, redis_client, settings)
        assert collector.wait_for(lambda got: len({(g.node, g.seq) for g in got})
                                  >= sum(map(len, expected.values())), timeout=120)
        assert web.stop() == 0, web.log.read_text()[-3000:]
    finally:
        web.kill()
        pool.kill()
        collector.stop()
    committed = sum(map(len, expected.values()))
    ok, broken = statuses.count(201), statuses.count(0)
    assert set(statuses) <= {201, 0}, statuses
    # the warm-up's row plus every 201; a request the kill broke may have committed or not
    assert ok <= committed - 1 <= ok + broken, (committed, ok, broken)
    assert_complete_and_ordered(collector.by_node(),
                                {nodes[a]: len(pks) for a, pks in expected.items()})
    print(f"{committed} tweets through {WORKERS} gunicorn workers; relay leader {killed} killed, "
          f"lease moved to {moved_to}; {statuses.count(0)} requests broken by the kill")


def run_load_and_kill_the_leader(web: Gunicorn, authors: list[str], client: redis.Redis,
                                 settings: Settings) -> tuple[int, list[int]]:
    """One client thread per author posts PER_AUTHOR tweets, each after the previous answer
    (so a node's commit order is its pk order); after a third of them, the worker whose relay
    holds the lease is killed. Returns its pid and every request's status."""
    statuses: list[int] = []
    lock = threading.Lock()

    def client_thread(author: str) -> None:
        for i in range(PER_AUTHOR):
            status = post_tweet(web.url, author, f"{author} #{i}")
            with lock:
                statuses.append(status)

    threads = [threading.Thread(target=client_thread, args=(a,)) for a in authors]
    for t in threads:
        t.start()
    assert wait_until(lambda: len(statuses) >= len(authors) * PER_AUTHOR // 3, 60)
    leader = relay_pid(client, settings)
    assert leader in web.workers(), (leader, web.workers())
    os.kill(leader, signal.SIGKILL)
    for t in threads:
        t.join(120)
    return leader, statuses


def rows_by_author_when_relayed(database: str, client: redis.Redis,
                                settings: Settings) -> dict[str, list[int]]:
    """Once the outbox is empty: the committed pks per author, checked against the streams:
    each row appended exactly once, a node's seqs 1..n in commit order."""
    def relayed() -> bool:
        with psycopg.connect(database) as conn:
            return conn.execute("SELECT count(*) FROM scalepub_outbox").fetchone() == (0,)

    assert wait_until(relayed, 60)
    expected = rows_by_author(database)
    by_node: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for e in read_all(client, settings):
        by_node[e.env.node].append((e.env.seq, int(e.env.pk)))
    for author, pks in expected.items():
        got = sorted(by_node[f"/twitter/Tweet/{author}"])
        assert [seq for seq, _ in got] == list(range(1, len(pks) + 1)), author
        assert [pk for _, pk in got] == pks, f"{author}: not once each in commit order"
    return expected
