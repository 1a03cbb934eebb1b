"""The `scalepub` command: start-up failures are one clear message and a named exit code."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from scalepub import exitcodes
from scalepub.producer import PendingEntry, StreamProducer
from scalepub.settings import Settings
from tests.e2e import PoolProcess, create_nodes, settings_env
from tests.stack import Stack, free_port

SCALEPUB = str(Path(sys.executable).parent / "scalepub")


def run(settings: Settings, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    # No metrics endpoint unless the test passes --metrics-port: parallel runs would collide.
    env = {**os.environ, **settings_env(settings), "SCALEPUB_METRICS_PORT": "0"}
    return subprocess.run([SCALEPUB, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_help_names_the_commands() -> None:
    done = subprocess.run([SCALEPUB, "--help"], capture_output=True, text=True, check=True)
    assert "run" in done.stdout and "tail" in done.stdout
    done = subprocess.run([SCALEPUB, "run", "--help"], capture_output=True, text=True, check=True)
    assert "--shards" in done.stdout and "--window" in done.stdout


def test_bad_setting_is_named(settings_for: Settings) -> None:
    done = subprocess.run([SCALEPUB, "run"], env={**os.environ, "SCALEPUB_WINDOW": "zero"},
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == exitcodes.USAGE
    assert "SCALEPUB_WINDOW: expected int, got 'zero'" in done.stderr
    done = run(settings_for, "run", "--window", "0")
    assert done.returncode == exitcodes.USAGE
    assert "--window: must be greater than 0" in done.stderr


@pytest.mark.parametrize("command", ["run", "status"])
@pytest.mark.parametrize("url", ["redis://127.0.0.1:notaport/0", "redis://:6379",
                                 "redis://127.0.0.1:6379/db1"])
def test_a_malformed_redis_url_exits_2_naming_the_setting(command: str, url: str) -> None:
    env = {**os.environ, "SCALEPUB_REDIS_URL": url}
    done = subprocess.run([SCALEPUB, command], env=env, capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == exitcodes.USAGE, done.stderr
    assert "SCALEPUB_REDIS_URL: " in done.stderr and url in done.stderr
    assert "Traceback" not in done.stderr
    done = subprocess.run([SCALEPUB, command, "--redis-url", url], capture_output=True,
                          text=True, timeout=30, check=False)
    assert done.returncode == exitcodes.USAGE and "--redis-url: " in done.stderr, done.stderr


def test_status_and_authorize_exit_with_the_code_of_what_is_unreachable() -> None:
    env = {**os.environ, "SCALEPUB_REDIS_URL": f"redis://:sekret@127.0.0.1:{free_port()}/0",
           "SCALEPUB_XMPP_PORT": str(free_port())}
    done = subprocess.run([SCALEPUB, "status"], env=env, capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == exitcodes.REDIS_UNREACHABLE, done.stderr
    assert "scalepub: cannot reach Redis at redis://:***@127.0.0.1:" in done.stderr
    assert "sekret" not in done.stderr and "Traceback" not in done.stderr
    done = subprocess.run([SCALEPUB, "authorize", "/n", "alice@localhost"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == exitcodes.XMPP_UNREACHABLE, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.stack
def test_a_metrics_port_in_use_exits_2_naming_it(settings_for: Settings) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run(settings_for.replace(shards=1), "run", "--shards", "1",
                   "--metrics-port", str(port))
    assert done.returncode == exitcodes.USAGE, done.stderr[-2000:]
    assert f"--metrics-port {port}: cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "0 to turn the metrics endpoint off" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_metrics_host_not_of_this_machine_exits_2_naming_it() -> None:
    """Before Redis is asked: the address is what to change, not the port."""
    done = run(Settings(redis_url="redis://127.0.0.1:1/0", shards=1), "run", "--shards", "1",
               "--metrics-host", "192.0.2.1", "--metrics-port", "9")  # TEST-NET-1
    assert done.returncode == exitcodes.USAGE, done.stderr[-2000:]
    assert "--metrics-host '192.0.2.1': not an address of this machine" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.stack
def test_a_jid_domain_the_server_does_not_serve_exits_2_naming_it(settings_for: Settings) -> None:
    """Said when the server ends the stream (host-unknown), not after the connect timeout."""
    started = time.monotonic()
    done = run(settings_for.replace(xmpp_jid="pub@nowhere.example", shards=1), "run",
               "--shards", "1")
    assert done.returncode == exitcodes.USAGE, done.stderr[-2000:]
    assert "does not serve nowhere.example (host-unknown)" in done.stderr
    assert "SCALEPUB_XMPP_JID" in done.stderr and "Traceback" not in done.stderr
    assert time.monotonic() - started < 30


@pytest.mark.stack
def test_wrong_password_exits_with_one_clear_message(settings_for: Settings) -> None:
    started = time.monotonic()
    done = run(settings_for.replace(xmpp_password="wrong", shards=1), "run", "--shards", "1")
    assert done.returncode == exitcodes.XMPP_AUTH, done.stderr[-2000:]
    assert "refused the credentials of pub@localhost" in done.stderr
    assert done.stderr.count("refused the credentials") == 1  # not a retry loop
    assert "Traceback" not in done.stderr
    assert time.monotonic() - started < 30


@pytest.mark.stack
def test_unreachable_servers_at_start(settings_for: Settings) -> None:
    done = run(settings_for.replace(xmpp_port=free_port(), shards=1), "run", "--shards", "1")
    assert done.returncode == exitcodes.XMPP_UNREACHABLE, done.stderr[-2000:]
    assert "cannot connect to XMPP server" in done.stderr and "Traceback" not in done.stderr
    down = settings_for.replace(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    done = run(down, "run")
    assert done.returncode == exitcodes.REDIS_UNREACHABLE
    assert "cannot reach Redis" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.stack
def test_tail_prints_entries_with_latency(settings_for: Settings, stack: Stack,
                                          tmp_path: Path) -> None:
    settings = settings_for.replace(shards=1)
    node = f"/tail/{uuid.uuid4().hex[:8]}"
    create_nodes(stack.env, [node])
    tail = subprocess.Popen([SCALEPUB, "tail", node, "--count", "3"],
                            env={**os.environ, **settings_env(settings)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pool = PoolProcess(settings, tmp_path / "pool.log", "--shards", "1")
    try:
        time.sleep(2.0)  # the subscription is in place
        rows = [PendingEntry(node, time.time_ns(), "t.row", str(i), "xml",
                             f'<django-objects version="1.0"><object model="t.row" pk="{i}">'
                             f'<field name="text" type="CharField">hello {i}</field></object>'
                             f"</django-objects>".encode()) for i in range(3)]
        StreamProducer(settings).enqueue(rows)
        out, err = tail.communicate(timeout=30)
    finally:
        tail.kill()
        pool.kill()
    lines = out.strip().splitlines()
    assert len(lines) == 3, (out, err)
    for i, line in enumerate(lines):
        assert line.startswith(f"{node} #{i + 1} ") and " ms " in line
        assert f"text='hello {i}'" in line


def test_run_help_states_the_settings_defaults() -> None:
    """Every `[... default N]` in `scalepub run --help` is the Settings default it names."""
    import re

    from click.testing import CliRunner

    from scalepub.cli import main
    from scalepub.settings import Settings

    text = " ".join(CliRunner().invoke(main, ["run", "--help"]).output.split())
    found = re.findall(r"--([a-z-]+) [A-Z]+ (?:(?!--)[^\[])*\[[^\]]*default ([0-9]+(?:\.[0-9]+)?)\]", text)
    assert len(found) >= 6, text
    defaults = Settings()
    for option, stated in found:
        assert float(stated) == float(getattr(defaults, option.replace("-", "_"))), option
