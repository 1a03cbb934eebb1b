"""How a shard worker takes one of its loops ending (ShardWorker._loop_ended)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from scalepub.shard.worker import ShardWorker


class _Counter:
    def __init__(self) -> None:
        self.count = 0

    def inc(self) -> None:
        self.count += 1


def _worker(*, stopping: bool, draining: bool) -> Any:
    stop = asyncio.Event()
    if stopping:
        stop.set()
    internal = _Counter()
    return SimpleNamespace(crashed=None, _stop=stop, _draining=draining, _name="0",
                           _meters=SimpleNamespace(errors=lambda kind: internal),
                           internal=internal, stop=stop.set)


def _ended(exc: BaseException) -> asyncio.Future[None]:
    loop = asyncio.new_event_loop()
    try:
        future: asyncio.Future[None] = loop.create_future()
        future.set_exception(exc)
        return future
    finally:
        loop.close()


@pytest.mark.parametrize("exc", [redis.BusyLoadingError("LOADING"), redis.ConnectionError("down")])
def test_an_outage_that_ends_a_loop_while_draining_is_no_crash(exc: Exception) -> None:
    worker = _worker(stopping=True, draining=True)
    ShardWorker._loop_ended(worker, _ended(exc))  # type: ignore[arg-type]
    assert worker.crashed is None
    assert worker.internal.count == 0


@pytest.mark.parametrize(("stopping", "draining", "exc"), [
    (False, False, redis.BusyLoadingError("LOADING")),  # working: loops retry, never end so
    (True, False, redis.ConnectionError("down")),  # stopping, not yet draining: still retried
    (True, True, ValueError("a bug")),  # a bug while draining is still a bug
])
def test_other_loop_ends_stop_the_shard_as_a_crash(stopping: bool, draining: bool,
                                                   exc: Exception) -> None:
    worker = _worker(stopping=stopping, draining=draining)
    ShardWorker._loop_ended(worker, _ended(exc))  # type: ignore[arg-type]
    assert worker.crashed is exc
    assert worker.internal.count == 1
    assert worker._stop.is_set()
