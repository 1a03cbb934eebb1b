"""Benchmark: ejabberd's CPU per entry against entries per publish IQ (issue 16 §2).

    .venv/bin/python loadtest/bench_batch_curve.py [--sizes 1,5,10,25,50,100,200,400]
        [--entries 20000] [--own-stack]

The defaults (BATCH_MAX_ENTRIES, BATCH_MAX_BYTES) are picked from this curve. For each size
N, ``--entries`` ~300-byte Django-XML entries are published as items of N entries, built by
scalepub's own batch code (one CDATA payload, docs/protocol.md), over one connection with 32
IQs in flight, to 50 nodes in turn; ejabberd's CPU (from /proc) is divided by the IQs and
by the entries. CPU time, not wall time: it holds better than throughput on a shared box,
but ejabberd's scheduler threads do spin more when the machine is busy. ``--own-stack``
starts a private Redis + ejabberd (``tests/stack.py``); otherwise ``ops/stack env``'s is used.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "loadtest"))

from bench_publish import own_stack, payload, publish_window  # noqa: E402

from scalepub.settings import Settings  # noqa: E402
from scalepub.xmpp.batch import Batch, Entry, entry_part, publish_iq  # noqa: E402

WINDOW = 32
NODES = 50


def batches(size: int, iqs: int, tag: str) -> list[bytes]:
    """The payloads of ``iqs`` batches of ``size`` entries, nodes in turn, as IQ templates."""
    out = []
    for n in range(iqs):
        node = f"/bench/curve/{tag}/n{n % NODES}"
        batch = Batch(node, 0)
        for i in range(size):
            seq = n // NODES * size + i + 1
            part = entry_part(node=node.encode(), seq=seq, stream_id=b"%d-0" % seq, ts_ns=0,
                              model=b"twitter.tweet", pk=b"%d" % seq, fmt=b"xml",
                              payload=payload(seq, "curve"))
            batch.add(Entry(b"%d-0" % seq, node, seq, 0, part))
        out.append(publish_iq("{id}", "", batch))
    return out


async def measure(settings: Settings, size: int, entries: int) -> dict[str, float]:
    iqs = max(entries // size, WINDOW * 4)
    tag = uuid.uuid4().hex[:6]
    made = batches(size, iqs, tag)
    service = settings.pubsub_service.encode()

    def iq_for(iq_id: str, n: int) -> bytes:
        return made[n].replace(b'id="{id}" to=""', b'id="%s" to="%s"' % (iq_id.encode(),
                                                                       service), 1)

    # Nodes are created by the first publish: that cost stays out of the figure.
    await publish_window(settings, iq_for, NODES, WINDOW, f"warm{tag}")
    wall, cpu = await publish_window(settings, iq_for, iqs, WINDOW, f"c{tag}")
    return {"size": size, "iqs": iqs, "entries": iqs * size, "ms_per_iq": cpu / iqs * 1e3,
            "us_per_entry": cpu / (iqs * size) * 1e6, "entries_per_s": iqs * size / wall,
            "bytes": len(made[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1,5,10,25,50,100,200,400")
    parser.add_argument("--entries", type=int, default=20_000, help="entries per size")
    parser.add_argument("--own-stack", action="store_true")
    opts = parser.parse_args()
    stop = own_stack() if opts.own_stack else None
    try:
        settings = Settings.from_env()
        rows = [asyncio.run(measure(settings, int(s), opts.entries))
                for s in opts.sizes.split(",")]
    finally:
        if stop:
            stop()
    print("| entries/IQ | IQs | item bytes | ejabberd CPU ms/IQ | ejabberd CPU us/entry "
          "| entries/s (one connection) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['size']} | {r['iqs']:,} | {r['bytes']:,} | {r['ms_per_iq']:.2f} "
              f"| {r['us_per_entry']:.1f} | {r['entries_per_s']:,.0f} |")
    print(f"(pid {os.getpid()}; ejabberd CPU from /proc, the box's other load included in "
          "its scheduling)", file=sys.stderr)


if __name__ == "__main__":
    main()
