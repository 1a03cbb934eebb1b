"""Benchmark: a site's first burst over many new nodes (issue 16 §2, node creation).

    .venv/bin/python loadtest/bench_node_burst.py --own-stack [--nodes 10000] [--pools 1,2]
        [--baseline-rev REV]

Streams are pre-filled with ``--per-node`` entries on each of ``--nodes`` nodes that do not
exist on the XMPP server yet (fresh names every round), then ``--pools`` supervisors
(`scalepub run --shards 8` each, sharing the shards through their leases) drain them. The
clock runs from the pools' start to the last acknowledgement (start-up included: a burst is
mostly start-up); also reported: ejabberd's CPU seconds over the drain, the pool's transient
retries (ejabberd's aborted auto-creations answer item-not-found) and the publish IQs.
``--baseline-rev``: the same burst drained by the pool of that git revision just before,
from entries in the envelope version it reads (1), same stack: a before/after in one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loadtest.bench_publish import (  # noqa: E402
    CLK_TCK,
    baseline_tree,
    cleanup,
    cpu_ticks,
    own_stack,
    payload,
    remaining,
    server_pids,
)
from scalepub.connections import client_for_url  # noqa: E402
from scalepub.producer import PendingEntry, StreamProducer  # noqa: E402
from scalepub.settings import Settings  # noqa: E402
from scalepub.sharding import Keys  # noqa: E402


@dataclasses.dataclass
class Round:
    """One drain of a burst."""

    mode: str
    nodes: int
    entries: int
    seconds: float  # pools started → last acknowledgement
    ejabberd_cpu_s: float
    retries: int
    iqs: int
    creates: int
    dead_letters: int  # entries given up on (the old pool, after 8 refused auto-creations)


def prefill(settings: Settings, run: str, nodes: int, per_node: int, version: int) -> int:
    """``per_node`` entries on each of ``nodes`` new nodes, in envelope ``version``."""
    producer = StreamProducer(settings)
    producer.envelope_version = version
    chunk: list[PendingEntry] = []
    total = 0
    for k in range(per_node):
        for i in range(nodes):
            node = f"/burst/{run}/author{i}"
            chunk.append(PendingEntry(node, time.time_ns(), "twitter.tweet", str(total), "xml",
                                      payload(total, f"author{i}")))
            total += 1
            if len(chunk) == 2000:
                producer.enqueue(chunk)
                chunk = []
        del k
    if chunk:
        producer.enqueue(chunk)
    producer.close()
    return total


def drain(mode: str, settings: Settings, entries: int, pools: int, pythonpath: str) -> Round:
    """Start ``pools`` supervisors, time the drain, stop them, read their logs."""
    env = {**os.environ, **{f"SCALEPUB_{k.upper()}": str(v)
                            for k, v in dataclasses.asdict(settings).items()}}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    client = client_for_url(settings.redis_url)
    keys = Keys(settings.key_prefix)
    beams = server_pids("beam.smp")
    logs = [Path(f"/tmp/scalepub-burst-{settings.key_prefix}-{p}.log") for p in range(pools)]
    cpu0, started = cpu_ticks(beams), time.monotonic()
    procs = []
    for p, log_path in enumerate(logs):
        with log_path.open("w") as log:
            procs.append(subprocess.Popen(
                [str(Path(sys.executable).parent / "scalepub"), "run", "--log-level", "INFO",
                 "--metrics-port", "0", "--shards", str(settings.shards)],
                env=env, stderr=log, cwd=pythonpath or None))  # see bench_publish.run_pool
        del p
    try:
        while (left := remaining(client, keys, settings.shards)) > 0:
            if any(proc.poll() is not None for proc in procs):
                raise RuntimeError(f"{mode}: a pool exited early; see {logs}")
            print(f"\r  {mode}: {entries - left}/{entries} acknowledged, "
                  f"{time.monotonic() - started:.1f} s   ", end="", file=sys.stderr, flush=True)
            time.sleep(0.05)
        seconds = time.monotonic() - started
        cpu = (cpu_ticks(beams) - cpu0) / CLK_TCK
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
        client.close()
    print(file=sys.stderr)
    text = "".join(path.read_text() for path in logs)
    def count(pattern: str) -> int:
        return sum(int(m) for m in re.findall(pattern, text))
    return Round(mode, 0, entries, seconds, cpu, count(r" retries=(\d+)"), count(r" iqs=(\d+)"),
                 count(r" created (\d+) nodes"), count(r" dead_lettered=(\d+)"))


def one(base: Settings, mode: str, opts: argparse.Namespace, pools: int,
        baseline: str = "") -> Round:
    run = uuid.uuid4().hex[:8]
    settings = base.replace(key_prefix=f"burst{run}", shards=8)
    entries = prefill(settings, run, opts.nodes, opts.per_node, 1 if baseline else 2)
    try:
        result = drain(mode, settings, entries, pools, baseline)
    finally:
        cleanup(settings)
    result.nodes = opts.nodes
    return result


def table(rounds: list[Round]) -> str:
    lines = ["| mode | new nodes | entries | s (start → last ack) | nodes/s | ejabberd CPU s "
             "| retries | publish IQs | explicit creates | dead letters |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rounds:
        lines.append(f"| {r.mode} | {r.nodes:,} | {r.entries:,} | {r.seconds:.1f} "
                     f"| {r.nodes / r.seconds:,.0f} | {r.ejabberd_cpu_s:.1f} | {r.retries:,} "
                     f"| {r.iqs:,} | {r.creates:,} | {r.dead_letters:,} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=10_000, help="new nodes per round")
    parser.add_argument("--per-node", type=int, default=1, help="entries per node")
    parser.add_argument("--pools", default="1,2", help="supervisors per round, e.g. 1,2")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds per mode")
    parser.add_argument("--baseline-rev", default="", help="also the pool of this revision")
    parser.add_argument("--own-stack", action="store_true",
                        help="a private Redis + ejabberd on free ports, RDB saves off")
    opts = parser.parse_args()
    stop = own_stack() if opts.own_stack else None
    try:
        base = Settings.from_env()
        tree = baseline_tree(opts.baseline_rev) if opts.baseline_rev else ""
        rounds = []
        for _ in range(opts.rounds):
            for pools in (int(p) for p in opts.pools.split(",")):
                if tree:
                    rounds.append(one(base, f"pool of {opts.baseline_rev}, {pools} supervisor(s)",
                                      opts, pools, tree))
                rounds.append(one(base, f"scalepub, {pools} supervisor(s)", opts, pools))
        print(table(rounds))
    finally:
        if stop:
            stop()


if __name__ == "__main__":
    main()
