"""Which processes run the outbox relay (issue 12.2): every serving process from its start,
no one-shot command; rows an exited process left while Redis was down are relayed by a web
process that saves nothing, within 2 s of Redis answering again; `scalepub status` lists the
backlog of a relay that moves nothing, and a report nobody renews as stale."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from scalepub import exitcodes
from scalepub.settings import Settings
from scalepub.sharding import Keys
from tests.e2e import REPO, settings_env, wait_until
from tests.stack import Stack, free_port
from tests.streams import read_all
from tests.test_status import status_document

pytestmark = [pytest.mark.stack]

MANAGE = REPO / "example" / "manage.py"


@pytest.fixture
def example_env(settings_for: Settings, tmp_path: Path) -> Iterator[dict[str, str]]:
    """Environment of the example project on its own migrated SQLite file and this stack."""
    env = {**os.environ, **settings_env(settings_for.replace(redis_timeout=0.3)),
           "EXAMPLE_DB": str(tmp_path / "example.sqlite3"), "PYTHONUNBUFFERED": "1",
           "DJANGO_SETTINGS_MODULE": "exampleproject.settings"}
    manage(env, "migrate", "-v0")
    yield env


def manage(env: dict[str, str], *args: str, timeout: float = 60) -> str:
    """``manage.py ARGS`` of the example project; its stdout (fails the test if it fails)."""
    done = subprocess.run([sys.executable, str(MANAGE), *args], env=env, cwd=MANAGE.parent,
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def relaying_after(env: dict[str, str], code: str) -> str:
    """Run ``code`` in ``manage.py shell``; what it prints, then the databases relayed."""
    tail = "from scalepub.django.runtime import runtime; print('relaying', runtime.relaying())"
    return manage(env, "shell", "-v0", "-c", f"{code}\n{tail}").strip()


def test_one_shot_commands_start_no_relay(example_env: dict[str, str]) -> None:
    assert relaying_after(example_env, "") == "relaying []"
    out = manage(example_env, "shell", "-v0", "-c", "from django.core.management import call_command;"
                 "call_command('check');"
                 "from scalepub.django.runtime import runtime; print(runtime.relaying())")
    assert out.strip().endswith("[]")


def test_a_wsgi_or_asgi_handler_starts_the_relay(example_env: dict[str, str]) -> None:
    wsgi = "from django.core.wsgi import get_wsgi_application; get_wsgi_application()"
    asgi = "from django.core.asgi import get_asgi_application; get_asgi_application()"
    assert relaying_after(example_env, wsgi) == "relaying ['default']"
    assert relaying_after(example_env, asgi) == "relaying ['default']"
    external = {**example_env, "SCALEPUB_OUTBOX_RELAY": "external"}
    assert relaying_after(external, wsgi) == "relaying []"


def test_a_forked_worker_starts_its_own_relay(example_env: dict[str, str]) -> None:
    """A server that loads the app, then forks its workers (gunicorn --preload)."""
    code = "\n".join([
        "import os",
        "from django.core.wsgi import get_wsgi_application",
        "from scalepub.django.runtime import runtime",
        "get_wsgi_application()",
        "pid = os.fork()",
        "if pid == 0:",
        "    print('child', runtime.relaying(), flush=True)",
        "    runtime.stop()",
        "    os._exit(0)",
        "os.waitpid(pid, 0)",
    ])
    out = relaying_after(example_env, code)
    assert out.splitlines() == ["child ['default']", "relaying ['default']"]


def test_rows_of_an_exited_process_relayed_by_an_idle_web_process(
    example_env: dict[str, str], settings_for: Settings, stack: Stack,
    redis_client: redis.Redis, tmp_path: Path,
) -> None:
    redis_client.shutdown()  # Redis down while a short-lived process saves
    try:
        manage(example_env, "shell", "-c",
               "from twitter.models import Tweet\n"
               "for i in range(30): Tweet.objects.create(author=f'w{i % 3}', text=str(i))")
        assert outbox_rows(example_env) == 30  # the writer exited; its rows wait
        with WebProcess(example_env, tmp_path / "web.log") as web:
            time.sleep(1.5)  # the web process is up, its relay is retrying against no Redis
            starting = threading.Thread(target=stack.up, daemon=True)
            starting.start()
            answered, arrived = seconds_to_entries(settings_for, 30)
            starting.join(120)
            assert arrived is not None, web.log()
            assert wait_until(lambda: outbox_rows(example_env) == 0, timeout=10)
            state = relay_state(settings_for)
            assert state["pid"] == str(web.proc.pid) and state["refused_reason"] == "", state
    finally:
        stack.up()
    by_node: dict[str, list[int]] = defaultdict(list)
    for e in read_all(redis_client, settings_for):
        by_node[e.env.node].append(e.env.seq)
    assert dict(by_node) == {f"/twitter/Tweet/w{a}": list(range(1, 11)) for a in range(3)}
    print(f"rows in Redis {arrived - answered:.2f} s after Redis answered again")
    assert arrived - answered <= 2.0


def test_status_lists_an_idle_relay_and_marks_a_dead_ones_report_stale(
    example_env: dict[str, str], settings_for: Settings, tmp_path: Path,
) -> None:
    """An idle web process's relay reports an empty outbox, then the rows Redis refuses; once
    it is killed -9 its last report (20 rows waiting) turns stale and status exits 7."""
    settings = settings_for.replace(stream_maxlen=10)  # no pool: the 11th entry is refused
    env = {**example_env, "SCALEPUB_STREAM_MAXLEN": "10"}
    with WebProcess(env, tmp_path / "web.log") as web:
        idle = wait_for_relay(settings, lambda r: r["pid"] == web.proc.pid)
        assert idle["rows"] == 0 and idle["state"] == "ok" and not idle["stale"], idle
        first = float(relay_state(settings)["at"])
        assert wait_until(lambda: float(relay_state(settings)["at"]) > first, timeout=5)
        manage(env, "shell", "-c", "from twitter.models import Tweet\n"
               "for i in range(30): Tweet.objects.create(author='idle', text=str(i))")
        refusing = wait_for_relay(settings, lambda r: r["rows"] == 20 and r["refusing"])
        assert refusing["refused_reason"] == "backpressure" and refusing["state"] == "ok"
        assert refusing["pid"] == web.proc.pid, refusing
        web.proc.kill()  # no drain, no last report: the 20 rows wait with nobody to move them
        web.proc.wait(20)
        gone = wait_for_relay(settings, lambda r: r["stale"], timeout=30)
    assert gone["state"] == "stale" and gone["rows"] == 20, gone
    assert status_document(settings)[0] == exitcodes.UNHEALTHY
    assert outbox_rows(env) == 20


def wait_for_relay(settings: Settings, predicate: Callable[[dict[str, Any]], bool],
                   timeout: float = 15) -> dict[str, Any]:
    """The one relay `scalepub status --json` lists, once ``predicate`` holds for it."""
    seen: list[dict[str, Any]] = []

    def listed() -> bool:
        seen[:] = status_document(settings)[1]["relays"]
        return len(seen) == 1 and predicate(seen[0])

    assert wait_until(listed, timeout=timeout, step=0.3), seen
    return seen[0]


def outbox_rows(env: dict[str, str]) -> int:
    with sqlite3.connect(env["EXAMPLE_DB"]) as db:
        return int(db.execute("SELECT COUNT(*) FROM scalepub_outbox").fetchone()[0])


def seconds_to_entries(settings: Settings, count: int,
                       timeout: float = 60) -> tuple[float, float | None]:
    """While Redis starts: when it first answered a PING, and when ``count`` entries were
    in its streams (None if not within ``timeout``). A fresh client without retries: one
    that saw Redis go away would back off between its retries and measure itself."""
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=0.2,
                                  retry=Retry(NoBackoff(), 0))
    deadline = time.monotonic() + timeout
    answered = None
    try:
        while answered is None and time.monotonic() < deadline:
            try:
                client.ping()
                answered = time.monotonic()
            except redis.RedisError:
                time.sleep(0.01)
        while answered is not None and time.monotonic() < deadline:
            if len(read_all(client, settings)) >= count:
                return answered, time.monotonic()
            time.sleep(0.02)
    finally:
        client.close()
    return answered or deadline, None


def relay_state(settings: Settings) -> dict[str, str]:
    """The one relay state hash under this test's prefix."""
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        keys = list(client.scan_iter(match=Keys(settings.key_prefix).relay_state_pattern))
        assert len(keys) == 1, keys
        return {str(k): str(v) for k, v in client.hgetall(keys[0]).items()}
    finally:
        client.close()


class WebProcess:
    """``manage.py runserver --noreload`` of the example project; no request is ever sent."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path, self.port = log_path, free_port()
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(MANAGE), "runserver", "--noreload", f"127.0.0.1:{self.port}"],
            env=env, cwd=MANAGE.parent, stdout=self._log, stderr=subprocess.STDOUT)

    def __enter__(self) -> WebProcess:
        assert wait_until(self._listening, timeout=60), self.log()
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(20)
        self._log.close()

    def _listening(self) -> bool:
        # a TCP connect without a request: Django sees no request (request_started unsent)
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            return True
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]
