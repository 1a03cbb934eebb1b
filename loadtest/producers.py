"""Runs the producer plan of a load test: ``python -m loadtest.producers PLAN.json``.

All ``manage.py tweet`` processes are children of this one process, started by
``loadtest/run.py`` in a session of its own. Linux puts each session in its own CPU
"autogroup" (``/proc/sys/kernel/sched_autogroup_enabled``) and shares CPU between autogroups
before it shares it between processes: producers started each in its own session would get
one share each, five producers five times ejabberd's. Here the application is one share, like
ejabberd, Redis, the shard pool and Locust, as if each ran on a machine of its own;
``nice`` (the plan's ``nice``) lowers that share further. SIGTERM becomes SIGINT for the
producers: Django then exits through its exit handlers, and the outbox relay thread drains
what the process saved (SIGTERM would skip that and leave rows in its outbox).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def main(plan_path: str) -> int:
    """Start every producer at its offset, wait for all; exit code: the worst child's."""
    plan: dict[str, Any] = json.loads(Path(plan_path).read_text())
    _set_autogroup_nice(int(plan.get("nice", 0)))
    # A shell that starts a job in the background (CI, nohup) leaves SIGINT ignored, and an
    # ignored signal stays ignored across exec: the producers would not hear it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    children: list[subprocess.Popen[bytes]] = []
    signal.signal(signal.SIGTERM, lambda *_: _forward(children))
    t0 = time.monotonic()
    for item in plan["producers"]:
        time.sleep(max(0.0, t0 + item["start_s"] - time.monotonic()))
        with open(item["log"], "ab") as log:
            children.append(subprocess.Popen(item["cmd"], env={**os.environ, **item["env"]},
                                             stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
    return max((child.wait() for child in children), default=0)


def _forward(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGINT)


def _set_autogroup_nice(nice: int) -> None:
    # The autogroup's weight (root may lower it; elsewhere this is a no-op, said in the log).
    if not nice:
        return
    try:
        Path("/proc/self/autogroup").write_text(str(nice))
    except OSError as exc:
        print(f"producers: cannot set the autogroup nice to {nice}: {exc}", flush=True)
    os.nice(nice)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
