"""The outbox relay: moves committed outbox rows to their shard streams, oldest first.

One relay per database works at a time (a Redis lease), so rows leave the table in id order
and per-node order survives (the order it guarantees when writers commit out of id order:
docs/reliability.md §1, "Relay order"). On PostgreSQL an idle relay is woken by the commit
notifications of any process (``notify``); elsewhere by its own process's commits and by the
nudges the relays of other processes publish after theirs (``nudge``); it still polls, once a
second while those wake it, else every OUTBOX_POLL_MS.
By default every serving Django process runs a relay thread that competes for the lease
(``OUTBOX_RELAY = "thread"``, started by ``runtime``); ``manage.py scalepub_relay`` runs one
on its own. Rows are deleted only after Redis appended them. A relay that dies in between, or
whose append timed out after Redis ran it, leaves rows that were appended: the append script
keeps, per shard, the outbox ids of the last call from this database and answers those rows
with where they landed instead of appending them twice.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
import zlib
from dataclasses import dataclass
from typing import Any, cast

import redis
from django.db import DatabaseError, connections

from scalepub import metrics
from scalepub.connections import sync_client
from scalepub.django import notify, nudge, outbox
from scalepub.producer import Refusal, StreamProducer
from scalepub.settings import Settings
from scalepub.sharding import Keys

log = logging.getLogger(__name__)

LEASE_TTL_S = 10.0
# The relay's backlog report for `scalepub status`: how often, and how long it stays.
STATE_EVERY_S = 1.0
STATE_TTL_S = 15.0
# The report outlives its TTL by this much, so `scalepub status` can show a relay that stopped
# reporting as stale (rows may wait with nobody moving them) instead of forgetting it.
STATE_KEEP_S = 86_400
# How long a stopping relay keeps draining rows it can still move (e.g. a short command).
DRAIN_ON_STOP_S = 5.0
# Retries while Redis or the database fail are at most this far apart, so waiting rows move
# within ~1 s of Redis coming back (docs/reliability.md §1 promises 2 s).
_BACKOFF_MAX_S = 1.0
# An idle leader woken by commit notifications (PostgreSQL) or nudges (elsewhere, relays
# running as threads) still looks this often: rows a notification or nudge never announced
# (a session that was down and is back, a writer that runs no relay thread) wait no longer.
LISTENING_POLL_S = 1.0
# A relay that does not lead tries to take the lease this often.
FOLLOW_RETRY_S = 1.0
_STOP_CHECK_S = 0.1
# The gather window: a woken leader starts its next round no sooner than this after the last
# one started, and under load no sooner than _ROUND_GAP_FACTOR times the CPU time the last
# round took in this thread (capped): a round costs a SELECT, an append and a DELETE (on
# PostgreSQL a commit of its own) however few rows it moves, and in the web process it
# competes with the saves for the GIL and a core. CPU time, not wall time: on a busy machine
# a round's wall time is mostly waiting for a core, and a window grown from it delayed every
# entry at 100 saves/s (measured). A round of one or two rows takes 0.3-1 ms of CPU here
# (busy box: 1.0 ms median), so at 100 saves/s the window stays at its 2 ms floor; at
# thousands of saves/s rounds grow, the relay thread stays near 1/(1 + factor) of a core and
# each round moves the commits of one window (loadtest/bench_ingest.py).
_MIN_ROUND_GAP_S = 0.002
_ROUND_GAP_FACTOR = 2.0
_MAX_ROUND_GAP_S = 0.020
# The window also widens with how busy the rest of this process is (the share of a core its
# other threads used, ``ProcessLoad``, averaged over about _LOAD_AVERAGE_S): from
# _MIN_ROUND_GAP_S at _BUSY_FROM to _MAX_ROUND_GAP_S at _BUSY_FULL. In a web process saving
# flat out, rounds of one or two rows each cost a SELECT, an append and a DELETE, ~0.5-1 ms
# of CPU per row that the saves waited for (the GIL): a registered save cost 1.7-2.0x a plain
# one. Saving flat out on PostgreSQL keeps the saving thread busy about half the time (it
# waits for the server the rest); paced at 100 saves/s it was 0.10-0.13 busy (cold caches,
# loadtest/bench_relay_latency.py), and a window widened from there delayed its entries
# (commit -> append p90 1.4 -> 11.7 ms with the floor at 0.1 and no average).
_BUSY_FROM = 0.25
_BUSY_FULL = 0.5
_LOAD_AVERAGE_S = 0.1
# Rows moving at this rate count as a process busy at _BUSY_FULL however little CPU it got:
# on a machine short of cores the saving thread waits for one, its share of a core falls
# (load 4-5 on 2 cores: 2-3 rows per round instead of 8-15), yet rows keep coming.
_FULL_RATE = 1000.0
# False: the window ignores the process's load (the A/B baseline of loadtest/bench_ingest.py)
BUSY_WINDOW = True

# Renew only our own lease: a relay that stalled past its TTL must not extend a successor's.
_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Lease:
    """A Redis key with a TTL that says which relay of a database may move rows."""

    def __init__(self, client: redis.Redis, key: str, ttl_s: float = LEASE_TTL_S) -> None:
        self.client, self.key, self.ttl_ms = client, key, int(ttl_s * 1000)
        self.token = uuid.uuid4().hex
        self._held_until = 0.0
        self._renew = client.register_script(_RENEW_LUA)
        self._release = client.register_script(_RELEASE_LUA)

    def hold(self) -> bool:
        """Take or keep the lease; renews once a third of the TTL has passed."""
        now = time.monotonic()
        if now < self._held_until - 2 * self.ttl_ms / 3000:
            return True
        ok = bool(self._renew(keys=[self.key], args=[self.token, self.ttl_ms])) or bool(
            self.client.set(self.key, self.token, nx=True, px=self.ttl_ms))
        self._held_until = now + self.ttl_ms / 1000 if ok else 0.0
        return ok

    def held(self) -> bool:
        """Whether this relay holds the lease now, as far as it knows (no Redis call: until
        the TTL counted from before its last successful take or renewal has passed)."""
        return time.monotonic() < self._held_until

    def release(self) -> None:
        """Give the lease up at once (another relay takes over without waiting the TTL)."""
        if self._held_until:
            self._held_until = 0.0
            self._release(keys=[self.key], args=[self.token])


@dataclass
class Round:
    """What one relay round did."""

    moved: int
    refused: int  # rows of shards whose script refused (backpressure, shard mismatch)


class Relay:
    """Moves outbox rows of one database to Redis while it holds the lease."""

    def __init__(self, settings: Settings, using: str = "default",
                 producer: StreamProducer | None = None) -> None:
        self.settings, self.using = settings, using
        self.producer = (producer if producer is not None
                         else StreamProducer(settings, single_thread=True))
        self.database = database_id(using)
        keys = Keys(settings.key_prefix)
        self.lease = Lease(sync_client(settings), keys.relay_lease(self.database))
        self.state_key = keys.relay_state(self.database)
        self.nudge_channel = keys.relay_nudge(self.database)
        # No LISTEN/NOTIFY on this database: commits of other processes arrive as nudges.
        self.nudging = not notify.available(using)
        self.following = False  # the last round found another relay holding the lease
        self._nudges: nudge.Subscriber | None = None
        self._refused_reason = ""  # failure_reason of the last refusal; empty while accepted
        self._reported = 0.0
        self._listener: notify.Listener | None = None
        self._no_listener = False  # this database cannot notify: poll
        self.moved = 0  # rows moved so far (the gather window's rate)

    @property
    def notified(self) -> bool:
        """Whether this process's commits need not wake the relay: its LISTEN session
        announces them (PostgreSQL, leading), or it follows and has no leader to nudge.

        A commit's own wake-up beside its notification made a second, empty round (a SELECT
        that finds nothing) of every sparse commit (loadtest/bench_paced_save.py)."""
        if self.following:
            return not self.nudging
        listener = self._listener
        return listener is not None and listener.listening

    def relay_once(self) -> Round:
        """Append up to OUTBOX_BATCH of the oldest rows, delete those Redis took."""
        entries = outbox.oldest_entries(self.using, self.settings.outbox_batch)
        age = (time.time_ns() - entries[0].ts_ns) / 1e9 if entries else 0.0
        metrics.OUTBOX_OLDEST_AGE.set(age)
        if not entries:
            self._refused_reason = ""
            self._report(0.0, 0)
            return Round(0, 0)
        # With the database as source, rows appended by a call whose reply was lost (a
        # timeout) are recognised when this or the next relay appends them again.
        result = self.producer.append(entries, source=self.database)
        reason = ""
        for failure in result.failures:
            reason = self._refused(failure.reason, failure.message, len(failure.entries))
        self._refused_reason = reason
        refused = {id(e) for f in result.failures for e in f.entries}
        done = [cast(int, e.oid) for e in entries if id(e) not in refused]
        outbox.delete(self.using, done)
        metrics.OUTBOX_RELAYED.inc(len(done))
        self.moved += len(done)
        left = len(entries) - len(done)
        # After the round, so a refusal is reported with the round that met it; the age is
        # the round's oldest row's (an upper bound when only later rows were refused).
        self._report(age if left else 0.0, left, full=len(entries) == self.settings.outbox_batch)
        return Round(len(done), left)

    def _report(self, oldest_age_s: float, left: int, full: bool = False) -> None:
        """Once a second, idle or not, the backlog for `scalepub status` (a hash with a TTL).

        ``left``: rows this round left in the outbox; a ``full`` round (OUTBOX_BATCH rows)
        may have left more behind it, so the table is counted.
        """
        now = time.monotonic()
        if now - self._reported < STATE_EVERY_S:
            return
        self._reported = now
        rows = outbox.count(self.using) if full else left
        state = {"rows": rows, "oldest_age_s": round(oldest_age_s, 3),
                 "refusing": int(bool(self._refused_reason)),
                 "refused_reason": self._refused_reason, "pid": os.getpid(),
                 "host": socket.gethostname(), "at": time.time(), "ttl_s": STATE_TTL_S}
        pipe = self.lease.client.pipeline(transaction=False)
        pipe.hset(self.state_key, mapping=cast(Any, state))  # redis-py's Mapping is invariant
        pipe.expire(self.state_key, STATE_KEEP_S)
        pipe.execute()

    def _refused(self, reason: Refusal, message: str, count: int) -> str:
        """Count and log a refusal; its reason's label."""
        metrics.RELAY_ERRORS.labels(reason=reason.value).inc()
        # once per episode at WARNING (refusals repeat every backoff round until the pool
        # catches up), then DEBUG
        level = logging.DEBUG if self._refused_reason else logging.WARNING
        log.log(level, "scalepub relay: %d entries wait in the outbox, Redis refused them "
                "(%s): %s", count, reason.value, message)
        return reason.value

    def run(self, stop: threading.Event, wake: threading.Event | None = None,
            round_lock: contextlib.AbstractContextManager[Any] | None = None) -> None:
        """Relay until ``stop`` is set; then drain what can still move, briefly.

        ``round_lock`` is held during each round (not while waiting): a process about to
        fork takes it, so the child never inherits a lock taken in the middle of a round.
        """
        wake = wake if wake is not None else threading.Event()
        in_round = round_lock if round_lock is not None else contextlib.nullcontext()
        delay = 0.0
        load = ProcessLoad()
        try:
            while not stop.is_set():
                started, cpu = time.monotonic(), time.thread_time()
                with in_round:
                    delay, idle = self._step(delay)
                if self.following:
                    self._follow(wake, stop)
                elif delay:
                    stop.wait(delay)
                elif idle:
                    took = time.thread_time() - cpu
                    _wait(wake, stop, self._idle_wait(wake, stop))
                    wake.clear()
                    # Woken by each commit: gather the commits of a window before the next
                    # round (see _ROUND_GAP_FACTOR and _BUSY_FROM).
                    busy = load.busy(self.moved) if BUSY_WINDOW else 0.0
                    stop.wait(started + round_gap(took, busy) - time.monotonic())
        finally:
            if self._listener is not None:
                self._listener.join()
            self._unsubscribe()
        self._drain()

    def _follow(self, wake: threading.Event, stop: threading.Event) -> None:
        """Until the next try for the lease: nudge the leader after this process's commits,
        once per wake-up (commits of the next _MIN_ROUND_GAP_S share it)."""
        deadline = time.monotonic() + FOLLOW_RETRY_S
        while not stop.is_set():
            _wait(wake, stop, deadline - time.monotonic())
            if not wake.is_set():
                return
            wake.clear()
            if self.nudging:
                nudge.send(self.lease.client, self.nudge_channel)
            stop.wait(_MIN_ROUND_GAP_S)

    def _idle_wait(self, wake: threading.Event, stop: threading.Event) -> float:
        """How long the idle leader waits for a wake-up: on PostgreSQL every commit notifies
        (started at the first idle round as leader: relays that never lead hold no LISTEN
        session), and the short poll only covers a listener that is down. Elsewhere the
        same once nudges arrive (below)."""
        if self._listener is None and not self._no_listener:
            self._listener = notify.listener(self.using, wake, stop)
            self._no_listener = self._listener is None
        if self._listener is not None and self._listener.listening:
            return LISTENING_POLL_S
        if self.nudging and self._nudges is None:
            self._nudges = nudge.Subscriber(self.lease.client, self.nudge_channel, wake, stop)
        if self._nudged():
            return LISTENING_POLL_S
        return self.settings.outbox_poll_ms / 1000

    def _nudged(self) -> bool:
        """Whether every commit reaches this idle leader as a wake-up: its subscription is up
        and relays run as threads (each committing process has one, which nudges it, or
        wakes it directly in this process). Then the short poll only made empty rounds, 100
        a second, ~3 % of a core in an idle process and one or more per sparse commit
        (loadtest/bench_paced_save.py); with ``OUTBOX_RELAY = "external"`` nobody nudges."""
        nudges = self._nudges
        return (self.settings.outbox_relay == "thread" and nudges is not None
                and nudges.listening)

    def _unsubscribe(self) -> None:
        """Stop taking nudges (stopping, or another relay leads: a follower woken by nudges
        would nudge in turn)."""
        if self._nudges is not None:
            self._nudges.close()
            self._nudges = None

    def _step(self, delay: float) -> tuple[float, bool]:
        """One round: the delay before the next (growing while things fail), and idleness."""
        try:
            self.following = False
            if not self.lease.hold():
                metrics.RELAY_LEADER.set(0)
                self.following = True
                self._unsubscribe()
                return FOLLOW_RETRY_S, True
            metrics.RELAY_LEADER.set(1)
            done = self.relay_once()
        except (redis.RedisError, DatabaseError) as exc:
            return self._failed(exc, delay), True
        except Exception:  # a bug must not end the thread: the rows would wait for ever
            log.exception("scalepub relay: unexpected error; rows stay in the outbox")
            metrics.RELAY_ERRORS.labels(reason="internal").inc()
            return max(_longer(delay), 1.0), True
        if done.refused:
            return _longer(delay), True
        return 0.0, done.moved < self.settings.outbox_batch

    def _failed(self, exc: Exception, delay: float) -> float:
        reason = "database" if isinstance(exc, DatabaseError) else "redis"
        metrics.RELAY_ERRORS.labels(reason=reason).inc()
        if not delay:  # once per episode, not once per retry
            log.warning("scalepub relay: %s unavailable, rows stay in the outbox: %s",
                        reason, exc)
        if isinstance(exc, DatabaseError):
            connections[self.using].close()  # a broken connection is reopened on next use
        return _longer(delay)

    def drain(self, seconds: float = float("inf")) -> int:
        """Move rows while this relay holds the lease, until the outbox is empty, Redis
        refuses, or ``seconds`` pass; then release the lease. Returns the rows moved."""
        deadline = time.monotonic() + seconds
        moved = 0
        try:
            while time.monotonic() < deadline and self.lease.hold():
                done = self.relay_once()
                moved += done.moved
                if done.moved < self.settings.outbox_batch or done.refused:
                    break
        finally:
            self.lease.release()
        return moved

    def _drain(self) -> None:
        try:
            self.drain(DRAIN_ON_STOP_S)
        except (redis.RedisError, DatabaseError) as exc:
            log.warning("scalepub relay: stopped with rows left in the outbox: %s", exc)
        except Exception:  # stopping: a bug here must not end the thread with a traceback
            log.exception("scalepub relay: unexpected error while draining; rows stay in "
                          "the outbox")
        finally:
            metrics.RELAY_LEADER.set(0)
            connections[self.using].close()
            self.producer.close()


