"""Samples, every interval, the CPU of each process group, the machine, and the shard lags.

Groups: ejabberd (its beam.smp), redis, the pool (supervisor and shards), the producers, Locust
and this runner. The machine's total busy CPU shows how much went to processes outside the run
(the box is shared). A process that exits between samples keeps the CPU it was last seen with.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil
import redis

from loadtest import headroom
from scalepub.connections import client_for_url
from scalepub.sharding import CONSUMER_GROUP, Keys

Roots = Callable[[], dict[str, list[int]]]  # group → root pids (their children are included)
UsageRow = tuple[float, dict[str, dict[int, headroom.Usage]]]
FLAT_GROUPS = {"runner"}  # the runner's children are the other groups: count it alone


@dataclass
class Sampler:
    """A thread that appends one row per interval to ``rows``."""

    roots: Roots
    redis_url: str
    key_prefix: str
    shards: int
    interval_s: float = 0.5
    progress: Callable[[], dict[str, int]] = dict
    rows: list[dict[str, Any]] = field(default_factory=list)
    # Groups whose processes are also sampled one by one, with their run-queue wait
    # (``headroom``): the load generator, to judge whether it had CPU to spare.
    detailed: tuple[str, ...] = ()
    usage: list[UsageRow] = field(default_factory=list)
    _seen: dict[int, tuple[str, float]] = field(default_factory=dict)  # pid → (group, cpu s)
    _procs: dict[int, psutil.Process] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        """Sample in a background thread until ``stop()``."""
        self._client = client_for_url(self.redis_url)
        self._keys = Keys(self.key_prefix)
        self._thread = threading.Thread(target=self._loop, name="sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling (one last row is taken)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self._client.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)
        self._sample()

    def _sample(self) -> None:
        row: dict[str, Any] = {"t": time.time()}
        row.update({f"cpu_{g}_s": s for g, s in self._group_cpu().items()})
        busy = psutil.cpu_times()
        row["cpu_machine_s"] = sum(busy) - busy.idle - getattr(busy, "iowait", 0.0)
        for i, core in enumerate(psutil.cpu_times(percpu=True)):  # pinned roles: busy per CPU
            row[f"cpu{i}_busy_s"] = sum(core) - core.idle - getattr(core, "iowait", 0.0)
        with contextlib.suppress(redis.RedisError):
            row.update(self._lags())
        row.update(self.progress())
        self.rows.append(row)
        if self.detailed:
            roots = {g: pids for g, pids in self.roots().items() if g in self.detailed}
            self.usage.append((row["t"], headroom.snapshot(roots)))

    def _group_cpu(self) -> dict[str, float]:
        for group, pids in self.roots().items():
            for pid in pids:
                for proc in self._tree(pid, group not in FLAT_GROUPS):
                    try:
                        times = proc.cpu_times()
                    except psutil.Error:
                        continue
                    self._seen[proc.pid] = (group, times.user + times.system)
        totals: dict[str, float] = {}
        for group, cpu in self._seen.values():
            totals[group] = totals.get(group, 0.0) + cpu
        return totals

    def _tree(self, pid: int, children: bool) -> list[psutil.Process]:
        proc = self._procs.get(pid)
        try:
            if proc is None or not proc.is_running():
                proc = self._procs[pid] = psutil.Process(pid)
            return [proc, *proc.children(recursive=True)] if children else [proc]
        except psutil.Error:
            return []

    def _lags(self) -> dict[str, int]:
        pipe = self._client.pipeline(transaction=False)
        for shard in range(self.shards):
            pipe.xinfo_groups(self._keys.stream(shard))
            pipe.xlen(self._keys.stream(shard))
        replies = pipe.execute(raise_on_error=False)
        out: dict[str, int] = {}
        for shard in range(self.shards):
            groups, length = replies[2 * shard], replies[2 * shard + 1]
            if isinstance(groups, Exception) or isinstance(length, Exception):
                continue
            out[f"xlen_{shard}"] = int(length)
            for group in groups:
                if group["name"] in (CONSUMER_GROUP, CONSUMER_GROUP.encode()):
                    out[f"lag_{shard}"] = int(group.get("lag") or 0)
                    out[f"pending_{shard}"] = int(group.get("pending") or 0)
        return out
