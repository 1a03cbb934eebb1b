"""Benchmark: ejabberd's CPU per publish IQ for the same entries in different item shapes.

    eval "$(ops/stack env)"; .venv/bin/python loadtest/bench_payload_shapes.py [--iqs 400]

Why the batch payload is one CDATA text (docs/protocol.md): the same N Django-XML entries are
published as (1) child elements, (2) one escaped text node, (3) one CDATA section, over one
connection with 32 IQs in flight, and ejabberd's CPU (every beam.smp, from /proc) is divided
by the IQs. Ratios are against the child-element shape in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "loadtest"))

from bench_publish import payload, publish_window  # noqa: E402

from scalepub.settings import Settings  # noqa: E402
from scalepub.xmpp.batch import escape  # noqa: E402

WINDOW = 32


def shapes(entries: int) -> dict[str, bytes]:
    """The same entries as elements, as escaped text and as CDATA."""
    parts = b"".join(
        b'<entry node="/bench/shapes" seq="%d" id="1-%d" ts="%d" model="twitter.tweet" '
        b'pk="%d" fmt="xml">%s</entry>' % (i, i, time.time_ns(), i, payload(i, "shapes"))
        for i in range(entries)
    )
    head, tail = b'<batch xmlns="urn:scalepub:1">', b"</batch>"
    return {
        "child elements": head + parts + tail,
        "escaped text": head + escape(parts) + tail,
        "CDATA": head + b"<![CDATA[" + parts + b"]]>" + tail,
    }


async def publish(settings: Settings, body: bytes, iqs: int) -> float:
    """Publish ``body`` ``iqs`` times, WINDOW in flight; ejabberd CPU seconds per IQ."""
    def iq(iq_id: str, n: int) -> bytes:
        return (f'<iq type="set" id="{iq_id}" to="{settings.pubsub_service}">'
                f'<pubsub xmlns="http://jabber.org/protocol/pubsub">'
                f'<publish node="/bench/shapes/{n % 50}"><item id="{n}">'.encode()
                + body + b"</item></publish></pubsub></iq>")

    cpu: float  # bench_publish is imported as a script: mypy does not follow it
    _, cpu = await publish_window(settings, iq, iqs, WINDOW, "shape")
    return cpu / iqs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iqs", type=int, default=400)
    parser.add_argument("--entries", default="100,200", help="entries per item")
    opts = parser.parse_args()
    settings = Settings.from_env()
    print("| entries/item | shape | bytes | ejabberd CPU ms/IQ | us/entry | x elements |")
    print("|---:|---|---:|---:|---:|---:|")
    for n in (int(x) for x in opts.entries.split(",")):
        base = None
        for name, body in shapes(n).items():
            per_iq = asyncio.run(publish(settings, body, opts.iqs))
            base = base or per_iq
            print(f"| {n} | {name} | {len(body):,} | {per_iq * 1000:.2f} | "
                  f"{per_iq / n * 1e6:.1f} | {per_iq / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
