"""Benchmark: commit → delivery latency on a quiet site, split per hop, variants in one run.

    .venv/bin/python loadtest/bench_latency.py [--rate 100] [--nodes 20] [--measure-s 20]
        [--variant "linger 5 ms=--linger-ms 5"] [--baseline-rev HEAD~3]

Issue 16 §1 and §3. On loopback only, one run, everything it starts is stopped at the end:

- a private Redis + ejabberd on free ports (``tests/stack.py``), ``--nodes`` nodes created;
- per variant, ``scalepub run`` with the pool's defaults plus the variant's options (the
  first variant is the defaults), its metrics on a free port;
- one independent anonymous TCP subscriber of every node in its own process
  (``scalepub.xmpp.subscriber``, as ``scalepub tail``), which stamps each entry on arrival;
- in this process a producer appending one entry per call at ``--rate``/s round robin over
  the nodes (``StreamProducer.append``, what a save's relay or a ``direct`` save does; the
  entry's ``ts`` is the commit time).

After ``--warmup-s`` it measures ``--measure-s``: the subscriber's commit → delivery
p50/p90/p99/max and the hops. commit → append comes from each entry's stream id (Redis's
millisecond: true to ~1 ms); append → read, read → IQ sent and IQ sent → result from the
pool's ``scalepub_hop_latency_seconds`` histograms (per batch, for its oldest entry: on a
quiet site a batch is one entry), quantiles interpolated within buckets. result → delivery
is what is left: the subscriber's p50 minus the other hops' p50s (an estimate; the
subscriber cannot see the server's result). ``--baseline-rev`` adds a variant running the
pool of an older commit (``git archive``, nothing in the checkout changes), for a before/after
in the same run. CPU seconds per process group are printed: the box is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loadtest.bench_storm import (  # noqa: E402
    append_paced,
    cpu_seconds,
    free_port,
    pct,
    start,
    stop,
    wait_until,
)

PREFIX = "latency"
POOL_HOPS = ("append_to_read", "read_to_send", "send_to_result")


def log(message: str) -> None:
    print(f"[bench_latency] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rate", type=float, default=100.0, help="entries (saves) per second")
    p.add_argument("--nodes", type=int, default=20)
    p.add_argument("--shards", type=int, default=8, help="the pool's default")
    p.add_argument("--warmup-s", type=float, default=4.0)
    p.add_argument("--measure-s", type=float, default=20.0)
    p.add_argument("--variant", action="append", default=[],
                   help='"label=pool options", e.g. "linger 5 ms=--linger-ms 5" (repeatable)')
    p.add_argument("--baseline-rev", action="append", default=[],
                   help="also run the pool of this git revision with its own defaults "
                        "(repeatable; run first, in the order given)")
    p.add_argument("--json", default="", help="write the results to this file too")
    p.add_argument("--subscribe", default="", help=argparse.SUPPRESS)  # internal
    return p.parse_args(argv)


# -- the subscriber process -------------------------------------------------------------------


def subscribe(nodes_file: str) -> None:
    """Print ``node seq stream_id ts_ns received_ns`` per entry until killed."""
    from scalepub.settings import Settings
    from scalepub.xmpp.subscriber import ReceivedEntry, Subscriber

    out = sys.stdout

    def on_entry(e: ReceivedEntry) -> None:
        out.write(f"{e.seq} {e.stream_id} {e.ts_ns} {e.received_ns}\n")
        out.flush()

    async def follow() -> None:  # slixmpp takes the running loop when it is made
        nodes = json.loads(Path(nodes_file).read_text())
        sub = Subscriber(Settings.from_env(), nodes, on_entry, notice=lambda m: print(
            f"subscriber: {m}", file=sys.stderr))
        asyncio.get_running_loop().call_later(
            1.0, lambda: print(f"ready {len(sub.subscribed)}", file=sys.stderr, flush=True))
        await sub.run()

    asyncio.run(follow())


# -- this process: producer, deliveries, metrics -----------------------------------------------


@dataclass
class Probe:
    """Deliveries (received wall ns, commit ns, append ms) and the producer's count."""

    deliveries: list[tuple[int, int, int]] = field(default_factory=list)
    appended: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)


def produce(settings: Any, nodes: list[str], rate: float, probe: Probe, version: int) -> None:
    """One entry per append call at ``rate``/s, round robin over ``nodes``."""
    def count(_node: str) -> None:
        probe.appended += 1

    append_paced(settings, nodes, rate, probe.stop, count, version)


def collect(proc: subprocess.Popen[bytes], probe: Probe) -> None:
    """Read the subscriber's lines into the probe."""
    assert proc.stdout is not None
    for line in proc.stdout:
        _seq, sid, ts, received = line.split()
        with probe.lock:
            probe.deliveries.append((int(received), int(ts), int(sid.split(b"-")[0])))


