"""Benchmark: what NODE_ACCESS_MODEL=whitelist (publish-options on every IQ) costs ejabberd.

    eval "$(ops/stack env)"; .venv/bin/python loadtest/bench_access_model.py [--iqs 2000]

Open nodes are published to with no options; whitelist adds a publish-options form that
ejabberd decodes and compares with the node's configuration on every publish. The same
batches (100 entries of ~300 bytes) go over one XmppLink with 32 IQs in flight, rounds
alternating open / whitelist; the table gives publish IQs per second and ejabberd's CPU per
IQ (every beam.smp on the machine: other stacks add noise), with ratios against open in the
same run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "loadtest"))

from bench_publish import payload, publish_window  # noqa: E402

from scalepub.settings import Settings  # noqa: E402
from scalepub.xmpp.batch import (  # noqa: E402
    Batch,
    Entry,
    entry_part,
    publish_iq,
    publish_options,
)

WINDOW = 32
NODES = 50
ENTRIES = 100


def batch(node: str, first: int) -> Batch:
    """ENTRIES entries of ``node`` from seq ``first``."""
    out = Batch(node, 0)
    for seq in range(first, first + ENTRIES):
        part = entry_part(node=node.encode(), seq=seq, stream_id=b"%d-0" % seq,
                          ts_ns=time.time_ns(), model=b"twitter.tweet", pk=b"%d" % seq,
                          fmt=b"xml", payload=payload(seq, "bench"))
        out.add(Entry(b"%d-0" % seq, node, seq, 0, part, b""))
    return out


async def publish(settings: Settings, prefix: str, iqs: int) -> tuple[float, float]:
    """Publish ``iqs`` batches over NODES nodes; (IQs per second, ejabberd CPU s per IQ)."""
    batches = [batch(f"{prefix}/{i}", 1) for i in range(NODES)]
    options = publish_options(settings.node_access_model)
    elapsed, cpu = await publish_window(
        settings, lambda iq_id, n: publish_iq(iq_id, settings.pubsub_service,
                                              batches[n % NODES], options),
        iqs, WINDOW, "access")
    return iqs / elapsed, cpu / iqs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iqs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    opts = parser.parse_args()
    base = Settings.from_env()
    run = f"/bench/access/{os.getpid()}"
    results: dict[str, list[tuple[float, float]]] = {"open": [], "whitelist": []}
    for model in results:  # first publish creates the nodes: not measured
        asyncio.run(publish(base.replace(node_access_model=model), f"{run}/{model}", NODES))
    for _ in range(opts.rounds):
        for model, rows in results.items():
            settings = base.replace(node_access_model=model)
            rows.append(asyncio.run(publish(settings, f"{run}/{model}", opts.iqs)))
    print(f"{opts.iqs} IQs x {opts.rounds} rounds, {ENTRIES} entries/IQ, window {WINDOW}; "
          "medians")
    print("| access model | publish IQ/s | x open | ejabberd CPU ms/IQ | x open |")
    print("|---|---:|---:|---:|---:|")
    rate0 = statistics.median(r for r, _ in results["open"])
    cpu0 = statistics.median(c for _, c in results["open"])
    for model, rows in results.items():
        rate = statistics.median(r for r, _ in rows)
        cpu = statistics.median(c for _, c in rows)
        print(f"| {model} | {rate:,.0f} | {rate / rate0:.2f} | {cpu * 1000:.2f} | "
              f"{cpu / cpu0:.2f} |")


if __name__ == "__main__":
    main()
