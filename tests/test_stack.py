"""ops/stack: `up` twice is harmless, `down` leaves nothing of it running."""

from __future__ import annotations

import subprocess

import pytest
import redis

from tests.stack import new_stack

pytestmark = pytest.mark.stack


def processes_of(state_dir: str, node: str, redis_port: str) -> list[str]:
    """Its ejabberd (by node name or state dir) and its Redis (by port)."""
    out = subprocess.run(["ps", "-eww", "-o", "pid,args"], capture_output=True, text=True,
                         check=True).stdout
    marks = (state_dir, node.split("@", maxsplit=1)[0], f"127.0.0.1:{redis_port}")
    return [line for line in out.splitlines() if any(m in line for m in marks)]


def server_pids(state_dir: str, node: str, redis_port: str) -> list[int]:
    """The pids of its ejabberd node (beam.smp) and its Redis."""
    return sorted(int(line.split()[0]) for line in processes_of(state_dir, node, redis_port)
                  if "beam.smp" in line or "redis-server" in line)


def test_up_twice_then_down_leaves_nothing() -> None:
    s = new_stack()
    mine = (str(s.state_dir), s.control["SCALEPUB_EJABBERD_NODE"], s.control["SCALEPUB_REDIS_PORT"])
    try:
        s.up()
        first = dict(s.env)
        servers = server_pids(*mine)
        assert len(servers) >= 2, servers  # ejabberd and Redis
        again = s.run("up")
        assert again.returncode == 0, again.stderr
        assert server_pids(*mine) == servers  # nothing started twice, nothing restarted
        s.env = {}
        s.up()
        assert s.env == first  # same ports, same password
        assert s.run("status").returncode == 0
        assert redis.Redis.from_url(first["SCALEPUB_REDIS_URL"]).ping()
        running = processes_of(*mine)
        assert any("beam.smp" in p for p in running) and any("redis" in p for p in running)
    finally:
        s.down()
    assert processes_of(*mine) == []
    assert s.run("status").returncode == 3
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(first["SCALEPUB_REDIS_URL"], socket_connect_timeout=1).ping()


def test_env_lines_name_every_setting() -> None:
    s = new_stack()
    names = {line.split("=")[0].removeprefix("export ") for line in s.run("env").stdout.splitlines()}
    assert names >= {
        "SCALEPUB_REDIS_URL", "SCALEPUB_XMPP_HOST", "SCALEPUB_XMPP_PORT", "SCALEPUB_XMPP_DOMAIN",
        "SCALEPUB_PUBSUB_SERVICE", "SCALEPUB_XMPP_JID", "SCALEPUB_XMPP_PASSWORD",
        "SCALEPUB_BOSH_URL", "SCALEPUB_WS_URL", "SCALEPUB_ANON_DOMAIN",
    }
