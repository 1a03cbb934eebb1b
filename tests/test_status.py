"""`scalepub status`: liveness from heartbeats, stuck detection, exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from scalepub import exitcodes
from scalepub.settings import Settings
from scalepub.status import ShardStatus
from tests.e2e import PoolProcess, create_nodes, settings_env, wait_until
from tests.stack import Stack
from tests.test_pool_faults import produce

SCALEPUB = str(Path(sys.executable).parent / "scalepub")


def status(settings: Settings) -> tuple[int, list[dict[str, object]]]:
    done = subprocess.run([SCALEPUB, "status", "--json"], capture_output=True, text=True,
                          env={**os.environ, **settings_env(settings)}, timeout=30, check=False)
    return done.returncode, json.loads(done.stdout)["shards"]


def row(**kw: object) -> ShardStatus:
    base: dict[str, object] = dict(shard=0, length=10, lag=0, pending=0, dead_letters=0,
                                   alive=True, pid=1, host="h", last_publish_age_s=1.0, rate=0.0)
    return ShardStatus(**{**base, **kw})  # type: ignore[arg-type]


def test_states() -> None:
    assert row().state == "ok"
    assert row(alive=False).state == "dead"
    assert row(lag=5, last_publish_age_s=120.0).state == "stuck"
    assert row(pending=5, last_publish_age_s=None).state == "stuck"
    assert row(lag=0, pending=0, last_publish_age_s=None).state == "ok"  # idle is fine


@pytest.mark.stack
def test_status_follows_the_pool(settings_for: Settings, stack: Stack, tmp_path: Path) -> None:
    settings = settings_for.replace(shards=2)
    nodes = [f"/status/{uuid.uuid4().hex[:8]}/n{i}" for i in range(4)]
    create_nodes(stack.env, nodes)
    code, rows = status(settings)
    assert code == exitcodes.UNHEALTHY and {r["state"] for r in rows} == {"dead"}
    produce(settings, nodes, 50)
    pool = PoolProcess(settings, tmp_path / "pool.log", "--shards", "2", "--metrics-port", "0")
    try:
        assert wait_until(lambda: status(settings)[0] == exitcodes.OK, 30), pool.output()
        code, rows = status(settings)
        assert sum(int(r["length"]) for r in rows) == 200  # type: ignore[call-overload]
        assert all(r["alive"] and r["pid"] for r in rows)
        [victim, _] = pool.shard_pids()
        os.kill(victim, signal.SIGSTOP)  # a frozen shard stops refreshing its heartbeat
        produce(settings, nodes, 50)
        try:
            assert wait_until(lambda: status(settings)[0] == exitcodes.UNHEALTHY, 30)
        finally:
            os.kill(victim, signal.SIGCONT)
        assert wait_until(lambda: status(settings)[0] == exitcodes.OK, 30)
    finally:
        pool.kill()