def _wait(wake: threading.Event, stop: threading.Event, timeout: float) -> None:
    """Wait up to ``timeout`` for ``wake``, noticing ``stop`` within _STOP_CHECK_S."""
    deadline = time.monotonic() + timeout
    while not stop.is_set():
        left = deadline - time.monotonic()
        if left <= 0 or wake.wait(min(left, _STOP_CHECK_S)):
            return


def round_gap(took: float, busy: float = 0.0) -> float:
    """The least time from one round's start to the next after a round that took ``took``
    seconds of CPU, the rest of the process using ``busy`` of a core."""
    floor = _MIN_ROUND_GAP_S + (_MAX_ROUND_GAP_S - _MIN_ROUND_GAP_S) * min(
        max(busy - _BUSY_FROM, 0.0) / (_BUSY_FULL - _BUSY_FROM), 1.0)
    return min(max(floor, _ROUND_GAP_FACTOR * took), _MAX_ROUND_GAP_S)


class ProcessLoad:
    """How busy this process's other threads are: the share of a core they used (its CPU
    time less the calling thread's, over the wall time), a moving average over about
    _LOAD_AVERAGE_S: the gaps between two looks are a few ms, too short to tell a busy
    process from one save that fell in between."""

    def __init__(self) -> None:
        self._last = self._now()
        self._share = 0.0
        self._rows, self._rows_at, self._rate = 0, self._last[0], 0.0

    def busy(self, moved: int) -> float:
        """The share, or more while rows come fast (``moved``: rows moved so far in all):
        _BUSY_FULL at _FULL_RATE rows a second, averaged like the share."""
        share = self.others()
        wall = self._last[0] - self._rows_at
        if wall > 0:
            rate = (moved - self._rows) / wall
            self._rate += (rate - self._rate) * min(wall / _LOAD_AVERAGE_S, 1.0)
            self._rows, self._rows_at = moved, self._last[0]
        return max(share, _BUSY_FULL * self._rate / _FULL_RATE)

    @staticmethod
    def _now() -> tuple[float, float, float]:
        return time.monotonic(), time.process_time(), time.thread_time()

    def others(self) -> float:
        """The share (0 to 1), updated with the time since the last call."""
        now, last = self._now(), self._last
        self._last = now
        wall = now[0] - last[0]
        if wall <= 0:
            return self._share
        other = (now[1] - last[1]) - (now[2] - last[2])
        share = min(max(other / wall, 0.0), 1.0)
        self._share += (share - self._share) * min(wall / _LOAD_AVERAGE_S, 1.0)
        return self._share


def _longer(delay: float) -> float:
    return min(max(delay * 2, 0.05), _BACKOFF_MAX_S)


def database_id(using: str) -> str:
    """The alias plus a hash of engine, host, port and name: equal in every process."""
    db = connections[using].settings_dict
    ident = f"{db.get('ENGINE')}|{db.get('HOST')}|{db.get('PORT')}|{db.get('NAME')}"
    return f"{using}:{zlib.crc32(ident.encode()):08x}"
