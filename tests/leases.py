"""Helpers for the multi-supervisor tests: supervisors as processes, a steady producer, a lease
log, and the checks (also for the network-namespace variants of issue 14 §4).

A supervisor is ``scalepub run --name NAME`` (tests.e2e.PoolProcess), its settings' lease TTL
short (``LEASE_TTL_S``). The lease log polls every shard's lease key from the outside, so it
sees each owner change with its time and token, whatever the supervisors believe.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import redis

from scalepub.producer import PendingEntry, StreamProducer
from scalepub.settings import Settings
from scalepub.sharding import Keys, shard_for
from tests.e2e import Got, PoolProcess, wait_until
from tests.streams import row

LEASE_TTL_S = 2.0
LEASE_RENEW_S = 0.5
# The bound for a shard to move to another owner: the TTL plus this.
MOVE_SLACK_S = 2.0


def lease_settings(settings: Settings) -> Settings:
    """``settings`` with the tests' short lease TTL."""
    return settings.replace(lease_ttl_s=LEASE_TTL_S, lease_renew_s=LEASE_RENEW_S)


class Supervisor(PoolProcess):
    """``scalepub run --name NAME`` as a subprocess, with its whole process tree at hand."""

    def __init__(self, settings: Settings, log_dir: Path, name: str, *args: str) -> None:
        self.name = name
        super().__init__(settings, log_dir / f"{name}.log", "--name", name, *args)

    def tree(self) -> list[int]:
        """The supervisor's descendants (shard processes, their forkserver, multiprocessing's
        helpers), deepest first, then the supervisor."""
        return [*descendants(self.proc.pid), self.proc.pid]

    def kill_tree(self) -> float:
        """kill -9 of the whole host's share: children first, so none can hand over.
        Returns when (monotonic) the first signal went: the processes are listed before."""
        at = self.signal_tree(signal.SIGKILL)
        self.proc.wait(10)
        return at

    def pause_tree(self, signum: int) -> float:
        """SIGSTOP or SIGCONT to the supervisor and every child (a stalled host); returns when
        the first signal went."""
        return self.signal_tree(signum)

    def signal_tree(self, signum: int) -> float:
        """``signum`` to every process of the tree at once (listed first: pgrep is slow)."""
        pids = self.tree()
        at = time.monotonic()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        return at


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, children after their own descendants."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True,
                         check=False).stdout
    children = [int(p) for p in out.split()]
    return [d for child in children for d in descendants(child)] + children


@dataclass
class LeaseChange:
    """One owner change as seen from outside: when, which shard, new owner and token."""

    at: float  # time.monotonic()
    shard: int
    owner: str | None
    token: int | None


@dataclass
class LeaseLog:
    """Polls every shard's lease every 20 ms in a thread; records each change."""

    settings: Settings
    changes: list[LeaseChange] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> LeaseLog:
        """Start polling."""
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def owners(self) -> dict[int, str | None]:
        """The current owner of each shard, as last seen."""
        now: dict[int, str | None] = dict.fromkeys(range(self.settings.shards))
        for change in list(self.changes):
            now[change.shard] = change.owner
        return now

    def owned_by(self, name: str) -> list[int]:
        """Shards ``name`` holds now."""
        return sorted(s for s, owner in self.owners().items() if owner == name)

    def moved_at(self, shard: int, since: float, to: set[str]) -> float | None:
        """When ``shard`` first got an owner in ``to`` after ``since`` (monotonic)."""
        for change in list(self.changes):
            if change.shard == shard and change.at >= since and change.owner in to:
                return change.at
        return None

    def tokens_only_grow(self) -> None:
        """Assert every shard's successive tokens increase (one owner per token)."""
        last: dict[int, int] = {}
        for change in self.changes:
            if change.token is None:
                continue
            assert change.token > last.get(change.shard, 0), change
            last[change.shard] = change.token

    def acquisitions(self, shard: int) -> int:
        """How many times ``shard`` got an owner."""
        return sum(1 for c in self.changes if c.shard == shard and c.owner is not None)

    def _run(self) -> None:
        keys = Keys(self.settings.key_prefix)
        client = redis.Redis.from_url(self.settings.redis_url)
        seen: dict[int, bytes | None] = {}
        while not self._stop.is_set():
            with client.pipeline(transaction=False) as pipe:
                for shard in range(self.settings.shards):
                    pipe.hget(keys.lease(shard), "fence")
                values = pipe.execute()
            now = time.monotonic()
            for shard, value in enumerate(values):
                if shard not in seen or seen[shard] != value:
                    seen[shard] = value
                    token, _, owner = value.decode().partition(":") if value else ("", "", "")
                    owner = owner.rpartition("#")[0] or owner  # the supervisor, not its run
                    self.changes.append(LeaseChange(now, shard, owner or None,
                                                    int(token) if token else None))
            time.sleep(0.02)
        client.close()


class SteadyLoad:
    """Appends one entry to each node every ``interval_s`` in a thread; counts per node."""

    def __init__(self, settings: Settings, nodes: list[str], interval_s: float = 0.1) -> None:
        self.settings = settings
        self.nodes = nodes
        self.interval_s = interval_s
        self.sent: dict[str, int] = dict.fromkeys(nodes, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def start(self) -> SteadyLoad:
        """Start producing."""
        self._thread.start()
        return self

    def stop(self) -> dict[str, int]:
        """Stop and return how many entries each node got."""
        self._stop.set()
        self._thread.join(10)
        assert self.error is None, self.error
        return dict(self.sent)

    def _run(self) -> None:
        producer = StreamProducer(self.settings)
        i = 0
        try:
            while not self._stop.is_set():
                rows = [PendingEntry(n, time.time_ns(), "t.row", str(i), "xml", row(i, 200))
                        for n in self.nodes]
                failures = producer.append(rows).failures
                assert not failures, failures
                for node in self.nodes:
                    self.sent[node] += 1
                i += 1
                time.sleep(self.interval_s)
        except BaseException as exc:  # reported by stop()
            self.error = exc
        finally:
            producer.close()


def rewinds(got: list[Got]) -> int:
    """How often a node's arrivals went back to an earlier seq (a re-delivery run)."""
    return sum(1 for a, b in itertools.pairwise(got) if b.seq <= a.seq)


def assert_rewinds_only_at_handovers(by_node: dict[str, list[Got]], log: LeaseLog,
                                     shards: int) -> int:
    """Duplicates come in runs; each run follows an owner change of the node's shard (the new
    owner re-publishes what the old one had not acknowledged). Returns the runs seen."""
    per_shard: dict[int, int] = defaultdict(int)
    for node, got in by_node.items():
        per_shard[shard_for(node, shards)] += rewinds(got)
    for shard, runs in per_shard.items():
        nodes = sum(1 for n in by_node if shard_for(n, shards) == shard)
        # One run per node at most per handover (the first acquisition is no handover).
        assert runs <= nodes * max(log.acquisitions(shard) - 1, 0), (shard, runs)
    return sum(per_shard.values())


def wait_owned(log: LeaseLog, expect: dict[str, int], timeout: float) -> bool:
    """Until each named supervisor owns exactly its count of shards."""
    def ok() -> bool:
        owners = list(log.owners().values())
        return all(owners.count(name) == count for name, count in expect.items())
    return wait_until(ok, timeout, step=0.05)
