"""Entry point of one spawned shard process: signals, logging, exit codes."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence

from scalepub import exitcodes
from scalepub.logsetup import configure_logging
from scalepub.settings import Settings
from scalepub.shard.worker import ShardWorker

log = logging.getLogger(__name__)

# A graceful stop that takes longer than this (drain included) becomes an immediate one:
# safe, since nothing unconfirmed was acknowledged.
STOP_DEADLINE_S = 20.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def shard_main(settings: Settings, shards: Sequence[int], index: int,
               on_ready: Callable[[], None] | None, log_level: str) -> None:
    """Run one shard process until SIGTERM; exits with an ``exitcodes`` value."""
    configure_logging(log_level)
    # Own process group: Ctrl-C, `timeout` or `kill -- -PGID` reach only the supervisor, which
    # forwards one SIGTERM; otherwise a shard would count the group signal plus the forwarded
    # one as two, and the second means "stop at once".
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(asyncio.run(run_worker(settings, shards, f"shard-{index}", on_ready)))


async def run_worker(settings: Settings, shards: Sequence[int], consumer: str,
                     on_ready: Callable[[], None] | None = None) -> int:
    """Run a ShardWorker with SIGTERM handling; errors a user can fix become exit codes."""
    worker = ShardWorker(settings, shards, consumer, on_ready=on_ready)
    signals = 0

    def on_term() -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.info("shard %s: SIGTERM, draining", consumer)
            worker.stop()
            asyncio.get_running_loop().call_later(STOP_DEADLINE_S, overdue)
        else:  # nothing is acked before the server confirmed it, so stopping now is safe
            log.warning("shard %s: second signal, exiting now", consumer)
            os._exit(exitcodes.INTERRUPTED)

    def overdue() -> None:
        stacks = [t.get_stack(limit=4) for t in asyncio.all_tasks()]
        log.error("shard %s: still stopping after %.0f s; exiting now (tasks: %s)", consumer,
                  STOP_DEADLINE_S, stacks)
        os._exit(exitcodes.INTERRUPTED)

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_term)
    watch = asyncio.create_task(_stop_when_orphaned(worker, consumer))
    try:
        await worker.run()
    except Exception as exc:
        return exitcodes.report(exc, settings, lambda line: log.error("%s", line))
    finally:
        watch.cancel()
    return exitcodes.OK


async def _stop_when_orphaned(worker: ShardWorker, consumer: str) -> None:
    """A supervisor killed with SIGKILL cannot forward signals: stop as soon as it is gone.

    The next pool's shard reads as the same consumer: an orphan still reading then would
    publish some of a node's entries after later ones. Linux signals the parent's death at
    once (PR_SET_PDEATHSIG); polling the parent pid is the portable fallback.
    """
    parent = os.getppid()
    gone = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, gone.set)
    _signal_on_parent_death(signal.SIGUSR1)
    while os.getppid() == parent and not gone.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(gone.wait(), 1.0)
    log.warning("shard %s: the supervisor is gone; stopping gracefully", consumer)
    worker.stop()


def _signal_on_parent_death(signum: int) -> None:
    """Have Linux send ``signum`` when the parent dies; a no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
    except (OSError, AttributeError) as exc:
        log.debug("prctl(PR_SET_PDEATHSIG) unavailable: %s", exc)
