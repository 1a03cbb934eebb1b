"""Whether the load generator had CPU to spare while it measured: its figures are valid only then.

For each generator process (a Locust process, the WebSocket subscriber process; each is
single-threaded Python, so one core is the most it can use) the run samples the time its
threads ran and waited in a run queue (``/proc/PID/task/TID/schedstat``) all along, and takes
the difference between the samples around the first and the last save. A process is the
bottleneck when its CPU was above 90 % of what it could have (one core, less under a quota)
or when it was running or waiting to run more than 90 % of the window (starved by other
processes on its CPUs).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

LIMIT = 0.90  # above this share of its capacity, the generator set the pace, not the server


@dataclass(frozen=True)
class Usage:
    """One process's counters at one moment."""

    cpu_s: float
    wait_s: float


def snapshot(roots: dict[str, list[int]]) -> dict[str, dict[int, Usage]]:
    """Per group, per process (roots and their children): CPU and run-queue wait so far."""
    out: dict[str, dict[int, Usage]] = {}
    for group, pids in roots.items():
        procs = out.setdefault(group, {})
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(pid)
                for proc in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        procs[proc.pid] = _usage(proc)
    return out


def _usage(proc: psutil.Process) -> Usage:
    # schedstat counts in ns; /proc/PID/stat's CPU times in 10 ms ticks, too coarse for a
    # process capped at 1 % of a core over a few seconds.
    run = wait = 0
    for stat in Path(f"/proc/{proc.pid}/task").glob("*/schedstat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().split()
            run, wait = run + int(fields[0]), wait + int(fields[1])
    if not run:  # no schedstat (a kernel without it): CPU times, and no wait figure
        times = proc.cpu_times()
        return Usage(times.user + times.system, 0.0)
    return Usage(run / 1e9, wait / 1e9)


def judge(before: dict[str, dict[int, Usage]], after: dict[str, dict[int, Usage]],
          wall_s: float, capacity: float, deliveries: dict[str, float],
          total_capacity: float | None = None) -> dict[str, Any]:
    """The generator's figures over a window: per group and overall, and the verdict.

    ``capacity``: cores one generator process could use (1, or less under a quota);
    ``total_capacity``: cores all of them together could use (their CPUs, or the quota they
    share; default: ``capacity``); ``deliveries``: entry-deliveries per group in the window
    (CPU per delivery)."""
    groups: dict[str, dict[str, Any]] = {}
    worst_cpu = worst_busy = total = 0.0
    for group, procs in after.items():
        cpu = wait = 0.0
        for pid, usage in procs.items():
            start = before.get(group, {}).get(pid, Usage(0.0, 0.0))
            p_cpu, p_wait = usage.cpu_s - start.cpu_s, usage.wait_s - start.wait_s
            cpu, wait = cpu + p_cpu, wait + p_wait
            worst_cpu = max(worst_cpu, p_cpu / wall_s / capacity)
            worst_busy = max(worst_busy, (p_cpu + p_wait) / wall_s)
        total += cpu
        n = deliveries.get(group, 0.0)
        groups[group] = {"cpu_cores": round(cpu / wall_s, 3), "wait_cores": round(wait / wall_s, 3),
                         "processes": len(procs), "deliveries": int(n),
                         "cpu_us_per_delivery": round(cpu / n * 1e6, 1) if n else None}
    worst_cpu = max(worst_cpu, total / wall_s / (total_capacity or capacity))
    reasons = []
    if worst_cpu > LIMIT:
        reasons.append(f"the generator used {worst_cpu:.0%} of the CPU it could have")
    if worst_busy > LIMIT:
        reasons.append(f"a generator process was running or waiting for a CPU "
                       f"{worst_busy:.0%} of the time")
    return {"groups": groups, "max_cpu_share": round(worst_cpu, 3),
            "max_busy_share": round(worst_busy, 3), "capacity_cores": capacity,
            "total_capacity_cores": total_capacity or capacity,
            "window_s": round(wall_s, 2), "valid": not reasons, "why_not_valid": "; ".join(reasons)}
