"""A thread that wakes the relay on each event of a source it keeps a session with.

The relay's two wake-up sources (``notify.Listener``: PostgreSQL LISTEN; ``nudge.Subscriber``:
Redis pub/sub) share this: a daemon thread that (re)opens its session with growing pauses,
says whether it is ``listening`` (while not, the relay polls every OUTBOX_POLL_MS), and sets
``wake`` once after each (re)connection for the events it may have missed.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger(__name__)

WAIT_S = 0.5  # how long one wait for an event lasts: the bound on noticing stop or close
_RECONNECT_MAX_S = 5.0


class WakeThread:
    """Subclasses open their session in ``_listen`` (set ``listening`` and ``wake`` once it
    is up, ``wake`` for each event, return or raise when it ends) and name it in ``what``."""

    what = "wake-up session"

    def __init__(self, wake: threading.Event, stop: threading.Event, name: str) -> None:
        self.wake, self.stop, self.ended = wake, stop, threading.Event()
        self.listening = False
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def running(self) -> bool:
        """Until the relay stops (``stop``) or ``close()``."""
        return not (self.stop.is_set() or self.ended.is_set())

    def _listen(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        delay = 0.0
        while self.running():
            if delay and not self._pause(delay):
                return
            try:
                self._listen()
                delay = 0.0
            except Exception as exc:  # the server or a bug: retry, never end the thread
                # once per episode at WARNING (retries repeat until the server is back)
                level = logging.DEBUG if delay else logging.WARNING
                log.log(level, "scalepub relay: %s lost, polling until it is back: %s",
                        self.what, exc)
                delay = min(max(delay * 2, 0.1), _RECONNECT_MAX_S)
            finally:
                self.listening = False

    def _pause(self, seconds: float) -> bool:
        """Wait ``seconds``; False if stopped or closed meanwhile."""
        deadline = time.monotonic() + seconds
        while self.running():
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            self.ended.wait(min(left, WAIT_S))
        return False

    def join(self, timeout: float = WAIT_S * 4) -> None:
        """Wait for the thread (after ``stop`` was set or ``close()``)."""
        self.thread.join(timeout)

    def close(self, timeout: float = WAIT_S * 4) -> None:
        """End the session and wait for the thread."""
        self.ended.set()
        self.join(timeout)