def scrape(port: int) -> dict[str, list[tuple[float, float]]]:
    """Cumulative bucket counts of each pool hop: hop → [(le, count)], summed over shards."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, dict[float, float]] = {}
    for m in re.finditer(r'^scalepub_hop_latency_seconds_bucket\{([^}]*)\} (\S+)$', text,
                         re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        le = float("inf") if labels["le"] == "+Inf" else float(labels["le"])
        hop = out.setdefault(labels["hop"], {})
        hop[le] = hop.get(le, 0.0) + float(m.group(2))
    return {hop: sorted(b.items()) for hop, b in out.items()}


def bucket_quantile(before: list[tuple[float, float]], after: list[tuple[float, float]],
                    q: float) -> float:
    """The q-quantile (seconds) of what was observed between two scrapes, as Prometheus's
    histogram_quantile does: linear within the bucket."""
    was = dict(before)
    counts = [(le, c - was.get(le, 0.0)) for le, c in after]
    total = counts[-1][1] if counts else 0.0
    if total <= 0:
        return float("nan")
    rank, low, below = q * total, 0.0, 0.0
    for le, cum in counts:
        if cum >= rank:
            if le == float("inf"):
                return low
            return low + (le - low) * (rank - below) / max(cum - below, 1e-12)
        low, below = le, cum
    return low


# -- running a variant ---------------------------------------------------------------------------


@dataclass
class Variant:
    label: str
    args: list[str]
    pythonpath: str = ""
    envelope_version: int | None = None  # default: 1 for an older pool's tree, else 0


def run_variant(v: Variant, env: dict[str, str], nodes: list[str], args: argparse.Namespace,
                work: Path, groups: dict[str, list[int]],
                window: Callable[[], dict[str, float]] | None = None) -> dict[str, Any]:
    """One variant's run; ``window``, if given, is read at the measured window's start and
    end, its differences go to the row's ``window``."""
    from scalepub.settings import Settings

    port = free_port()
    penv = {**env, "PYTHONPATH": v.pythonpath or env.get("PYTHONPATH", "")}
    slug = re.sub(r"\W+", "-", v.label)
    pool = start([str(Path(sys.executable).parent / "scalepub"), "run", "--metrics-port",
                  str(port), *v.args], penv, work / f"pool-{slug}.log", cwd=v.pythonpath or REPO)
    probe = Probe()
    sub = subprocess.Popen([sys.executable, __file__, "--subscribe", str(work / "nodes.json")],
                           env=env, stdout=subprocess.PIPE,
                           stderr=(work / f"sub-{slug}.log").open("wb"))
    try:
        wait_until(lambda: b"ready" in (work / f"sub-{slug}.log").read_bytes(), "subscriber")
        time.sleep(1.0)  # its subscribe IQs
        threading.Thread(target=collect, args=(sub, probe), daemon=True).start()
        wait_until(lambda: _metrics_up(port), "pool metrics")
        # Every shard connected: start-up (processes importing on a busy box) is not latency.
        wait_until(lambda: (work / f"pool-{slug}.log").read_text().count("connected as")
                   >= args.shards, "every shard's XMPP session")
        # An older pool gets version 1 envelopes: every pool reads those.
        producer = threading.Thread(target=produce, daemon=True,
                                    args=(Settings.from_env(env), nodes, args.rate, probe,
                                          _envelope_version(v)))
        producer.start()
        groups = {**groups, "pool": [pool.pid], "subscriber": [sub.pid]}
        time.sleep(args.warmup_s)
        t0, m0, c0 = time.time_ns(), scrape(port), cpu_seconds(groups)
        w0 = window() if window else {}
        time.sleep(args.measure_s)
        t1, m1, c1 = time.time_ns(), scrape(port), cpu_seconds(groups)
        w1 = window() if window else {}
        time.sleep(1.0)  # the last entries of the window arrive
        probe.stop.set()
        producer.join(5)
    finally:
        stop(sub)
        stop(pool)
    row = summarize(v, probe, (t0, t1), (m0, m1), (c0, c1), args)
    if window:
        row["window"] = {k: w1[k] - w0.get(k, 0.0) for k in w1}
    return row


def _envelope_version(v: Variant) -> int:
    if v.envelope_version is not None:
        return v.envelope_version
    return 1 if v.pythonpath else 0


def _metrics_up(port: int) -> bool:
    with contextlib.suppress(OSError):
        return bool(scrape(port) is not None)
    return False


