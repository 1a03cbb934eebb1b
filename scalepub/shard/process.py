"""One spawned shard process: the shards its supervisor gives it, signals, exit codes.

The supervisor sends the process its shards over a pipe whenever they change (the spread
over live supervisors moved). The process runs one ShardWorker per shard, each publishing
only under the shard's lease (scalepub/shard/lease.py): a shard given up is drained,
acknowledged and released; a shard whose lease was lost is asked for again.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection

import redis

from scalepub import exitcodes
from scalepub.connections import shard_client
from scalepub.logsetup import configure_logging
from scalepub.settings import Settings
from scalepub.shard.membership import leave_for_dead
from scalepub.shard.worker import ShardWorker
from scalepub.sharding import Keys

log = logging.getLogger(__name__)

# A graceful stop that takes longer than this (drain included) becomes an immediate one:
# safe, since nothing unconfirmed was acknowledged.
STOP_DEADLINE_S = 20.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def shard_main(settings: Settings, conn: Connection, index: int,
               on_ready: Callable[[], None] | None, log_level: str, owner: str,
               supervisor_pid: int = 0) -> None:
    """Run one shard process until SIGTERM; exits with an ``exitcodes`` value."""
    configure_logging(log_level, owner.rpartition("#")[0] or owner)  # the supervisor's id
    # Own process group: Ctrl-C, `timeout` or `kill -- -PGID` reach only the supervisor, which
    # forwards one SIGTERM; otherwise a shard would count the group signal plus the forwarded
    # one as two, and the second means "stop at once".
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    host = ShardHost(settings, owner, on_ready, supervisor_pid)
    sys.exit(asyncio.run(host.run(conn)))


class ShardHost:
    """The workers of one shard process, one per shard it was given."""

    def __init__(self, settings: Settings, owner: str,
                 on_ready: Callable[[], None] | None = None, supervisor_pid: int = 0) -> None:
        self.settings = settings
        self.owner = owner
        self.supervisor_pid = supervisor_pid
        self.on_ready = on_ready
        self.assigned: set[int] = set()
        self.workers: dict[int, ShardWorker] = {}
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.failed: BaseException | None = None
        self._leaving: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._signals = 0

    async def run(self, conn: Connection) -> int:
        """Follow the supervisor's assignments until SIGTERM, the pipe's end or a failure."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_term)
        loop.add_reader(conn.fileno(), self._on_message, conn)
        watch = asyncio.create_task(_stop_when_orphaned(self.orphaned, self.owner))
        try:
            await self._stopping.wait()
            self.assign(set())
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)
            if self._leaving is not None:
                await asyncio.wait([self._leaving], timeout=2.0)
        finally:
            loop.remove_reader(conn.fileno())
            watch.cancel()
        if self.failed is not None and isinstance(self.failed, Exception):
            return exitcodes.report(self.failed, self.settings, lambda line: log.error("%s", line))
        return exitcodes.OK

    def stop(self) -> None:
        """Stop every worker gracefully, then exit."""
        self._stopping.set()

    def orphaned(self) -> None:
        """The supervisor died: drain and release our shards, and take its entry out of the
        live supervisors, so the others spread its shards now rather than at its expiry."""
        if not self._stopping.is_set() and self.supervisor_pid:
            self._leaving = asyncio.get_running_loop().create_task(self._leave_for_dead())
        self.stop()

    async def _leave_for_dead(self) -> None:
        me = self.owner.rpartition("#")[0]
        client = shard_client(self.settings)
        try:
            if await leave_for_dead(client, Keys(self.settings.key_prefix), me,
                                    self.supervisor_pid):
                log.warning("%s: its supervisor (pid %d) died; removed it from the live "
                            "supervisors", me, self.supervisor_pid)
        except redis.RedisError as exc:  # its entry expires by itself
            log.warning("%s: could not remove the dead supervisor's entry: %s", me, exc)
        finally:
            await client.aclose()

    def assign(self, shards: set[int]) -> None:
        """Start workers for new shards; drain and release the ones given up."""
        gone, new = self.assigned - shards, shards - self.assigned
        self.assigned = set(shards)
        for shard in gone:
            worker = self.workers.get(shard)
            if worker is not None:
                log.info("shard %d: given up by %s: draining and releasing it", shard, self.owner)
                worker.stop()
        for shard in sorted(new):
            if shard not in self.tasks:  # else the running task keeps going (it was re-given)
                self.tasks[shard] = asyncio.create_task(self._own(shard))

    async def _own(self, shard: int) -> None:
        """Work ``shard`` while it is ours to work: a lost lease is asked for again."""
        try:
            while shard in self.assigned and not self._stopping.is_set():
                worker = ShardWorker(self.settings, shard, self.owner, on_ready=self.on_ready)
                self.workers[shard] = worker
                if shard not in self.assigned or self._stopping.is_set():
                    worker.stop()
                await worker.run()
                await asyncio.sleep(0.1)  # a lease lost at once is not asked for in a hot loop
        except Exception as exc:  # a user-fixable error (or a bug): the process exits with it
            self.failed = self.failed or exc
            self.stop()
        finally:
            self.workers.pop(shard, None)
            self.tasks.pop(shard, None)

    def _on_message(self, conn: Connection) -> None:
        try:
            shards = conn.recv()
        except (EOFError, OSError):  # the supervisor is gone
            asyncio.get_running_loop().remove_reader(conn.fileno())
            log.warning("%s: the supervisor is gone; stopping gracefully", self.owner)
            self.orphaned()
            return
        if not self._stopping.is_set():
            self.assign(set(shards))

    def _on_term(self) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("%s: SIGTERM, draining shards %s", self.owner, sorted(self.assigned))
            self.stop()
            asyncio.get_running_loop().call_later(STOP_DEADLINE_S, self._overdue)
        else:  # nothing is acked before the server confirmed it, so stopping now is safe
            log.warning("%s: second signal, exiting now", self.owner)
            os._exit(exitcodes.INTERRUPTED)

    def _overdue(self) -> None:
        stacks = [t.get_stack(limit=4) for t in asyncio.all_tasks()]
        log.error("%s: still stopping after %.0f s; exiting now (tasks: %s)", self.owner,
                  STOP_DEADLINE_S, stacks)
        os._exit(exitcodes.INTERRUPTED)


async def _stop_when_orphaned(stop: Callable[[], None], owner: str) -> None:
    """A supervisor killed with SIGKILL cannot forward signals: stop as soon as it is gone.

    Its shards' leases then pass to other supervisors (or its successor); an orphan kept
    publishing would only be fenced, but it would hold on to XMPP sessions for nothing.
    Linux signals the parent's death at once (PR_SET_PDEATHSIG); polling the parent pid is
    the portable fallback.
    """
    parent = os.getppid()
    gone = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, gone.set)
    _signal_on_parent_death(signal.SIGUSR1)
    while os.getppid() == parent and not gone.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(gone.wait(), 1.0)
    log.warning("%s: the supervisor is gone; stopping gracefully", owner)
    stop()


def _signal_on_parent_death(signum: int) -> None:
    """Have Linux send ``signum`` when the parent dies; a no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
    except (OSError, AttributeError) as exc:
        log.debug("prctl(PR_SET_PDEATHSIG) unavailable: %s", exc)
