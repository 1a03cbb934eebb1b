"""Issue 16 §1: on SQLite, a row committed by a process whose relay does not hold the lease
reaches Redis at once, not at the leader's next poll: that process's relay nudges the leader
over Redis pub/sub (scalepub/django/nudge.py).

Two processes of the example project on one SQLite file: a web process whose relay takes the
lease and polls only every 5 s, and a ``manage.py shell`` that saves. Without the nudge each
save after the first waits for the leader's next poll (~5 s); the bound is 1 s.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import redis

from scalepub.settings import Settings
from tests.e2e import REPO, wait_until
from tests.test_relay_start import WebProcess, example_env, manage

pytestmark = [pytest.mark.stack]

__all__ = ["example_env"]  # the fixture, used by name

POLL_MS = 5000


def nudge_channels(client: redis.Redis, settings: Settings) -> list[bytes | str]:
    """The nudge channels someone is subscribed to under this test's prefix."""
    return list(client.pubsub_channels(f"{settings.key_prefix}:relay:*:nudge"))


def test_a_row_committed_where_the_lease_is_not_held_reaches_redis_before_the_poll(
        example_env: dict[str, str], settings_for: Settings, redis_client: redis.Redis,
        tmp_path: Path) -> None:
    env = {**example_env, "SCALEPUB_OUTBOX_POLL_MS": str(POLL_MS),
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with WebProcess(env, tmp_path / "web.log") as web:
        # the web process's relay leads (it is the only relay) and is subscribed to nudges
        assert wait_until(lambda: bool(nudge_channels(redis_client, settings_for)),
                          timeout=30), web.log()
        time.sleep(0.5)  # past the round its subscription's first wake-up started
        out = manage(env, "shell", "-v0", "-c",
                     "import json\nfrom loadtest.bench_nudge import commit_to_append\n"
                     "print('took', json.dumps(commit_to_append(4, 0.05)))")
        took = json.loads(out.split("took", 1)[1])
        # the saving process's relay followed: it never took the lease from the web process
        assert web.proc.poll() is None
    print("commit -> append (ms):", [round(t * 1000, 1) for t in took])
    assert len(took) == 4
    assert max(took) < POLL_MS / 5000, took


def test_a_relay_that_stops_leading_stops_taking_nudges(
        example_env: dict[str, str], settings_for: Settings, redis_client: redis.Redis,
        tmp_path: Path) -> None:
    """A follower woken by nudges would nudge in turn: losing the lease unsubscribes."""
    with WebProcess(example_env, tmp_path / "web.log") as web:
        assert wait_until(lambda: bool(nudge_channels(redis_client, settings_for)),
                          timeout=30), web.log()
        [lease] = [k for k in redis_client.scan_iter(match=f"{settings_for.key_prefix}:relay:*")
                   if not k.endswith((b":state", b":nudge"))]
        # another relay takes the lease (as after a stall past the TTL)
        redis_client.set(lease, "someone-else", px=60_000)
        assert wait_until(lambda: not nudge_channels(redis_client, settings_for),
                          timeout=10), web.log()
