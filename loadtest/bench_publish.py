"""Benchmark: entries/s from Redis stream to ejabberd-acknowledged, one run, several modes.

    eval "$(ops/stack env)"; .venv/bin/python loadtest/bench_publish.py [--entries 200000]

Modes, all against the same Redis and ejabberd in the same run:
  (a)  seed-style: new connection + auth + one publish per entry (small sample)
  (b)  one long-lived connection, one entry per IQ, one IQ at a time
  (b+) one connection, one entry per IQ, a window of IQs in flight (pipelining alone)
  (c)  scalepub: `scalepub run` with 1, 2, 4, 8 shards (batching + pipelining)
Streams are pre-filled with ~300-byte entries over many nodes before each run; the clock runs
from the first acknowledged entry to the last. CPU shares come from /proc (ejabberd = every
beam.smp process); peak RSS is each shard process's VmHWM.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import random
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis
import slixmpp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scalepub.backlog import stream_backlog  # noqa: E402
from scalepub.connections import client_for_url  # noqa: E402
from scalepub.producer import PendingEntry, StreamProducer  # noqa: E402
from scalepub.settings import Settings  # noqa: E402
from scalepub.sharding import Keys  # noqa: E402
from scalepub.xmpp.link import Reply, XmppLink  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
WORDS = ["scale", "publish", "live", "stream", "shard", "batch", "node", "entry", "feed"]


@dataclass
class Result:
    """One row of the table."""

    mode: str
    entries: int
    seconds: float
    ejabberd_cpu: float = 0.0  # share of one core
    shards_cpu: float = 0.0
    redis_cpu: float = 0.0
    peak_rss_mb: float = 0.0
    entries_per_iq: float = 0.0

    @property
    def rate(self) -> float:
        return self.entries / self.seconds if self.seconds else 0.0


def payload(pk: int, author: str) -> bytes:
    """A Django-XML-like tweet of about 300 bytes."""
    text = " ".join(random.choices(WORDS, k=12))
    return (f'<django-objects version="1.0"><object model="twitter.tweet" pk="{pk}">'
            f'<field name="author" type="CharField">{author}</field>'
            f'<field name="text" type="CharField">{text}</field>'
            f'<field name="created_at" type="DateTimeField">2026-11-26T07:00:00.000Z</field>'
            f'</object></django-objects>').encode()


def prefill(settings: Settings, entries: int, nodes: int) -> None:
    """Append ``entries`` entries over ``nodes`` nodes to the shard streams."""
    producer = StreamProducer(settings)
    chunk = []
    for i in range(entries):
        author = f"bench{i % nodes}"
        chunk.append(PendingEntry(f"/bench/Tweet/{author}", time.time_ns(), "twitter.tweet",
                                  str(i), os.environ.get("BENCH_FMT", "xml"), payload(i, author)))
        if len(chunk) == 2000:
            producer.enqueue(chunk)
            chunk = []
    if chunk:
        producer.enqueue(chunk)
    producer.close()


def cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except (FileNotFoundError, IndexError):
            pass
    return total


def pids_of(name: str, parent: int | None = None) -> list[int]:
    args = ["pgrep", "-P", str(parent)] if parent else ["pgrep", "-x", name]
    out = subprocess.run(args, capture_output=True, text=True, check=False).stdout
    return [int(p) for p in out.split()]


async def publish_window(settings: Settings, iq_for: Callable[[str, int], bytes], iqs: int,
                         window: int, name: str) -> tuple[float, float]:
    """Send ``iqs`` IQs ``iq_for(iq_id, n)`` over one XmppLink, ``window`` in flight.

    Returns (wall seconds, ejabberd CPU seconds: every beam.smp on the machine) from the first
    IQ to the last reply; a refused IQ raises.
    """
    pending: set[str] = set()
    done = asyncio.Event()
    sent = 0

    def pump() -> None:
        nonlocal sent
        while len(pending) < window and sent < iqs:
            iq_id = f"{name}{sent}"
            pending.add(iq_id)
            link.send(iq_for(iq_id, sent))
            sent += 1

    def on_reply(reply: Reply) -> None:
        if not reply.ok:
            raise RuntimeError(f"publish refused: {reply.reason}")
        pending.discard(reply.iq_id)
        pump()
        if not pending:
            done.set()

    link = XmppLink(settings, f"{name}{os.getpid()}", pending.__contains__, on_reply,
                    lambda: None)
    await link.connect()
    beams = pids_of("beam.smp")
    before, started = cpu_ticks(beams), time.perf_counter()
    pump()
    await done.wait()
    elapsed = time.perf_counter() - started
    cpu = (cpu_ticks(beams) - before) / CLK_TCK
    await link.close()
    return elapsed, cpu


def peak_rss_mb(pids: list[int]) -> float:
    peaks = []
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peaks.append(int(line.split()[1]) / 1024)
    return max(peaks, default=0.0)


def remaining(client: redis.Redis, keys: Keys, shards: int) -> int:
    """Entries not yet acknowledged (unread or pending) over all shard streams."""
    return sum(sum(stream_backlog(client, keys.stream(shard))) for shard in range(shards))


def run_pool(mode: str, settings: Settings, entries: int, args: list[str]) -> Result:
    """Start `scalepub run`, time from the first ack to the last, then stop it."""
    client = client_for_url(settings.redis_url)
    keys = Keys(settings.key_prefix)
    env = {**os.environ, **{f"SCALEPUB_{k.upper()}": str(v)
                            for k, v in dataclasses.asdict(settings).items()}}
    log_path = Path(f"/tmp/scalepub-bench-{settings.key_prefix}.log")
    with log_path.open("w") as log:
        pool = subprocess.Popen([str(Path(sys.executable).parent / "scalepub"), "run",
                                 "--log-level", "INFO", "--metrics-port", "0", *args],
                                env=env, stderr=log)
    try:
        elapsed, cpu, rss = _clock(mode, pool, client, keys, settings.shards, entries)
    finally:
        pool.terminate()
        pool.wait(30)
        client.close()
    print(file=sys.stderr)
    iqs = sum(int(m) for m in re.findall(r" iqs=(\d+)", log_path.read_text()))
    return Result(mode, entries, elapsed, *(c / CLK_TCK / elapsed for c in cpu), rss,
                  entries / iqs if iqs else 0.0)


def _clock(mode: str, pool: subprocess.Popen[bytes], client: redis.Redis, keys: Keys,
           shards: int, entries: int) -> tuple[float, tuple[int, int, int], float]:
    """Seconds from the first acknowledged entry to the last; CPU ticks; peak shard RSS."""
    while remaining(client, keys, shards) >= entries:
        time.sleep(0.005)
        if pool.poll() is not None:
            raise RuntimeError(f"{mode}: pool exited with {pool.returncode}")
    started = time.monotonic()
    groups = (shard_pids(pool.pid), pids_of("beam.smp"), pids_of("redis-server"))
    cpu0 = [cpu_ticks(g) for g in groups]
    left = entries
    while left:
        time.sleep(0.05)
        left = remaining(client, keys, shards)
        progress(mode, entries - left, entries, time.monotonic() - started)
    elapsed = time.monotonic() - started
    cpu1 = [cpu_ticks(g) for g in groups]
    sh, ej, rd = (b - a for a, b in zip(cpu0, cpu1, strict=True))
    return elapsed, (ej, sh, rd), peak_rss_mb(groups[0])


def shard_pids(parent: int) -> list[int]:
    """The shard processes of a pool (not multiprocessing's resource tracker)."""
    pids = pids_of("", parent)
    return [p for p in pids if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]


def progress(mode: str, done: int, total: int, elapsed: float) -> None:
    rate = done / elapsed if elapsed else 0.0
    eta = (total - done) / rate if rate else float("inf")
    print(f"\r  {mode}: {done}/{total} entries, {rate:,.0f}/s, ETA {eta:.1f} s   ",
          end="", file=sys.stderr, flush=True)


async def seed_style(settings: Settings, count: int) -> Result:
    """django-pubsub's way: connect, authenticate, publish one item, disconnect."""
    started = time.monotonic()
    for i in range(count):
        client = slixmpp.ClientXMPP(settings.xmpp_jid + "/seed", settings.xmpp_password)
        client.enable_starttls = client.enable_direct_tls = False
        client.enable_plaintext = True
        client.plugin["feature_mechanisms"].unencrypted_plain = True
        client.register_plugin("xep_0060")
        ready = asyncio.get_running_loop().create_future()
        client.add_event_handler("session_start", lambda _e, f=ready: f.set_result(None))
        client.connect(settings.xmpp_host, settings.xmpp_port)
        await asyncio.wait_for(ready, 10)
        item = slixmpp.xmlstream.ET.fromstring(
            f'<entry xmlns="urn:scalepub:1">{payload(i, "seed").decode()}</entry>')
        await client.plugin["xep_0060"].publish(settings.pubsub_service, "/bench/Tweet/seed",
                                                payload=item)
        await client.disconnect()
    return Result("(a) seed-style: connect+auth+publish per entry", count,
                  time.monotonic() - started, entries_per_iq=1.0)


def fresh(settings: Settings, shards: int) -> Settings:
    return settings.replace(key_prefix=f"bench{uuid.uuid4().hex[:8]}", shards=shards)


def cleanup(settings: Settings) -> None:
    client = client_for_url(settings.redis_url)
    for key in client.scan_iter(match=f"{settings.key_prefix}:*", count=1000):
        client.delete(key)
    client.close()


def measure(base: Settings, mode: str, shards: int, entries: int, nodes: int,
            args: list[str]) -> Result:
    # MAXLEN must not trim the pre-filled backlog, or the count would be wrong.
    settings = fresh(base, shards).replace(stream_maxlen=entries + 100_000)
    print(f"{mode}: pre-filling {entries} entries over {nodes} nodes", file=sys.stderr)
    prefill(settings, entries, nodes)
    client = client_for_url(settings.redis_url)
    stored = sum(client.xlen(Keys(settings.key_prefix).stream(s)) for s in range(shards))
    client.close()
    if stored != entries:
        raise RuntimeError(f"pre-filled {stored} entries, expected {entries}")
    try:
        return run_pool(mode, settings, entries, ["--shards", str(shards), *args])
    finally:
        cleanup(settings)


def table(results: list[Result]) -> str:
    a, b = results[0].rate, results[1].rate
    lines = [
        "| mode | entries | s | entries/s | x (a) | x (b) | entries/IQ | CPU ejabberd "
        "| CPU shards | CPU Redis | CPU us/entry (ej+sh+redis) | peak RSS/shard |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        per_entry = [c / r.rate * 1e6 if r.rate else 0.0
                     for c in (r.ejabberd_cpu, r.shards_cpu, r.redis_cpu)]
        lines.append(
            f"| {r.mode} | {r.entries:,} | {r.seconds:.2f} | {r.rate:,.0f} | {r.rate / a:,.0f}x "
            f"| {r.rate / b:,.1f}x | {r.entries_per_iq:.0f} | {r.ejabberd_cpu:.0%} "
            f"| {r.shards_cpu:.0%} | {r.redis_cpu:.0%} "
            f"| {'+'.join(f'{x:.1f}' for x in per_entry)} | {r.peak_rss_mb:.0f} MB |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=300_000, help="entries per (c) run")
    parser.add_argument("--nodes", type=int, default=200,
                        help="distinct nodes (batches can only be as big as a node's backlog)")
    parser.add_argument("--seed-sample", type=int, default=30, help="entries for (a)")
    parser.add_argument("--single", type=int, default=3000, help="entries for (b) and (b+)")
    parser.add_argument("--shards", default="1,2,4,8", help="shard counts for (c)")
    opts = parser.parse_args()
    base = Settings.from_env()
    results = [asyncio.run(seed_style(base, opts.seed_sample))]
    results.append(measure(base, "(b) 1 connection, 1 entry/IQ, 1 IQ at a time", 1,
                           opts.single, opts.nodes,
                           ["--batch-max-entries", "1", "--window", "1", "--linger-ms", "0"]))
    results.append(measure(base, "(b+) 1 connection, 1 entry/IQ, window 32", 1,
                           opts.single * 3, opts.nodes,
                           ["--batch-max-entries", "1", "--window", "32", "--linger-ms", "0"]))
    for shards in (int(s) for s in opts.shards.split(",")):
        results.append(measure(base, f"(c) scalepub, {shards} shard(s)", shards, opts.entries,
                               opts.nodes, []))
    print(table(results))


if __name__ == "__main__":
    main()
