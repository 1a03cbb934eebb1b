"""The supervisor: its share of the shards, shard processes for them, restarts, graceful stop."""

from __future__ import annotations

import contextlib
import errno
import logging
import multiprocessing
import os
import secrets
import signal
import socket
import time
from dataclasses import dataclass
from multiprocessing import forkserver
from multiprocessing.connection import Connection, wait
from multiprocessing.context import ForkServerProcess
from multiprocessing.synchronize import Event
from types import FrameType
from typing import Any

import redis

from scalepub import exitcodes
from scalepub.backlog import stream_backlog
from scalepub.connections import check_mode, sync_client
from scalepub.settings import Settings, SettingsError
from scalepub.shard import metrics
from scalepub.shard.membership import Beater, Registry, spread, supervisor_id
from scalepub.shard.process import shard_main
from scalepub.shard.streams import agree_shard_count
from scalepub.sharding import Keys

log = logging.getLogger(__name__)

RESTART_BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 30.0  # a shard that lived this long restarts without delay next time
KILL_AFTER_S = 5.0  # after a second signal, stragglers get SIGKILL


@dataclass
class _Slot:
    """One shard process position: the shards it was given and its restart history."""

    index: int
    shards: list[int]
    process: ForkServerProcess | None = None
    conn: Connection | None = None  # the supervisor's end of the process's pipe
    ready: Event | None = None
    started: float = 0.0
    failures: int = 0
    restart_at: float | None = None
    terminated: bool = False  # SIGTERM sent to the current process


def slot_shards(target: list[int], processes: int | None,
                current: dict[int, list[int]] | None = None) -> dict[int, list[int]]:
    """Which shards each process slot works (pure, unit-tested): one slot per shard by
    default (slot = shard), else ``processes`` slots. A shard stays in its slot while it
    stays ours; a new one goes to the slot with the fewest."""
    if processes is None:
        return {shard: [shard] for shard in target}
    current = current or {}
    out = {i: [s for s in current.get(i, []) if s in target] for i in range(processes)}
    placed = {s for shards in out.values() for s in shards}
    for shard in sorted(set(target) - placed):
        emptiest = min(out, key=lambda i: (len(out[i]), i))
        out[emptiest].append(shard)
    return {i: sorted(shards) for i, shards in out.items()}


