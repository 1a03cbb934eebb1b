"""Several supervisors sharing the shards under steady load, on loopback (plain processes).

Each fault — kill -9 of a supervisor's whole tree, a third supervisor joining, SIGSTOP of a
supervisor's tree for 2x the lease TTL then SIGCONT, one leaving by SIGTERM — must lose
nothing, keep per-node order (duplicates only as re-delivery runs right after a handover),
move the shards within TTL + 2 s, and never give a shard two owners (tokens only grow in the
lease log polled from outside). An independent slixmpp subscriber checks the wire.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest
import redis

from scalepub.settings import Settings
from scalepub.sharding import Keys, shard_for
from tests.e2e import Collector, assert_complete_and_ordered, create_nodes, wait_until
from tests.leases import (
    LEASE_TTL_S,
    MOVE_SLACK_S,
    LeaseLog,
    SteadyLoad,
    Supervisor,
    assert_rewinds_only_at_handovers,
    lease_settings,
    wait_owned,
)
from tests.stack import Stack
from tests.streams import drained

SHARDS = 8
# b and c keep two shard processes that take over shards without starting a process; a and
# d start one per shard they get (the default).
WARM = ("--processes", "2")


@pytest.fixture
def lease_env(settings_for: Settings, stack: Stack) -> Iterator[tuple[Settings, dict[str, str]]]:
    """Settings with 8 shards and a 2 s lease TTL, and the stack's environment for them."""
    settings = lease_settings(settings_for.replace(shards=SHARDS))
    yield settings, stack.env


def _nodes(prefix: str, per_shard: int = 2) -> list[str]:
    """Node names covering every shard ``per_shard`` times."""
    nodes: list[str] = []
    i = 0
    while any(sum(1 for n in nodes if shard_for(n, SHARDS) == s) < per_shard
              for s in range(SHARDS)):
        node = f"/lease/{prefix}/{i}"
        if sum(1 for n in nodes if shard_for(n, SHARDS) == shard_for(node, SHARDS)) < per_shard:
            nodes.append(node)
        i += 1
    return nodes


BOUND_S = LEASE_TTL_S + MOVE_SLACK_S


def _moved_within(log: LeaseLog, shards: list[int], since: float, to: set[str]) -> float:
    """The slowest move of ``shards`` to an owner in ``to`` after ``since`` (checked against
    BOUND_S at the end of the test, after the entries: a late move still shows what the
    subscriber got)."""
    assert wait_until(lambda: all(log.moved_at(s, since, to) for s in shards), 30,
                      step=0.05), (shards, log.owners())
    return max(log.moved_at(s, since, to) or 0.0 for s in shards) - since


def _joined(log: LeaseLog, name: str, balanced: Callable[[], bool]) -> float:
    """Seconds from ``name`` entering the membership to the spread holding again (asserted
    within TTL + 2 s): the handovers a join causes, without the newcomer's start-up."""
    client = redis.Redis.from_url(log.settings.redis_url)
    members = Keys(log.settings.key_prefix).supervisors
    try:
        assert wait_until(lambda: client.zscore(members, name) is not None, 60, step=0.02)
    finally:
        client.close()
    seen = time.monotonic()
    assert wait_until(balanced, 60, step=0.05), log.owners()
    return time.monotonic() - seen


def _three_live(log: LeaseLog, timeout: float) -> bool:
    """b, c and d own 3, 3 and 2 shards in some order, and nobody else any."""
    def spread() -> bool:
        owners = list(log.owners().values())
        return sorted(owners.count(n) for n in "bcd") == [2, 3, 3] and len(owners) == SHARDS \
            and all(o in ("b", "c", "d") for o in owners)
    return wait_until(spread, timeout, step=0.05)


def _die_and_join(settings: Settings, tmp_path: Path, log: LeaseLog,
                  sups: dict[str, Supervisor], figures: dict[str, float]) -> None:
    """kill -9 of a's tree (b takes a's shards when their leases expire), then c and d join
    (the spread moves shards to them by graceful handovers)."""
    victim = log.owned_by("a")
    t0 = sups["a"].kill_tree()
    figures["kill -9"] = _moved_within(log, victim, t0, {"b"})
    sups["c"] = Supervisor(settings, tmp_path, "c", *WARM)
    figures["join"] = _joined(log, "c", lambda: wait_owned(log, {"b": 4, "c": 4}, 0))
    sups["d"] = Supervisor(settings, tmp_path, "d")
    figures["third joins"] = _joined(log, "d", lambda: _three_live(log, 0))
    time.sleep(1)


