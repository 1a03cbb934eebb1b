"""`scalepub tail`: says why it cannot follow a node and exits with a named code, in bounded
time; a node that does not exist yet is waited for, said once, and followed once created."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from scalepub import exitcodes
from scalepub.producer import PendingEntry, StreamProducer
from scalepub.settings import Settings
from tests.e2e import CuttableRelay, PoolProcess, settings_env, wait_until
from tests.stack import Stack, free_port
from tests.test_cli import SCALEPUB

pytestmark = pytest.mark.timeout(120)


def tail(settings: Settings, *args: str, timeout: float = 60,
         **env: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``scalepub tail ARGS``; returns the result and how long it took."""
    started = time.monotonic()
    done = subprocess.run([SCALEPUB, "tail", *args], capture_output=True, text=True,
                          timeout=timeout, check=False,
                          env={**os.environ, **settings_env(settings), **env})
    return done, time.monotonic() - started


def one_line(stderr: str) -> str:
    """The scalepub lines of stderr (slixmpp may log too), which must be exactly one."""
    lines = [line for line in stderr.splitlines() if line.startswith("scalepub: ")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr, stderr
    return lines[0]


@pytest.mark.parametrize(("node", "said"), [
    ("/twitter/Tweet/a\nb", "'/twitter/Tweet/a\\nb': character U+000A"),
    ("twitter/Tweet", "'twitter/Tweet': must start with /"),
    ("/" + "é" * 200, "401 bytes of UTF-8, more than 255"),
])
def test_an_invalid_node_name_exits_2_at_once_naming_it(node: str, said: str) -> None:
    # An unreachable server: the name is refused before any connection is tried.
    settings = Settings(xmpp_port=free_port())
    done, took = tail(settings, "/fine", node, "--connect-timeout", "30")
    assert done.returncode == exitcodes.USAGE
    line = one_line(done.stderr)
    assert "invalid node name" in line or "node name" in line
    assert said in line
    assert took < 15  # far below the connect timeout: nothing was waited for


def test_a_closed_port_exits_3_saying_so() -> None:
    port = free_port()
    done, took = tail(Settings(xmpp_port=port), "/a/b", "--connect-timeout", "20")
    assert done.returncode == exitcodes.XMPP_UNREACHABLE
    assert f"cannot connect to XMPP server 127.0.0.1:{port}" in one_line(done.stderr)
    assert took < 15


def test_a_server_that_never_answers_exits_3_within_the_connect_timeout() -> None:
    with socket.socket() as silent:  # accepts connections (the backlog), never speaks
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        done, took = tail(Settings(xmpp_port=port), "/a/b", "--connect-timeout", "2")
    assert done.returncode == exitcodes.XMPP_UNREACHABLE
    assert f"no XMPP session with 127.0.0.1:{port} within 2 s" in one_line(done.stderr)
    assert 2 <= took < 12


def test_a_bad_connect_timeout_is_a_usage_error() -> None:
    done, _ = tail(Settings(), "/a/b", "--connect-timeout", "0")
    assert done.returncode == exitcodes.USAGE
    assert "--connect-timeout" in done.stderr


@pytest.mark.stack
def test_refused_credentials_exit_4(settings_for: Settings) -> None:
    done, took = tail(settings_for, "/a/b", "--jid", settings_for.xmpp_jid,
                      SCALEPUB_TAIL_PASSWORD="wrong")
    assert done.returncode == exitcodes.XMPP_AUTH
    assert f"refused the credentials of {settings_for.xmpp_jid}" in one_line(done.stderr)
    assert took < 30
    # The main domain offers no SASL ANONYMOUS: an anonymous login there is refused too.
    done, _ = tail(settings_for.replace(anon_domain=settings_for.xmpp_domain), "/a/b")
    assert done.returncode == exitcodes.XMPP_AUTH
    assert "refused an anonymous login on localhost" in one_line(done.stderr)


@pytest.mark.stack
@pytest.mark.parametrize(("setting", "value", "code", "said"), [
    # a domain the server does not serve: it ends the stream (host-unknown)
    ("anon_domain", "nope.localhost", exitcodes.XMPP_UNREACHABLE,
     ["does not serve nope.localhost", "SCALEPUB_ANON_DOMAIN"]),
    # no such service: not retried for ever like a node still to be created
    ("pubsub_service", "pubsub.nowhere", exitcodes.USAGE,
     ["no pubsub service pubsub.nowhere", "SCALEPUB_PUBSUB_SERVICE"]),
])
def test_a_wrong_domain_or_service_exits_at_once_naming_the_setting(
        settings_for: Settings, setting: str, value: str, code: int, said: list[str]) -> None:
    done, took = tail(settings_for.replace(**{setting: value}), "/a/b")
    assert done.returncode == code
    line = one_line(done.stderr)
    assert all(part in line for part in said), line
    assert took < 30


@pytest.mark.stack
def test_a_node_created_later_is_waited_for_said_once_then_followed(
    settings_for: Settings, tmp_path: Path,
) -> None:
    settings = settings_for.replace(shards=1)
    node = f"/tail/José Ñ {uuid.uuid4().hex[:6]}"  # a readable name, created by the pool
    proc = subprocess.Popen([SCALEPUB, "tail", node, "--count", "1"],
                            env={**os.environ, **settings_env(settings)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pool = PoolProcess(settings, tmp_path / "pool.log", "--shards", "1")
    try:
        time.sleep(5.0)  # two retries (every 2 s) of a node that does not exist
        StreamProducer(settings).enqueue([entry(node, 1)])
        time.sleep(3.0)  # the first publish created the node; tail subscribes within 2 s
        StreamProducer(settings).enqueue([entry(node, 2)])
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        pool.kill()
    assert proc.returncode == 0, err
    assert one_line(err) == (f"scalepub: waiting for node {node!r} to be created "
                             "(created on first publish); trying again every 2 s")
    # The first entry created the node, so it was published before tail could subscribe, and
    # ejabberd replays no item on subscribe (send_last_published_item: never): the second
    # arrives, under the readable name.
    lines = out.strip().splitlines()
    assert lines and lines[-1].startswith(f"{node} #2 "), (out, err)


def entry(node: str, i: int) -> PendingEntry:
    return PendingEntry(node, time.time_ns(), "t.row", str(i), "json", b'[{"pk": 1}]')


@pytest.mark.stack
def test_a_lost_session_exits_3_saying_so(settings_for: Settings, stack: Stack) -> None:
    proxy = CuttableRelay(int(stack.env["SCALEPUB_XMPP_PORT"]))
    proxy.open()
    settings = settings_for.replace(xmpp_port=proxy.port)
    proc = subprocess.Popen([SCALEPUB, "tail", "/tail/never"],
                            env={**os.environ, **settings_env(settings)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr = proc.stderr
    assert stderr is not None
    err_lines: list[str] = []
    reader = threading.Thread(target=lambda: err_lines.extend(iter(stderr.readline, "")),
                              daemon=True)
    reader.start()
    try:
        # in session: it asked for the node and was told it does not exist yet
        assert wait_until(lambda: any("waiting for node" in line for line in err_lines)
                          or proc.poll() is not None, timeout=30), err_lines
        assert proc.poll() is None, err_lines
        proxy.cut()
        proc.wait(15)
        reader.join(5)
    finally:
        proc.kill()
    err = "".join(err_lines)
    assert proc.returncode == exitcodes.XMPP_UNREACHABLE, err
    assert f"lost the session with XMPP server 127.0.0.1:{proxy.port}" in err
    assert "Traceback" not in err
