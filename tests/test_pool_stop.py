"""The supervisor's graceful stop while its shard processes are still starting."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import redis

from scalepub import exitcodes
from scalepub.settings import Settings
from scalepub.shard.pool import stopped_cleanly
from scalepub.sharding import Keys
from tests.e2e import PoolProcess, wait_until


@pytest.mark.parametrize(("exitcode", "terminated", "clean"), [
    (exitcodes.OK, False, True),
    (exitcodes.OK, True, True),
    (-signal.SIGTERM, True, True),  # our SIGTERM before its handler: it had started nothing
    (-signal.SIGTERM, False, False),  # someone else's
    (-signal.SIGKILL, True, False),
    (exitcodes.INTERRUPTED, True, False),  # a second signal: stopped without draining
    (exitcodes.XMPP_AUTH, True, False),
    (None, True, False),  # still running
])
def test_which_exits_are_a_clean_stop(exitcode: int | None, terminated: bool,
                                      clean: bool) -> None:
    assert stopped_cleanly(exitcode, terminated) is clean


@pytest.mark.stack
@pytest.mark.parametrize("delay", [0.0, 0.02, 0.1])
def test_sigterm_while_shard_processes_start_exits_0(settings_for: Settings, tmp_path: Path,
                                                     redis_client: redis.Redis,
                                                     delay: float) -> None:
    """SIGTERM as the first of 8 shard processes appears: some are still starting (dying of
    the forwarded SIGTERM before their handler is in place), others hold a lease or not yet.
    The supervisor exits 0, and no lease is left behind."""
    settings = settings_for.replace(shards=8)
    pool = PoolProcess(settings, tmp_path / "pool.log", "--shards", "8")
    try:
        assert wait_until(lambda: bool(pool.shard_pids()), 30, step=0.005), pool.output()
        time.sleep(delay)
        code = pool.stop(timeout=30)
    finally:
        pool.kill()
    assert code == exitcodes.OK, pool.output()[-4000:]
    keys = Keys(settings.key_prefix)
    assert not redis_client.exists(*(keys.lease(s) for s in range(8))), "a lease was kept"