def _stall_and_leave(log: LeaseLog, sups: dict[str, Supervisor],
                     figures: dict[str, float]) -> None:
    """SIGSTOP of b's tree for 2x the TTL (its shards move; after SIGCONT it must not publish
    over the new owners: its sessions were replaced, its acks are fenced), then d leaves by
    SIGTERM (drains, acknowledges, releases; b and c take over at once)."""
    stalled = log.owned_by("b")
    t0 = sups["b"].pause_tree(signal.SIGSTOP)
    figures["SIGSTOP"] = _moved_within(log, stalled, t0, {"c", "d"})
    time.sleep(max(0.0, t0 + 2 * LEASE_TTL_S - time.monotonic()))
    sups["b"].pause_tree(signal.SIGCONT)
    assert _three_live(log, 30), log.owners()
    time.sleep(1)
    leaving = log.owned_by("d")
    t0 = time.monotonic()
    sups["d"].signal(signal.SIGTERM)
    figures["SIGTERM"] = _moved_within(log, leaving, t0, {"b", "c"})
    assert sups["d"].proc.wait(30) == 0, sups["d"].output()[-3000:]
    time.sleep(2)


@pytest.mark.slow
def test_supervisors_die_join_stall_and_leave_under_load(
        lease_env: tuple[Settings, dict[str, str]], redis_client: redis.Redis,
        tmp_path: Path) -> None:
    settings, env = lease_env
    nodes = _nodes(settings.key_prefix)
    create_nodes(env, nodes)
    collector = Collector(env, nodes).start()
    log = LeaseLog(settings).start()
    sups: dict[str, Supervisor] = {}
    figures: dict[str, float] = {}
    try:
        sups["a"] = Supervisor(settings, tmp_path, "a")  # a process per shard (the default)
        sups["b"] = Supervisor(settings, tmp_path, "b", *WARM)
        assert wait_owned(log, {"a": 4, "b": 4}, 60), (log.owners(), sups["a"].output()[-2000:])
        load = SteadyLoad(settings, nodes).start()
        time.sleep(2)
        _die_and_join(settings, tmp_path, log, sups, figures)
        _stall_and_leave(log, sups, figures)
        sent = load.stop()
        total = sum(sent.values())
        assert collector.wait_for(lambda got: len({(g.node, g.seq) for g in got}) >= total, 90), \
            (collector.count(), total)
        assert wait_until(lambda: drained(settings, redis_client), 30)
        for name in ("b", "c"):
            assert sups[name].stop() == 0, sups[name].output()[-3000:]
    finally:
        log.stop()
        collector.stop()
        for sup in sups.values():
            sup.pause_tree(signal.SIGCONT)
            sup.kill()
    duplicates = assert_complete_and_ordered(collector.by_node(), sent)
    log.tokens_only_grow()
    runs = assert_rewinds_only_at_handovers(collector.by_node(), log, SHARDS)
    keys = Keys(settings.key_prefix)
    assert all(redis_client.exists(keys.lease(s)) == 0 for s in range(SHARDS))  # all released
    moves = ", ".join(f"{k} {v:.2f} s" for k, v in figures.items())
    print(f"{total} entries over {len(nodes)} nodes: 0 lost, {duplicates} duplicates in {runs} "
          f"re-delivery runs; shards moved after: {moves}")
    late = {k: round(v, 2) for k, v in figures.items() if v > BOUND_S}
    assert not late, f"moved later than TTL + {MOVE_SLACK_S:.0f} s = {BOUND_S:.0f} s: {late}"


def test_a_supervisor_killed_alone_hands_over_long_before_the_ttl(
        lease_env: tuple[Settings, dict[str, str]], redis_client: redis.Redis,
        tmp_path: Path) -> None:
    """kill -9 of the supervisor process only: its shard processes see it die, drain, release
    their leases and take its entry out of the live supervisors, so the other supervisor takes
    every shard at once instead of after the (here 10 s) TTL."""
    settings = lease_env[0].replace(lease_ttl_s=10.0, lease_renew_s=1.0)
    log = LeaseLog(settings).start()
    a = Supervisor(settings, tmp_path, "a")
    b = Supervisor(settings, tmp_path, "b", *WARM)
    try:
        assert wait_owned(log, {"a": 4, "b": 4}, 60), (log.owners(), a.output()[-2000:])
        t0 = time.monotonic()
        a.proc.kill()
        a.proc.wait(10)
        assert wait_owned(log, {"b": SHARDS}, 10), (log.owners(), a.output()[-2000:])
        took = time.monotonic() - t0
        assert took < settings.lease_ttl_s / 2, took
        members = Keys(settings.key_prefix).supervisors
        live = cast(list[bytes], redis_client.zrange(members, 0, -1))
        assert [m.decode() for m in live] == ["b"]
        assert "removed it from the live supervisors" in a.output()
        assert b.stop() == 0, b.output()[-3000:]
    finally:
        log.stop()
        a.kill()
        b.kill()
    log.tokens_only_grow()
    print(f"kill -9 of a supervisor alone: the other owned all shards after {took:.2f} s "
          f"(TTL {settings.lease_ttl_s:.0f} s)")