class Pool:
    """``scalepub run``: one supervisor; shard processes for the shards it owns by lease.

    Any number of supervisors with the same settings share the shards: each refreshes its
    entry among the live supervisors every renew interval, computes the same spread
    (membership.spread) and works its share; leases fence the rest (lease.py).
    """

    def __init__(self, settings: Settings, processes: int | None = None,
                 log_level: str = "INFO", name: str | None = None) -> None:
        self.settings = settings
        self.processes = None if processes is None else max(1, min(processes, settings.shards))
        self.me = supervisor_id(name)
        # The leases' owner is a slot of this run of the supervisor, ``<id>#<run>/<slot>``: only
        # a slot's next process (started once the last one exited) takes over its lease at
        # once. Another slot, or another run of the same --name (whose orphans may still
        # drain), is another owner and waits for the release.
        self.run_id = f"{self.me}#{secrets.token_hex(3)}"
        self.slots: dict[int, _Slot] = {}
        self.target: list[int] = []
        self.log_level = log_level
        # Shard processes fork from a forkserver that imported the shard code once: a process
        # for a shard taken over starts in tens of ms, where a spawn took 1.5-3 s of imports
        # on a busy 2-core box, most of a takeover's TTL + 2 s budget.
        self._ctx = multiprocessing.get_context("forkserver")
        # scalepub.cli too: a child re-runs the `scalepub` script as __mp_main__ (its imports).
        self._ctx.set_forkserver_preload(["scalepub.shard.process", "scalepub.cli"])
        self._signals = 0
        self._ever_ready = False
        self._registry: Registry | None = None
        self._beater: Beater | None = None
        self._started = time.time()

    def run(self) -> int:
        """Supervise until a signal or a fatal shard error; returns the exit code."""
        try:
            forkserver.ensure_running()  # before any thread (metrics): a clean process to fork
            self._serve_metrics()  # a port in use is a setting to change: say so before Redis
            self._preflight()
        except Exception as exc:
            return exitcodes.report(exc, self.settings, lambda line: log.error("%s", line))
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        self._registry = Registry(sync_client(self.settings), Keys(self.settings.key_prefix),
                                  self.me, self.settings.lease_ttl_s)
        for index in slot_shards([], self.processes):  # --processes: all start at once
            self._spawn(self._slot(index))
        # Joined only now: the others give shards up to us as soon as they see us.
        self._beater = Beater(self._registry, self.settings.lease_renew_s, self._info)
        self._beater.start()
        log.info("pool %s: %d shards shared with the other live supervisors (lease TTL %.1f s)",
                 self.me, self.settings.shards, self.settings.lease_ttl_s)
        code = self._supervise()
        self._leave()
        stopped = self._stop_all()
        if code == exitcodes.OK and self._signals < 2:
            code = stopped  # a shard that failed its graceful stop fails the run
        log.info("pool %s: stopped (exit code %d)", self.me, code)
        return code

    def _serve_metrics(self) -> None:
        """Start the metrics endpoint; a port that cannot be had is a setting to change."""
        host, port = self.settings.metrics_host, self.settings.metrics_port
        if not port:
            return
        try:
            metrics.serve(host, port)
        except socket.gaierror as exc:
            raise SettingsError(f"--metrics-host {host!r}: not an address of this machine "
                                f"({exc.strerror}) [env SCALEPUB_METRICS_HOST]") from None
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:  # the address, not the port, is the trouble
                raise SettingsError(
                    f"--metrics-host {host!r}: not an address of this machine "
                    f"({exc.strerror}) [env SCALEPUB_METRICS_HOST]") from None
            raise SettingsError(
                f"--metrics-port {port}: cannot listen on {host}:{port} ({exc.strerror or exc}); "
                "choose a free port with --metrics-port [env SCALEPUB_METRICS_PORT], "
                "or 0 to turn the metrics endpoint off") from None
        log.info("pool: metrics on http://%s:%d/metrics", self.settings.metrics_host,
                 self.settings.metrics_port)

    def _preflight(self) -> None:
        """Redis answers and its streams agree with our shard count (raises otherwise)."""
        client = sync_client(self.settings, timeout=max(self.settings.redis_timeout, 2.0))
        try:
            check_mode(self.settings, client)  # REDIS_URL's cluster scheme fits the server
            previous = agree_shard_count(client, Keys(self.settings.key_prefix),
                                         self.settings.shards)
        finally:
            client.close()
        if previous is not None:
            log.warning("pool: shard count changed from %d to %d (streams were drained)",
                        previous, self.settings.shards)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals += 1
        log.info("pool %s: %s (%s), %s", self.me, signal.Signals(signum).name, self._signals,
                 "stopping gracefully" if self._signals == 1 else "stopping now")
        for slot in self.slots.values():
            self._terminate(slot, again=self._signals > 1)

    @staticmethod
    def _terminate(slot: _Slot, again: bool = False) -> None:
        """SIGTERM once (graceful); a second SIGTERM makes a shard exit at once."""
        if slot.process is not None and slot.process.is_alive() and (again or not slot.terminated):
            slot.process.terminate()
            slot.terminated = True

    def _slot(self, index: int) -> _Slot:
        return self.slots.setdefault(index, _Slot(index, []))

    def _spawn(self, slot: _Slot) -> None:
        slot.ready = self._ctx.Event()
        slot.conn, child = self._ctx.Pipe()
        # Reset before the start: a signal handled right after it marks this process.
        slot.restart_at = None
        slot.terminated = False
        slot.process = self._ctx.Process(
            target=shard_main, name=f"shard-process-{slot.index}",
            args=(self.settings, child, slot.index, slot.ready.set, self.log_level,
                  f"{self.run_id}/{slot.index}", os.getpid()),
        )
        slot.started = time.monotonic()
        slot.process.start()
        child.close()
        with contextlib.suppress(OSError):  # already dead (a SIGTERM at birth): judged later
            slot.conn.send(slot.shards)

    def _supervise(self) -> int:
        backlog = BacklogGauges(self.settings)
        while not self._signals:
            sentinels = [s.process.sentinel for s in self.slots.values() if s.process is not None]
            assert self._beater is not None
            # A dead child or a change of the live supervisors wakes us at once.
            wait([*sentinels, self._beater.changes], timeout=0.2)
            self._follow(self._beater.latest())
            backlog.maybe_update()
            self._ever_ready |= any(s.ready is not None and s.ready.is_set()
                                    for s in self.slots.values())
            for slot in list(self.slots.values()):
                code = self._check(slot)
                if code is not None:
                    return code
        return exitcodes.OK

    def _info(self) -> dict[str, Any]:
        """What this supervisor reports with each beat (`scalepub status`)."""
        return {"host": socket.gethostname(), "pid": os.getpid(), "shards": self.target,
                "started": self._started}

    def _follow(self, live: list[str] | None) -> None:
        """Work our share of the spread over ``live`` (None: unchanged)."""
        if live is None:
            return
        target = spread(self.settings.shards, live).get(self.me, [])
        if target != self.target:
            log.info("pool %s: %d live supervisors; its shards now %s (were %s)", self.me,
                     len(live), target, self.target)
            self.target = target
            self._assign(slot_shards(target, self.processes,
                                     {i: slot.shards for i, slot in self.slots.items()}))

    def _assign(self, wanted: dict[int, list[int]]) -> None:
        """Tell each slot its shards; start slots that get some, stop those left without."""
        for index in set(wanted) | set(self.slots):
            slot, shards = self._slot(index), wanted.get(index, [])
            if shards == slot.shards:
                continue
            slot.shards = shards
            if slot.process is None:
                if shards and slot.restart_at is None:
                    self._spawn(slot)
            elif not shards and self.processes is None:
                self._terminate(slot)  # drains, acks and releases its shard, then exits
            elif slot.conn is not None:
                with contextlib.suppress(OSError):  # a dying process: restarted with them
                    slot.conn.send(shards)

    def _check(self, slot: _Slot) -> int | None:
        if self._signals:
            return None  # stopping: _stop_all judges every process, none is restarted
        now = time.monotonic()
        if slot.process is None:
            if slot.restart_at is not None and now >= slot.restart_at:
                self._spawn(slot)
            return None
        if slot.process.is_alive():
            return None
        code = slot.process.exitcode or 0
        slot.process.join()
        if slot.process.pid is not None:
            metrics.process_dead(slot.process.pid)
        slot.process = None
        if code in exitcodes.FATAL or (not self._ever_ready and code in (
                exitcodes.XMPP_UNREACHABLE, exitcodes.REDIS_UNREACHABLE)):
            log.error("pool %s: shard process %d failed at start (exit code %d); stopping",
                      self.me, slot.index, code)
            return code
        if slot.terminated and not self._wanted(slot):
            return None  # it gave its shard up when told to (or died of the SIGTERM at birth)
        self._schedule_restart(slot, code, now)
        return None

    def _wanted(self, slot: _Slot) -> bool:
        return bool(slot.shards) or self.processes is not None

    def _schedule_restart(self, slot: _Slot, code: int, now: float) -> None:
        slot.failures = 0 if now - slot.started > STABLE_AFTER_S else slot.failures + 1
        delay = min(0.5 * 2 ** slot.failures, RESTART_BACKOFF_MAX_S) if slot.failures else 0.2
        if slot.terminated and code == exitcodes.OK:
            delay = 0.0  # it gave its shard up and got it back meanwhile
        slot.restart_at = now + delay
        metrics.RESTARTS.labels(",".join(map(str, slot.shards))).inc()
        log.error("pool %s: shard process %d (shards %s) exited with code %d; restart in %.1f s",
                  self.me, slot.index, slot.shards, code, delay)

    def _leave(self) -> None:
        """Leave the live supervisors at once: the others start taking our shards while
        ours drain and release them."""
        if self._registry is None:
            return
        if self._beater is not None:
            self._beater.stop()
        try:
            self._registry.leave()
        except redis.RedisError as exc:  # our entry expires by itself within the TTL
            log.warning("pool %s: cannot leave the membership: %s", self.me, exc)
        self._registry.redis.close()

    def _stop_all(self) -> int:
        """Stop every shard process gracefully; FAILURE if one did not stop cleanly."""
        slots = [s for s in self.slots.values() if s.process is not None]
        for slot in slots:
            self._terminate(slot)
        alive = [s.process for s in slots if s.process is not None]
        deadline = None
        while any(p.is_alive() for p in alive):
            if self._signals >= 2 and deadline is None:
                deadline = time.monotonic() + KILL_AFTER_S
            if deadline is not None and time.monotonic() > deadline:
                for process in alive:
                    process.kill()
            wait([p.sentinel for p in alive if p.is_alive()], timeout=0.2)
        failed = 0
        for slot in slots:
            assert slot.process is not None
            code = slot.process.exitcode
            log.info("pool %s: %s exited with %s", self.me, slot.process.name, code)
            failed += not stopped_cleanly(code, slot.terminated)
        return exitcodes.FAILURE if failed else exitcodes.OK


