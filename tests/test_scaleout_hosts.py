"""Supervisors on hosts of their own (network namespaces, tests/hosts.py), issue 14 §4.

The server host runs Redis and ejabberd; each supervisor runs in a host of its own; the test
process produces, subscribes (an independent slixmpp subscriber) and polls the leases from a
``client`` host. Where namespaces cannot be made the same runs on loopback, and the output
says so.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import redis

from scalepub.settings import Settings, env_mapping
from tests.e2e import Collector, PoolProcess, assert_complete_and_ordered, create_nodes
from tests.hosts import SUBNET, Namespaces, simulated_hosts
from tests.streams import produce

pytestmark = [pytest.mark.stack]


def settings_of(env: dict[str, str], prefix: str, shards: int) -> Settings:
    """Settings for the server as ``env`` reaches it."""
    return Settings.from_mapping(env_mapping(env), key_prefix=prefix, shards=shards)


@pytest.mark.parametrize("loopback", [False, True], ids=["namespaces", "loopback-fallback"])
def test_a_supervisor_on_its_own_host_delivers_to_a_subscriber_on_another(
    tmp_path: Path, loopback: bool,
) -> None:
    prefix = f"h{uuid.uuid4().hex[:8]}"
    nodes = [f"/hosts/{prefix}/n{i}" for i in range(20)]
    with (simulated_hosts("client", "h1", loopback=loopback) as (hosts, server),
          hosts.enter("client")):
        client_env = server.env_for("client")
        create_nodes(client_env, nodes)
        collector = Collector(client_env, nodes).start()
        with hosts.enter("h1"):
            pool = PoolProcess(settings_of(server.env_for("h1"), prefix, 4),
                               tmp_path / "h1.log", "--shards", "4")
        try:
            settings = settings_of(client_env, prefix, 4)
            client = redis.Redis.from_url(settings.redis_url)
            pool.wait_serving(client)
            if isinstance(hosts, Namespaces):
                assert hosts.runs_in(pool.proc.pid, "h1")
                assert not hosts.runs_in(os.getpid(), "h1")
                assert client_env["SCALEPUB_REDIS_URL"].startswith(f"redis://{SUBNET}.")
            client.close()
            produce(settings, nodes, 50, chunk=25)
            assert collector.wait_for(
                lambda got: len({(g.node, g.seq) for g in got}) >= 1000, 60), \
                (collector.count(), pool.output()[-2000:])
            assert pool.stop() == 0, pool.output()[-3000:]
        finally:
            pool.kill()
            collector.stop()
    assert_complete_and_ordered(collector.by_node(), dict.fromkeys(nodes, 50))
