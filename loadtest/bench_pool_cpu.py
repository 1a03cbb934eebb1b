"""Benchmark: the pool's CPU and Redis's per entry at one entry per IQ, an older commit's pool
against the checkout's, interleaved in one run (issue 16 §4).

    .venv/bin/python loadtest/bench_pool_cpu.py [--baseline-rev HEAD] [--rounds 3]
        [--rate 200] [--nodes 101] [--measure-s 20] [--idle] [--json FILE]

One private Redis + ejabberd (``tests/stack.py``); per round each pool runs once, the order
alternating between rounds, as ``bench_latency.py`` runs a variant: the pool's defaults, one
independent TCP subscriber of every node, a producer appending one entry per call round robin
over ``--nodes`` nodes (at 200/s over 101 nodes each node sees ~2 entries/s: one entry per
IQ). Both pools get the same envelopes. Per run, over the measured window: CPU microseconds
per delivered entry of the pool (supervisor and shard processes) and of Redis, Redis
commands per entry (``INFO commandstats``), the subscriber's commit -> delivery p50/p99.
Printed: every run, then the ratio checkout/baseline per round and its median. The box may be
shared: the load average is printed with each run; compare within a round.

``--idle``: no producer and no subscriber: each pool runs with nothing to publish (lease
renewals, heartbeats, blocking reads, the supervisor's polling, metrics), and the figures are
per second instead of per entry: the pool's CPU milliseconds and Redis's, Redis commands.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loadtest.bench_latency import (  # noqa: E402
    Variant,
    _metrics_up,
    baseline,
    lab,
    run_variant,
)
from loadtest.bench_storm import cpu_seconds, free_port, start, stop, wait_until  # noqa: E402


def log(message: str) -> None:
    print(f"[bench_pool_cpu] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline-rev", default="HEAD", help="the older pool (git revision)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rate", type=float, default=200.0, help="entries (saves) per second")
    p.add_argument("--nodes", type=int, default=101)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--warmup-s", type=float, default=4.0)
    p.add_argument("--measure-s", type=float, default=20.0)
    p.add_argument("--idle", action="store_true",
                   help="no entries: the pools' CPU per second with nothing to do")
    p.add_argument("--json", default="", help="write the runs to this file too")
    return p.parse_args(argv)


def commandstats(url: str) -> Callable[[], dict[str, float]]:
    """Reads Redis's calls per command and its CPU seconds (what ``window`` differences)."""
    import redis

    client = redis.Redis.from_url(url)

    def read() -> dict[str, float]:
        out = {f"calls {name.removeprefix('cmdstat_')}": float(stats["calls"])
               for name, stats in client.info("commandstats").items()}
        cpu = client.info("cpu")
        out["redis cpu s"] = float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
        return out
    return read


def per_entry(row: dict[str, Any]) -> dict[str, float]:
    """The run's figures per delivered entry (CPU in microseconds)."""
    n = max(row["received"], 1)
    w = row["window"]
    calls = {k.removeprefix("calls "): v / n for k, v in w.items()
             if k.startswith("calls ") and v / n >= 0.05}
    return {"pool_us": row["cpu_s"].get("pool", 0.0) / n * 1e6,
            "redis_us": w.get("redis cpu s", 0.0) / n * 1e6,
            "ejabberd_us": row["cpu_s"].get("ejabberd", 0.0) / n * 1e6,
            "redis_calls": sum(calls.values()),
            **{f"calls/{k}": v for k, v in sorted(calls.items())}}


def run_idle(v: Variant, env: dict[str, str], args: argparse.Namespace, work: Path,
             groups: dict[str, list[int]], window: Callable[[], dict[str, float]]
             ) -> dict[str, Any]:
    """One pool with nothing to publish: CPU and Redis commands over the measured window."""
    port = free_port()
    slug = re.sub(r"\W+", "-", v.label)
    log_path = work / f"pool-idle-{slug}.log"
    penv = {**env, "PYTHONPATH": v.pythonpath or env.get("PYTHONPATH", "")}
    pool = start([str(Path(sys.executable).parent / "scalepub"), "run", "--metrics-port",
                  str(port), *v.args], penv, log_path, cwd=v.pythonpath or REPO)
    try:
        wait_until(lambda: _metrics_up(port), "pool metrics")
        wait_until(lambda: log_path.read_text().count("connected as") >= args.shards,
                   "every shard's XMPP session")
        groups = {**groups, "pool": [pool.pid]}
        time.sleep(args.warmup_s)
        c0, w0 = cpu_seconds(groups), window()
        time.sleep(args.measure_s)
        c1, w1 = cpu_seconds(groups), window()
    finally:
        stop(pool)
    return {"variant": v.label, "received": 0, "expected": 0,
            "cpu_s": {k: c1[k] - c0.get(k, 0.0) for k in c1},
            "window": {k: w1[k] - w0.get(k, 0.0) for k in w1}}