def summarize(v: Variant, probe: Probe, window: tuple[int, int],
              scrapes: tuple[dict[str, Any], dict[str, Any]],
              cpu: tuple[dict[str, float], dict[str, float]],
              args: argparse.Namespace) -> dict[str, Any]:
    t0, t1 = window
    with probe.lock:
        got = [d for d in probe.deliveries if t0 <= d[1] < t1]
    e2e = [(r - ts) / 1e6 for r, ts, _ in got]
    to_append = [max(ms - ts / 1e6, 0.0) for _, ts, ms in got]
    sent = int(args.rate * (t1 - t0) / 1e9)
    row: dict[str, Any] = {
        "variant": v.label, "options": " ".join(v.args), "received": len(e2e),
        "expected": sent,
        "e2e_ms": {q: pct(e2e, q / 100) for q in (50, 90, 99)},
        "e2e_max_ms": max(e2e, default=float("nan")),
        "hops_ms": {"commit_to_append": {q: pct(to_append, q / 100) for q in (50, 99)}},
        "cpu_s": {k: round(cpu[1][k] - cpu[0].get(k, 0.0), 2) for k in cpu[1]},
    }
    for hop in POOL_HOPS:
        before, after = scrapes[0].get(hop, []), scrapes[1].get(hop, [])
        row["hops_ms"][hop] = {q: bucket_quantile(before, after, q / 100) * 1e3
                               for q in (50, 99)}
    known = sum(h[50] for h in row["hops_ms"].values() if h[50] == h[50])
    row["hops_ms"]["result_to_delivery_est"] = {50: row["e2e_ms"][50] - known, 99: float("nan")}
    return row


def table(rows: list[dict[str, Any]]) -> str:
    hops = ("commit_to_append", *POOL_HOPS, "result_to_delivery_est")
    head = ("| variant | received/expected | e2e p50 | p90 | p99 | max | "
            + " | ".join(f"{h} p50 / p99" for h in hops) + " | CPU s (pool, ejabberd, redis, "
            "bench, subscriber, machine) |")
    lines = [head, "|" + "---|" * (7 + len(hops))]
    for r in rows:
        e = r["e2e_ms"]
        hop_cells = " | ".join(f"{r['hops_ms'][h][50]:.2f} / {r['hops_ms'][h][99]:.2f}"
                               for h in hops)
        c = r["cpu_s"]
        cpu = ", ".join(f"{c.get(k, 0.0):.1f}" for k in
                        ("pool", "ejabberd", "redis", "bench", "subscriber", "machine"))
        lines.append(f"| {r['variant']} | {r['received']}/{r['expected']} | {e[50]:.2f} "
                     f"| {e[90]:.2f} | {e[99]:.2f} | {r['e2e_max_ms']:.1f} | {hop_cells} "
                     f"| {cpu} |")
    return "\n".join(lines)


def baseline(rev: str, work: Path) -> Variant:
    """The pool of an older commit, from ``git archive`` (the checkout is left alone)."""
    from loadtest.revisions import package_tree

    return Variant(f"baseline {rev}", [], str(package_tree(rev, work)))


def lab(args: argparse.Namespace, work: Path, cleanup: contextlib.ExitStack, name: str
        ) -> tuple[Any, dict[str, str], list[str], dict[str, list[int]]]:
    """A private Redis + ejabberd (stopped by ``cleanup``) with ``args.nodes`` nodes made:
    the stack, the pool's environment, the nodes, the stack's pids by part."""
    from loadtest.run import _create_nodes, ejabberd_pids, redis_pids
    from tests.stack import new_stack

    stack = new_stack(SCALEPUB_POSTGRES="off")  # not needed: the producer appends itself
    cleanup.callback(shutil.rmtree, stack.state_dir, True)
    cleanup.callback(stack.down)
    log("starting a private Redis + ejabberd")
    stack.up()
    env = {**os.environ, **stack.env, "SCALEPUB_KEY_PREFIX": PREFIX, "PYTHONPATH": str(REPO),
           "SCALEPUB_SHARDS": str(args.shards)}
    nodes = [f"/bench/Tweet/{name}{i}" for i in range(args.nodes)]
    (work / "nodes.json").write_text(json.dumps(nodes))
    _create_nodes(stack.env, nodes)
    return stack, env, nodes, {"ejabberd": ejabberd_pids(stack), "redis": redis_pids(stack)}


def run(args: argparse.Namespace, work: Path, cleanup: contextlib.ExitStack) -> list[Any]:
    variants = [Variant("defaults", [])]
    variants += [Variant(lbl, opts.split()) for lbl, _, opts in
                 (s.partition("=") for s in args.variant)]
    variants[:0] = [baseline(rev, work) for rev in args.baseline_rev]
    _, env, nodes, groups = lab(args, work, cleanup, "lat")
    groups["bench"] = [os.getpid()]
    rows = []
    for v in variants:
        log(f"variant {v.label!r}: {args.rate:g} entries/s over {args.nodes} nodes")
        rows.append(run_variant(v, env, nodes, args, work, groups))
        log(json.dumps(rows[-1]))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.subscribe:
        subscribe(args.subscribe)
        return 0
    with contextlib.ExitStack() as cleanup:
        work = Path(tempfile.mkdtemp(prefix="bench-latency-"))
        if not os.environ.get("BENCH_KEEP"):  # logs of the pool and the subscriber
            cleanup.callback(shutil.rmtree, work, True)
        rows = run(args, work, cleanup)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