def stopped_cleanly(exitcode: int | None, terminated: bool) -> bool:
    """Whether a shard process told to stop ended as a graceful stop should (pure).

    0 is a drained stop. Killed by the SIGTERM the supervisor sent (``-SIGTERM``) is one too:
    a shard process handles SIGTERM from the first thing it does (process.ShardHost.run),
    before it asks for any lease, so dying of it means it was still starting and had
    nothing to drain or release.
    """
    return exitcode == exitcodes.OK or (terminated and exitcode == -signal.SIGTERM)


class BacklogGauges:
    """Lag and pending of every shard stream, from Redis, every few seconds."""

    INTERVAL_S = 2.0

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.client = sync_client(settings)
        self.next_at = 0.0

    def maybe_update(self) -> None:
        """Refresh the gauges if due; Redis trouble only skips a round."""
        now = time.monotonic()
        if now < self.next_at:
            return
        self.next_at = now + self.INTERVAL_S
        try:
            for shard in range(self.settings.shards):
                lag, pending = stream_backlog(self.client, self.keys.stream(shard))
                metrics.LAG.labels(str(shard)).set(lag)
                metrics.PENDING.labels(str(shard)).set(pending)
        except redis.RedisError as exc:
            log.warning("pool: cannot read the stream backlog: %s", exc)
