"""Benchmark: the shard's entry decoding, before and after it moved into scalepub.envelope.

    .venv/bin/python loadtest/bench_decode.py [--entries 100000] [--rounds 9]

The shard turns every stream entry into its ``<entry>`` XML (a few us an entry, at up to
~100k entries/s). That code was inline in ShardWorker._entry; now envelope.decode_fields
decodes and checks the envelope and shard.reader.build_entry builds the entry. The baseline
below is the old inline code, verbatim, timed in the same run on the same envelopes:
~300-byte Django-XML tweets over 1,000 nodes, one in ten with non-ASCII text. Rounds
alternate old and new; the best and the median CPU time of each are compared (new / old: below 1.00
is faster). Both must build the same bytes, which is checked first. No Redis or XMPP.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scalepub.envelope import Envelope, EnvelopeError, decode, decode_fields, encode
from scalepub.nodes import validate_node
from scalepub.shard.reader import build_entry
from scalepub.xmpp.batch import Entry, entry_part

ENVELOPE_VERSION = 1  # the envelopes this benchmark compares the decoders on (the old ones')

WORDS = ("scale", "publish", "tweet", "redis", "stream", "batch", "node", "shard", "entry",
         "latency", "window", "server", "client", "django", "model", "row", "save", "commit")
ACCENTED = ("café", "naïve", "José", "Ñandú", "Zürich", "日本")

Stream = list[tuple[bytes, bytes]]


def envelopes(count: int, nodes: int, seed: int = 1) -> Stream:
    """(stream id, envelope) pairs as the producer writes them."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        words = rng.choices(WORDS, k=12)
        if i % 10 == 0:
            words[3] = rng.choice(ACCENTED)
        author = f"user{i % nodes}"
        payload = (f'<django-objects version="1.0"><object model="twitter.tweet" pk="{i}">'
                   f'<field name="author" type="CharField">{author}</field>'
                   f'<field name="text" type="CharField">{" ".join(words)}</field>'
                   f'<field name="created_at" type="DateTimeField">2026-11-26T07:00:00.000Z'
                   f'</field></object></django-objects>').encode()
        env = Envelope(node=f"/twitter/Tweet/{author}", seq=i // nodes + 1,
                       ts_ns=time.time_ns(), model="twitter.tweet", pk=str(i), fmt="xml",
                       payload=payload)
        out.append((f"1764140400000-{i}".encode(), encode(env, 1)))  # what it compares
    return out


class OldInline:
    """ShardWorker._entry as it was before the split (commit fdb6dde), the baseline."""

    def __init__(self) -> None:
        self._valid_nodes: set[str] = set()

    def _entry(self, sid: bytes, raw: bytes) -> Entry:
        try:
            d = msgpack.unpackb(raw, raw=True)
            node, payload = d[b"node"].decode(), d[b"payload"]
            part = entry_part(node=d[b"node"], seq=d[b"seq"], stream_id=sid, ts_ns=d[b"ts"],
                              model=d[b"model"], pk=d[b"pk"], fmt=d[b"fmt"], payload=payload)
            ok = d[b"v"] == ENVELOPE_VERSION
        except Exception:
            ok = False
        if not ok:
            decode(raw)  # raises EnvelopeError saying what is wrong
            raise EnvelopeError("malformed envelope")
        if node not in self._valid_nodes:
            self._valid_nodes.add(validate_node(node))
        try:
            payload.decode("utf-8")  # invalid UTF-8 would break the XMPP stream
        except UnicodeDecodeError as exc:
            raise EnvelopeError(f"payload is not UTF-8: {exc}") from None
        return Entry(sid, node, d[b"seq"], d[b"ts"], part, raw)


def old_entries(stream: Stream) -> list[Entry]:
    """The baseline over the whole stream."""
    build = OldInline()._entry
    return [build(sid, raw) for sid, raw in stream]


def new_entries(stream: Stream) -> list[Entry]:
    """What shard.reader does now."""
    nodes: dict[bytes, str] = {}
    return [build_entry(sid, raw, nodes) for sid, raw in stream]


def old_decode(stream: Stream) -> None:
    """The decoding part of the baseline alone (no XML built)."""
    for _, raw in stream:
        d = msgpack.unpackb(raw, raw=True)
        _fields = (d[b"node"].decode(), d[b"seq"], d[b"ts"], d[b"model"], d[b"pk"],
                   d[b"fmt"], d[b"payload"])
        _ok = d[b"v"] == ENVELOPE_VERSION
        d[b"payload"].decode("utf-8")


def new_decode(stream: Stream) -> None:
    """envelope.decode_fields alone."""
    for _, raw in stream:
        decode_fields(raw)


def timed(fn: Callable[[Stream], object], stream: Stream) -> float:
    """CPU nanoseconds per entry of one pass (CPU time: other processes on the box count less)."""
    gc.collect()
    start = time.process_time()
    fn(stream)
    return (time.process_time() - start) * 1e9 / len(stream)


def compare(name: str, old: Callable[[Stream], object], new: Callable[[Stream], object],
            stream: Stream, rounds: int) -> None:
    """Alternate old and new ``rounds`` times; print best and median and their ratios."""
    olds, news = [], []
    for _ in range(rounds):
        olds.append(timed(old, stream))
        news.append(timed(new, stream))
    best_old, best_new = min(olds), min(news)
    med_old, med_new = statistics.median(olds), statistics.median(news)
    print(f"| {name} | {best_old:.0f} | {best_new:.0f} | {best_new / best_old:.2f} "
          f"| {med_old:.0f} | {med_new:.0f} | {med_new / med_old:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    stream = envelopes(args.entries, args.nodes)
    old, new = old_entries(stream), new_entries(stream)
    if [(e.node, e.seq, e.ts_ns, e.part) for e in old] != [
            (e.node, e.seq, e.ts_ns, e.part) for e in new]:
        sys.exit("the new path builds other entries than the old one")
    print(f"{args.entries} envelopes, {args.nodes} nodes, {args.rounds} alternating rounds; "
          "ns per entry (new / old: below 1.00 is faster)\n")
    print("| step | old best | new best | ratio | old median | new median | ratio |")
    print("|---|---|---|---|---|---|---|")
    compare("decode only", old_decode, new_decode, stream, args.rounds)
    compare("decode + entry XML (the hot path)", old_entries, new_entries, stream, args.rounds)


if __name__ == "__main__":
    main()