def per_second(row: dict[str, Any], seconds: float) -> dict[str, float]:
    """An idle run's figures per second (CPU in milliseconds)."""
    w = row["window"]
    calls = {k.removeprefix("calls "): v / seconds for k, v in w.items()
             if k.startswith("calls ") and v / seconds >= 0.05}
    return {"pool_us": row["cpu_s"].get("pool", 0.0) / seconds * 1e3,
            "redis_us": w.get("redis cpu s", 0.0) / seconds * 1e3,
            "ejabberd_us": row["cpu_s"].get("ejabberd", 0.0) / seconds * 1e3,
            "redis_calls": sum(calls.values()),
            **{f"calls/{k}": v for k, v in sorted(calls.items())}}


def idle_line(row: dict[str, Any]) -> str:
    p = row["per_entry"]
    calls = ", ".join(f"{k.removeprefix('calls/')} {v:.1f}" for k, v in p.items()
                      if k.startswith("calls/"))
    return (f"round {row['round']} {row['variant']:>22}: idle, pool {p['pool_us']:.1f} ms/s, "
            f"Redis {p['redis_us']:.1f} ms/s, ejabberd {p['ejabberd_us']:.1f} ms/s, Redis "
            f"calls/s {p['redis_calls']:.1f} ({calls}); load {row['load']}")


def line(row: dict[str, Any]) -> str:
    if not row["received"] and "e2e_ms" not in row:
        return idle_line(row)
    e, p = row["e2e_ms"], row["per_entry"]
    calls = ", ".join(f"{k.removeprefix('calls/')} {v:.2f}" for k, v in p.items()
                      if k.startswith("calls/"))
    return (f"round {row['round']} {row['variant']:>22}: {row['received']}/{row['expected']} "
            f"entries, pool {p['pool_us']:.0f} us/entry, Redis {p['redis_us']:.0f} us/entry, "
            f"ejabberd {p['ejabberd_us']:.0f} us/entry, Redis calls/entry {p['redis_calls']:.2f} "
            f"({calls}); e2e p50 {e[50]:.1f} ms, p99 {e[99]:.1f} ms; load {row['load']}")


def ratios(rows: list[dict[str, Any]], old: str, new: str) -> str:
    out = []
    for key in ("pool_us", "redis_us", "redis_calls"):
        per_round = []
        for r in sorted({row["round"] for row in rows}):
            pair = {row["variant"]: row["per_entry"][key] for row in rows if row["round"] == r}
            if pair.get(old):
                per_round.append(pair[new] / pair[old])
        if per_round:
            out.append(f"{key} checkout/baseline per round: "
                       f"{', '.join(f'{x:.2f}' for x in per_round)} "
                       f"(median {statistics.median(per_round):.2f})")
    return "\n".join(out)


def run(args: argparse.Namespace, work: Path, cleanup: contextlib.ExitStack) -> list[Any]:
    old = baseline(args.baseline_rev, work)
    old.envelope_version = 0  # the same envelopes for both
    new = Variant("checkout", [])
    stack, env, nodes, groups = lab(args, work, cleanup, "cpu")
    window = commandstats(stack.env["SCALEPUB_REDIS_URL"])
    rows = []
    for r in range(1, args.rounds + 1):
        for v in ([old, new] if r % 2 else [new, old]):
            log(f"round {r}: {v.label}")
            if args.idle:
                row = run_idle(v, env, args, work, groups, window)
                figures = per_second(row, args.measure_s)
            else:
                row = run_variant(v, env, nodes, args, work, groups, window)
                figures = per_entry(row)
            row.update(round=r, load=" ".join(f"{x:.1f}" for x in os.getloadavg()),
                       per_entry=figures)
            rows.append(row)
            log(line(row))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with contextlib.ExitStack() as cleanup:
        work = Path(tempfile.mkdtemp(prefix="bench-pool-cpu-"))
        if not os.environ.get("BENCH_KEEP"):
            cleanup.callback(shutil.rmtree, work, True)
        rows = run(args, work, cleanup)
    print("\n".join(line(row) for row in rows))
    print(ratios(rows, f"baseline {args.baseline_rev}", "checkout"))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
